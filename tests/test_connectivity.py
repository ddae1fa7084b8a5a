"""Mode connectivity: paths between two models, loss along them, the bend fit, the CLI."""

from __future__ import annotations

import copy
import gc
import json
import threading
import weakref

import numpy as np
import pytest
import torch

from simu_core import arch, cli, connectivity, figures
from simu_core import data as qa
from simu_core.connectivity import FitConfig, evaluate_path, fit_bend, make_path, split_loss
from simu_core.errors import SimuError
from simu_core.models import LoadedModel

N_COLUMNS = 16  # neurons per layer that the SIMU-like endpoint changes


@pytest.fixture(scope="module")
def splits(builtin_dir) -> dict[str, qa.QADataset]:
    forget = qa.load_data("builtin:forget10", root=builtin_dir)
    retain = connectivity.sample_items(qa.load_data("builtin:retain10", root=builtin_dir), 40, seed=0)
    return {"forget": forget, "retain": retain}


def _batch(full_model: LoadedModel, dataset: qa.QADataset) -> dict[str, torch.Tensor]:
    examples = qa.encode_dataset(full_model.tokenizer, full_model.fmt, dataset)
    return qa.collate(examples, qa.pad_id_of(full_model.tokenizer))


@pytest.fixture(scope="module")
def simu_like_b(full_model, splits) -> torch.nn.Module:
    """Endpoint B as a SIMU run would leave it: gradient difference (ascent on forget, descent on
    retain) on the first N_COLUMNS neurons (down_proj columns) of each layer; all else is A's."""
    model = copy.deepcopy(full_model.model).train()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [layer.down.weight for layer in arch.neuron_layers(model)]
    for w in weights:
        w.requires_grad_(True)
    forget, retain = _batch(full_model, splits["forget"]), _batch(full_model, splits["retain"])
    optimizer = torch.optim.Adam(weights, lr=3e-2)
    for _ in range(20):
        loss = -model(**forget).loss + model(**retain).loss
        optimizer.zero_grad()
        loss.backward()
        for w in weights:
            w.grad[:, N_COLUMNS:] = 0
        optimizer.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def dense_b(full_model, splits) -> torch.nn.Module:
    """Endpoint B with every parameter changed: a few steps of plain gradient ascent on the forget set."""
    model = copy.deepcopy(full_model.model).train()
    forget = _batch(full_model, splits["forget"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        loss = -model(**forget).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def _loaded(like: LoadedModel, model: torch.nn.Module, spec: str = "B") -> LoadedModel:
    return LoadedModel(model, like.tokenizer, like.fmt, spec, spec)


def _eval_batches(full_model, splits):
    return {name: connectivity.eval_batches(full_model, ds) for name, ds in splits.items()}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# The path reproduces its endpoints and the curve formulas
# --------------------------------------------------------------------------------------------


def test_simu_like_endpoint_forgets(full_model, simu_like_b, splits):
    batches = _eval_batches(full_model, splits)
    assert split_loss(simu_like_b, batches["forget"]) > 5 * split_loss(full_model.model, batches["forget"])


@pytest.mark.parametrize("curve", ["linear", "bezier", "chain"])
def test_path_ends_are_the_endpoint_models_exactly(full_model, simu_like_b, splits, curve):
    path = make_path(full_model, _loaded(full_model, simu_like_b), curve)
    for bend in path.bends():  # move the bend off the midpoint so that it could leak into the ends
        bend.data += 0.1 * torch.randn_like(bend)
    result = evaluate_path(path, splits, points=3)
    batches = _eval_batches(full_model, splits)
    for name in splits:
        # Same parameters bit for bit and deterministic CPU kernels: the losses must match exactly
        # (1e-9 only absorbs float printing; nothing is accumulated differently).
        assert result.losses[name][0] == pytest.approx(split_loss(full_model.model, batches[name]), abs=1e-9)
        assert result.losses[name][-1] == pytest.approx(split_loss(simu_like_b, batches[name]), abs=1e-9)
    for t, reference in ((0.0, full_model.model), (1.0, simu_like_b)):
        model = path.at(t)
        for name, p in reference.named_parameters():
            assert torch.equal(model.get_parameter(name), p), (t, name)


def test_path_never_modifies_model_a(full_model, simu_like_b):
    before = _state(full_model.model)
    path = make_path(full_model, _loaded(full_model, simu_like_b), "bezier")
    path.at(0.5)
    for name, p in full_model.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_linear_midpoint_is_the_parameter_average(full_model, dense_b):
    path = make_path(full_model, _loaded(full_model, dense_b), "linear")
    model = path.at(0.5)
    b = dict(dense_b.named_parameters())
    for name, a in full_model.model.named_parameters():
        # 0.5a + 0.5b and (a + b) / 2 are both the one rounding of a + b, halved: equal in fp32 up to
        # the last bit; 1e-7 relative allows a one-ulp difference.
        torch.testing.assert_close(model.get_parameter(name), (a + b[name]) / 2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_bezier_and_chain_follow_the_garipov_formulas(full_model, simu_like_b, t):
    """Against the formulas written as in references.md section 4, on whole tensors."""
    b_params = dict(simu_like_b.named_parameters())
    for curve in ("bezier", "chain"):
        path = make_path(full_model, _loaded(full_model, simu_like_b), curve)
        bends = {}
        for c in path.carried:
            c.bend.data += 0.05 * torch.randn_like(c.bend)
            full = c.param.detach().clone()
            c.selection.put_(full, c.bend.detach())  # the bend as a whole tensor (equal to A off the selection)
            bends[c.name] = full
        model = path.at(t)
        for name, w1 in full_model.model.named_parameters():
            w2, theta = b_params[name], bends.get(name, w1)
            if curve == "bezier":
                expected = (1 - t) ** 2 * w1 + 2 * t * (1 - t) * theta + t**2 * w2
            elif t <= 0.5:
                expected = 2 * (t * theta + (0.5 - t) * w1)
            else:
                expected = 2 * ((t - 0.5) * w2 + (1 - t) * theta)
            # Different but equivalent float32 expressions: a few ulps of |w| ~ 0.1 apart.
            torch.testing.assert_close(model.get_parameter(name), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Only what differs is carried
# --------------------------------------------------------------------------------------------


def test_slice_delta_is_carried_as_a_slice(full_model):
    b = copy.deepcopy(full_model.model)
    weight = arch.neuron_layers(b)[1].down.weight  # [d, d_ff]
    columns = torch.tensor([3, 70, 200])
    with torch.no_grad():
        weight[:, columns] += 0.5
    path = make_path(full_model, _loaded(full_model, b), "linear")
    assert [c.name for c in path.carried] == ["model.layers.1.mlp.down_proj.weight"]
    selection = path.carried[0].selection
    assert (selection.mode, selection.dim, selection.index.tolist()) == ("slice", 1, columns.tolist())
    d = weight.shape[0]
    # A and B values of 3 columns (fp32) + 3 int64 indices: counted from the storages actually held.
    assert path.carried_bytes() == 2 * d * 3 * 4 + 3 * 8
    model_bytes = sum(p.numel() * p.element_size() for p in full_model.model.parameters())
    assert path.carried_bytes() < 0.01 * model_bytes
    expected = {n: (p + b.get_parameter(n)) / 2 for n, p in full_model.model.named_parameters()}
    model = path.at(0.5)
    for name, value in expected.items():
        torch.testing.assert_close(model.get_parameter(name), value, rtol=1e-7, atol=1e-9)


def test_scattered_delta_is_carried_as_elements(full_model):
    b = copy.deepcopy(full_model.model)
    embedding = b.get_input_embeddings().weight
    with torch.no_grad():
        embedding.view(-1)[torch.tensor([5, 1000, 7777, 20001])] -= 0.25
    path = make_path(full_model, _loaded(full_model, b), "bezier")
    (carried,) = path.carried
    assert carried.selection.mode == "elements" and carried.numel == 4
    # per element: A, B, bend (fp32) and an int64 index
    assert path.carried_bytes() == 4 * (3 * 4 + 8)
    torch.testing.assert_close(path.at(1.0).get_input_embeddings().weight, embedding, rtol=0, atol=0)


def test_simu_like_path_carries_the_changed_columns_only(full_model, simu_like_b):
    path = make_path(full_model, _loaded(full_model, simu_like_b), "bezier")
    layers = arch.neuron_layers(full_model.model)
    assert {c.name for c in path.carried} == {layer.down_name + ".weight" for layer in layers}
    d = full_model.model.config.hidden_size
    per_layer = N_COLUMNS * d * (4 + 4 + 4) + N_COLUMNS * 8  # A, B, bend columns + indices
    assert path.carried_bytes() == len(layers) * per_layer


def test_path_keeps_no_reference_to_model_b(full_model):
    b = copy.deepcopy(full_model.model)
    with torch.no_grad():
        b.get_parameter("model.norm.weight").add_(1.0)
    ref = weakref.ref(b)
    path = make_path(full_model, _loaded(full_model, b), "bezier")
    del b
    gc.collect()
    assert ref() is None
    assert path.carried_elements() == full_model.model.config.hidden_size


def test_a_run_folder_is_an_endpoint_and_its_delta_is_all_that_is_carried(full_model, splits, tmp_path):
    from simu_core.methods import preset_config
    from simu_core.neurons import NeuronMask
    from simu_core.runs import save_run
    from simu_core.unlearn import unlearn

    mask = NeuronMask([torch.arange(layer.d_ff) % 16 == 3 for layer in arch.neuron_layers(full_model.model)], "manual")
    config = preset_config("simu", steps=3, batch_size=8, retain_batch_size=8, probe_every=0, stop_forget_em=None)
    result = unlearn(full_model, splits["forget"], splits["retain"], config, mask=mask)
    folder = save_run(result, tmp_path)
    run = connectivity.load_endpoint(str(folder), device="cpu")
    path = make_path(full_model, run, "linear")
    changed = {c.name: c.values.numel() for c in result.changes}
    assert {c.name for c in path.carried} <= set(changed)
    assert all(c.numel <= changed[c.name] for c in path.carried)
    for name, p in result.model.model.named_parameters():  # t = 1 is the run's model
        assert torch.equal(path.at(1.0).get_parameter(name), p), name


def test_endpoints_of_different_shapes_are_refused(full_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**full_model.model.config.to_dict(), "intermediate_size": 128})
    with pytest.raises(SimuError, match="same architecture"):
        make_path(full_model, LlamaForCausalLM(config), "linear")


# --------------------------------------------------------------------------------------------
# Loss of a split, barrier, mean along the path
# --------------------------------------------------------------------------------------------


def test_split_loss_is_the_token_weighted_mean_over_the_whole_split(full_model, splits):
    """Against the model's own loss on one example at a time (no padding), weighted by its answer tokens."""
    items = splits["retain"].items[:12]
    total, count = 0.0, 0
    for item in items:
        e = qa.encode(full_model.tokenizer, full_model.fmt, item["question"], item["answer"])
        n_answer = len(e.ids) - e.n_prompt
        with torch.no_grad():
            total += float(full_model.model(**qa.collate([e], 0)).loss) * n_answer
        count += n_answer
    batches = connectivity.eval_batches(full_model, qa.QADataset("r", items), batch_size=5)
    # fp32 logits, padded vs unpadded attention: agree to ~1e-6 relative.
    assert split_loss(full_model.model, batches) == pytest.approx(total / count, rel=1e-5)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes only input_ids and attention_mask (like some older families)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_models_without_logits_to_keep_give_the_same_split_loss(full_model, splits):
    batches = connectivity.eval_batches(full_model, splits["forget"], batch_size=8)
    # Same forward, only the positions projected to the vocabulary differ: float32 rounding only.
    assert split_loss(_NoLogitsToKeep(full_model.model), batches) == pytest.approx(
        split_loss(full_model.model, batches), rel=1e-6
    )


def test_barrier_height_hand_worked():
    assert connectivity.barrier_height([1.0, 3.0, 2.0]) == 1.0
    assert connectivity.barrier_height([0.5, 0.4, 0.3, 2.0]) == 0.0  # monotone rise: no barrier
    assert np.isnan(connectivity.barrier_height([0.5, float("nan"), 0.3]))


def test_mean_along_the_path_is_the_trapezoid_rule():
    ts, values = [0.0, 0.25, 0.5, 1.0], [1.0, 3.0, 2.0, 0.0]
    # hand-worked: 0.25*(1+3)/2 + 0.25*(3+2)/2 + 0.5*(2+0)/2 = 0.5 + 0.625 + 0.5
    assert connectivity.trapezoid_mean(ts, values) == pytest.approx(1.625)
    assert connectivity.trapezoid_mean(ts, values) == pytest.approx(np.trapezoid(values, ts))


def test_evaluate_path_reports_barrier_seconds_and_json_round_trip(full_model, simu_like_b, splits):
    path = make_path(full_model, _loaded(full_model, simu_like_b), "linear")
    result = evaluate_path(path, splits, points=5)
    assert result.ts == [0.0, 0.25, 0.5, 0.75, 1.0] and result.complete and result.seconds > 0
    for name, losses in result.losses.items():
        assert result.barrier[name] == max(losses) - max(losses[0], losses[-1])
    assert result.losses["forget"][-1] > result.losses["forget"][0]
    again = connectivity.PathResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result


def test_evaluation_cancel_returns_an_incomplete_result(full_model, simu_like_b, splits):
    cancel = threading.Event()
    path = make_path(full_model, _loaded(full_model, simu_like_b), "linear")

    def stop_after_two(message: str, fraction: float) -> None:
        if fraction >= 2 / 7:
            cancel.set()

    result = evaluate_path(path, splits, points=7, progress=stop_after_two, cancel=cancel)
    assert result.ts == [0.0, 1 / 6] and not result.complete and result.barrier["forget"] is None


def test_rouge_along_the_path_ends_at_the_endpoints_own_answers(full_model, simu_like_b, splits):
    from simu_core.metrics import rouge_l_recall
    from simu_core.models import greedy_answers

    small = {name: qa.QADataset(name, ds.items[:6]) for name, ds in splits.items()}
    path = make_path(full_model, _loaded(full_model, simu_like_b), "linear")
    result = evaluate_path(path, small, points=2, rouge=True, max_new_tokens=24)
    for name, ds in small.items():
        for i, model in enumerate((full_model.model, simu_like_b)):
            answers = greedy_answers(model, full_model.tokenizer, full_model.fmt, ds.questions(), 24)
            expected = np.mean([rouge_l_recall(a, r) for a, r in zip(answers, ds.answers(), strict=True)])
            assert result.rouge_l[name][i] == pytest.approx(expected, abs=1e-12)
    assert result.rouge_l["forget"][0] > result.rouge_l["forget"][1]  # B forgot
    assert "forget ROUGE-L" in [trace.name for trace in figures.path_figure(result).data]


# --------------------------------------------------------------------------------------------
# Fitting the bend
# --------------------------------------------------------------------------------------------


def test_bend_gradient_matches_a_finite_difference(full_model, simu_like_b, splits):
    """d objective / d C along a random direction, against a central difference, all in float64."""
    a64 = LoadedModel(copy.deepcopy(full_model.model).double(), full_model.tokenizer, full_model.fmt, "A", "A")
    path = make_path(a64, copy.deepcopy(simu_like_b).double(), "bezier")
    forget = {k: v for k, v in _batch(full_model, qa.QADataset("f", splits["forget"].items[:6])).items()}
    retain = {k: v for k, v in _batch(full_model, qa.QADataset("r", splits["retain"].items[:6])).items()}
    t = 0.4
    with connectivity.grad_on_carried(path):
        connectivity.bend_gradient(path, t, forget, retain)
    directions = [torch.randn_like(b) for b in path.bends()]
    norm = sum(float((v**2).sum()) for v in directions) ** 0.5
    directions = [v / norm for v in directions]  # unit length, so eps is the step length
    analytic = sum(float((b.grad * v).sum()) for b, v in zip(path.bends(), directions, strict=True))

    def objective(shift: float) -> float:
        with torch.no_grad():
            for b, v in zip(path.bends(), directions, strict=True):
                b.add_(shift * v)
            value = float(connectivity.path_objective(path.at(t), forget, retain))
            for b, v in zip(path.bends(), directions, strict=True):
                b.sub_(shift * v)
        return value

    eps = 3e-2
    numeric = (objective(eps) - objective(-eps)) / (2 * eps)
    # float64 model, but HF Llama computes RMSNorm and rotary embeddings in float32, so the objective
    # carries ~1e-7 relative rounding noise: with a unit direction, eps = 3e-2 keeps that noise
    # (~1e-8 / eps) and the O(eps^2) truncation each below 1e-4 of the derivative (measured: 1e-5).
    assert analytic == pytest.approx(numeric, rel=1e-3)
    assert abs(analytic) > 1e-4  # the check is not vacuous


def test_fitting_the_bend_lowers_the_mean_loss_compared_with_the_linear_path(full_model, simu_like_b, splits):
    path = make_path(full_model, _loaded(full_model, simu_like_b), "bezier")
    linear = evaluate_path(path.as_curve("linear"), splits, points=11)
    history = fit_bend(path, splits["forget"], splits["retain"], FitConfig(steps=40, lr=1e-2, batch_size=20))
    fitted = evaluate_path(path, splits, points=11)

    def objective(result) -> float:  # the fit's objective: equal weights of forget and retain
        return (result.mean_loss["forget"] + result.mean_loss["retain"]) / 2

    print(
        f"\nmean loss along the path (nats/token): linear {objective(linear):.4f} "
        f"(forget {linear.mean_loss['forget']:.4f}, retain {linear.mean_loss['retain']:.4f}); "
        f"fitted bezier {objective(fitted):.4f} (forget {fitted.mean_loss['forget']:.4f}, "
        f"retain {fitted.mean_loss['retain']:.4f}); fit {history.steps} steps in {history.seconds:.1f} s"
    )
    assert objective(fitted) < 0.8 * objective(linear)
    for name in splits:  # the endpoints stay fixed
        assert fitted.losses[name][0] == linear.losses[name][0]
        assert fitted.losses[name][-1] == linear.losses[name][-1]


def test_fit_is_seeded_reports_progress_and_cancels(full_model, simu_like_b, splits):
    def run(cancel_after: int | None) -> tuple[list, list]:
        path = make_path(full_model, _loaded(full_model, simu_like_b), "chain")
        cancel, seen = threading.Event(), []

        def progress(step: int, loss: float) -> None:
            seen.append((step, loss))
            if cancel_after is not None and step == cancel_after:
                cancel.set()

        history = fit_bend(
            path, splits["forget"], splits["retain"], FitConfig(steps=6, batch_size=16), progress, cancel
        )
        assert history.cancelled == (cancel_after is not None)
        assert [s for s, _ in seen] == list(range(1, history.steps + 1))
        return history.ts, history.losses

    ts, losses = run(None)
    assert len(losses) == 6 and run(None) == (ts, losses)
    assert run(3) == (ts[:3], losses[:3])


def test_a_linear_path_has_no_bend_to_fit(full_model, simu_like_b, splits):
    path = make_path(full_model, _loaded(full_model, simu_like_b), "linear")
    with pytest.raises(SimuError, match="no bend"):
        fit_bend(path, splits["forget"], splits["retain"])


# --------------------------------------------------------------------------------------------
# Figure and CLI
# --------------------------------------------------------------------------------------------


def test_path_figure_shows_both_splits_the_barrier_and_units(full_model, simu_like_b, splits):
    path = make_path(full_model, _loaded(full_model, simu_like_b), "bezier")
    result = evaluate_path(path, splits, points=3)
    result.linear = evaluate_path(path.as_curve("linear"), splits, points=3)
    fig = figures.path_figure(result)
    names = [trace.name for trace in fig.data]
    assert {"forget (bezier)", "retain (bezier)", "forget (linear)", "retain (linear)"} <= set(names)
    barrier = next(trace for trace in fig.data if trace.name == "forget barrier")
    assert barrier.y[0] == max(result.losses["forget"])
    assert "nats" in fig.layout.yaxis.title.text and fig.layout.xaxis.title.text.startswith("t")


def test_cli_connect_writes_the_result(full_model, simu_like_b, builtin_dir, tmp_path, capsys):
    folder = tmp_path / "b"
    simu_like_b.save_pretrained(folder, safe_serialization=True)
    full_model.tokenizer.save_pretrained(folder)
    out = tmp_path / "path.json"
    code = cli.main(
        [
            "connect",
            *("--a", str(builtin_dir / "models" / "full"), "--b", str(folder), "--curve", "chain"),
            *("--points", "3", "--fit-steps", "2", "--retain-sample", "10", "--device", "cpu"),
            *("--forget", str(builtin_dir / "data" / "forget10.jsonl")),
            *("--retain", str(builtin_dir / "data" / "retain10.jsonl")),
            *("--out", str(out), "--html", str(tmp_path / "path.html"), "--json"),
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert saved["result"]["barrier"] == summary["barrier"] and saved["result"]["fit"]["steps"] == 2
    assert saved["result"]["linear"]["curve"] == "linear" and len(saved["result"]["ts"]) == 3
    assert saved["config"]["curve"] == "chain" and (tmp_path / "path.html").stat().st_size > 0


def test_cli_connect_unknown_model_is_a_user_error(tmp_path, capsys):
    code = cli.main(["connect", "--a", str(tmp_path / "nope"), "--b", str(tmp_path / "nope"), "--out", "x.json"])
    assert code == 2 and "not found" in capsys.readouterr().err
