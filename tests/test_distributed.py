"""Several processes: shares of a batch, the launcher's arguments, and two gloo processes against one."""

from __future__ import annotations

import json

import pytest
import torch

from simu_core import data as qa
from simu_core.distributed import Group, check_batch_sizes, share_of
from simu_core.errors import SimuError
from simu_core.losses import LossInputs, get_loss


def _batch(full_model, dataset: str, builtin_dir, rows: int) -> dict:
    items = qa.load_data(str(builtin_dir / "data" / f"{dataset}.jsonl")).items[:rows]
    encoded = qa.encode_dataset(full_model.tokenizer, full_model.fmt, qa.QADataset(dataset, items))
    return qa.collate(encoded, qa.pad_id_of(full_model.tokenizer))


def _grads(model, loss_name: str, forget, retain, forget_weight=1.0, retain_weight=1.0) -> list[torch.Tensor]:
    inputs = LossInputs(model, forget, retain, model, 2.0, 0.1, forget_weight, retain_weight)
    params = [p for p in model.parameters()]
    return torch.autograd.grad(get_loss(loss_name)(inputs).total, params, allow_unused=True)


@pytest.mark.parametrize("loss", ["graddiff", "npo"])
def test_weighted_shards_sum_to_the_full_batch_gradient(full_model, builtin_dir, loss):
    """The processes' weighted gradients add up to the one-process gradient (token shares for the
    token-mean terms, row shares for NPO's per-sequence term), however unevenly the tokens split."""
    import copy

    model = copy.deepcopy(full_model.model).float().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    forget, retain = _batch(full_model, "forget10", builtin_dir, 5), _batch(full_model, "retain10", builtin_dir, 6)
    full = _grads(model, loss, forget, retain)
    total = [torch.zeros_like(g) for g in full]
    for rows_f, rows_r in ((slice(0, 3), slice(0, 2)), (slice(3, 5), slice(2, 6))):
        f = share_of(forget, {k: v[rows_f] for k, v in forget.items()})
        r = share_of(retain, {k: v[rows_r] for k, v in retain.items()})
        weight = f.row_weight if loss == "npo" else f.token_weight
        for acc, g in zip(total, _grads(model, loss, f.batch, r.batch, weight, r.token_weight), strict=True):
            acc += g
    for a, b in zip(full, total, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_process_without_rows_gets_one_row_at_weight_zero(full_model, builtin_dir):
    batch = _batch(full_model, "forget10", builtin_dir, 2)
    share = share_of(batch, {k: v[2:] for k, v in batch.items()})
    assert share.empty and share.token_weight == 0.0 and share.batch["input_ids"].shape[0] == 1


def test_one_process_is_the_identity():
    group = Group("cpu")
    t = torch.arange(3.0)
    assert group.world == 1 and group.is_main and group.reduce_sum([t, None])[0] is t
    assert group.split([1, 2, 3]) == [1, 2, 3] and group.any(True) and not group.any(False)


def test_batches_smaller_than_the_process_count_are_refused():
    group = Group("cpu")
    group.world = 4  # as a 4-process launch would see it
    with pytest.raises(SimuError, match="smaller than the 4 processes"):
        check_batch_sizes(group, 8, 2)


def test_the_processes_flag_is_dropped_from_what_the_launcher_runs():
    from simu_core.cli import _without_processes

    argv = ["unlearn", "--processes", "2", "--steps", "3", "--processes=4", "--json"]
    assert _without_processes(argv) == ["unlearn", "--steps", "3", "--json"]


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_two_gloo_processes_give_the_one_process_weights(shard, builtin_dir, tmp_path, capfd):
    """`--processes 2` (accelerate launch, gloo) against one process, same seed and settings; data
    parallel, and with `--shard` (FSDP holds half of every weight per process, the compact leaves
    are whole on both, and each writes its rows of the updated slices).

    Tolerance: the two processes' gradients are each a weighted mean over their rows, summed across
    processes; one process takes one mean over all rows. The float sums run in a different order, so
    gradients differ in the last bits (~1e-7 relative). Sophia's clip(m / max(rho h, eps), -1, 1)
    passes most coordinates at exactly +-lr, but where m nearly cancels, the small difference is
    amplified; measured: 3 of 21,840 entries differ by more than 1e-8, the largest by 2.4e-5 after
    8 steps at lr 1e-3. So: every entry within lr / 10, and 99.9% within 1e-6. `sqgrad` (curvature
    from the summed gradient) makes the curvature the same too; GNB samples labels per process.
    Entries outside the mask never change: bit-identical to the base model in both runs. (Sharded,
    measured: the largest difference 8.1e-6, 99.996% of the entries within 1e-6.)
    """
    from simu_core.cli import main
    from simu_core.models import load_model
    from simu_core.neurons import NeuronMask
    from simu_core.runs import load_run

    args = ["unlearn", "--model", str(builtin_dir / "models" / "full"),
            "--forget", str(builtin_dir / "data" / "forget10.jsonl"),
            "--retain", str(builtin_dir / "data" / "retain10.jsonl"), "--method", "simu",
            "--mask-method", "grad_x_act", "--estimator", "sqgrad", "--steps", "8", "--batch-size", "8",
            "--retain-batch-size", "8", "--no-early-stop", "--device", "cpu", "--json",
            *(["--shard"] if shard else [])]  # fmt: skip
    folders = {}
    for n in (1, 2):
        assert main([*args, "--runs-dir", str(tmp_path / str(n)), "--processes", str(n)]) == 0
        summary = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
        assert summary["processes"] == n and summary["status"] == "ok"
        assert summary["sharded"] == (shard and n == 2)
        folders[n] = summary["run_dir"]
        assert len(list((tmp_path / str(n)).iterdir())) == 1  # only the main process wrote a folder
    base = load_model(str(builtin_dir / "models" / "full"), device="cpu").model.state_dict()
    one, two = (load_run(folders[n], device="cpu").model.state_dict() for n in (1, 2))
    mask = NeuronMask.load(f"{folders[1]}/mask.safetensors")
    assert torch.equal(torch.cat([m.flatten() for m in mask.layers]),
                       torch.cat([m.flatten() for m in NeuronMask.load(f"{folders[2]}/mask.safetensors").layers]))  # fmt: skip
    _outside_mask(one, base, mask)
    _outside_mask(two, base, mask)
    for name, w in base.items():
        if "mlp" not in name:  # attention off in the preset: untouched everywhere
            assert torch.equal(one[name], w) and torch.equal(two[name], w), name
    diff = torch.cat([(one[name] - two[name]).abs().flatten() for name in base if "mlp" in name])
    assert float(diff.max()) <= 1e-3 / 10
    assert float((diff <= 1e-6).float().mean()) >= 0.999


def _outside_mask(weights: dict, base: dict, mask) -> None:
    """Assert that `weights` equal `base` bit for bit outside the mask's neuron slices (MLP weights)."""
    for name, w in base.items():
        if "mlp" in name:
            keep = mask.layers[int(name.split("layers.")[1].split(".")[0])].bool()
            dim, outside = (1 if "down_proj" in name else 0), (~keep).nonzero().flatten()
            assert torch.equal(weights[name].index_select(dim, outside), w.index_select(dim, outside)), name


@pytest.mark.slow
def test_sharded_simu_with_attention_and_gate_up_rows_matches_data_parallel(builtin_dir, tmp_path, capfd):
    """SIMU with trainable attention (FSDP reduces its gradients) and gate/up rows (slices on the sharded
    dim 0) on three gloo processes, sharded against data parallel: 256 neuron rows split 86 / 86 / 84
    and 64 attention rows 22 / 22 / 20, so every process writes another, unequal part of each slice.

    Both runs give each process the same rows; only the order of float sums differs (FSDP's gathered
    weights and reduce-scatter), which Sophia's clip amplifies where m nearly cancels: measured, 71 of
    196,928 entries differ at all (99.964% within 1e-6), the largest by 2 lr (one step taken the
    other way; the one-process run differs from both as much). So: 99.9% of the entries within 1e-6,
    every one within 2 lr + 1e-6. The entries outside the mask are bit-identical to the base in both,
    and the attention part of the optimiser state is a third per process (state bytes drop; the
    compact slices' state is whole on each).
    """
    from simu_core.cli import main
    from simu_core.models import load_model
    from simu_core.neurons import NeuronMask
    from simu_core.runs import load_run

    args = ["unlearn", "--model", str(builtin_dir / "models" / "full"),
            "--forget", str(builtin_dir / "data" / "forget10.jsonl"),
            "--retain", str(builtin_dir / "data" / "retain10.jsonl"), "--method", "simu", "--attention",
            "--mlp-parts", "down_up", "--mask-method", "grad_x_act", "--estimator", "sqgrad", "--steps", "8",
            "--batch-size", "8", "--retain-batch-size", "8", "--no-early-stop", "--device", "cpu", "--json",
            "--processes", "3"]  # fmt: skip
    runs = {}
    for shard in (False, True):
        assert main([*args, "--runs-dir", str(tmp_path / str(shard)), *(["--shard"] if shard else [])]) == 0
        runs[shard] = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
        assert runs[shard]["status"] == "ok" and runs[shard]["sharded"] == shard
    assert runs[True]["state_bytes"] < runs[False]["state_bytes"]
    base = load_model(str(builtin_dir / "models" / "full"), device="cpu").model.state_dict()
    plain, sharded = (load_run(runs[s]["run_dir"], device="cpu").model.state_dict() for s in (False, True))
    mask = NeuronMask.load(f"{runs[True]['run_dir']}/mask.safetensors")
    _outside_mask(plain, base, mask)
    _outside_mask(sharded, base, mask)
    assert not torch.equal(
        sharded["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    diff = torch.cat([(plain[name] - sharded[name]).abs().flatten() for name in base])
    assert float(diff.max()) <= 2 * 1e-3 + 1e-6
    assert float((diff <= 1e-6).float().mean()) >= 0.999


@pytest.mark.slow
def test_two_gloo_processes_attribute_like_one(builtin_dir, tmp_path, capfd):
    """Each process scores its half of the items; the per-neuron sums over items, added across the two
    processes, equal one process's up to float summation order (relative 1e-4 of the layer's largest)."""
    from simu_core.cli import main
    from simu_core.neurons import NeuronScores

    args = ["attribute", "--model", str(builtin_dir / "models" / "full"),
            "--data", str(builtin_dir / "data" / "forget10.jsonl"), "--method", "simu_ig", "--steps", "3",
            "--device", "cpu", "--json"]  # fmt: skip
    scores = {}
    for n in (1, 2):
        out = tmp_path / f"scores{n}.safetensors"
        assert main([*args, "--out", str(out), "--processes", str(n)]) == 0
        assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["processes"] == n
        scores[n] = NeuronScores.load(out)
    assert scores[1].n_examples == scores[2].n_examples == 20
    for one, two in zip(scores[1].layers, scores[2].layers, strict=True):
        torch.testing.assert_close(two, one, rtol=0, atol=1e-4 * float(one.abs().max()))


# --------------------------------------------------------------------------------------------
# Sharding (FSDP) for the methods that train whole tensors
# --------------------------------------------------------------------------------------------


def test_the_sharded_gnb_estimate_is_the_one_process_estimate(full_model, builtin_dir):
    """On one process (positions = its own rows) the backward-based GNB that sharded runs use gives
    `gnb_diagonal`'s estimate for the same sampled labels (float32 rounding: rtol 1e-5), and it leaves
    the step's own gradients in `.grad` as they were."""
    import copy

    from simu_core.optim import gnb_diagonal, gnb_diagonal_sharded

    model = copy.deepcopy(full_model.model).float().eval()
    params = [p.requires_grad_(True) for p in model.parameters()]
    batch = _batch(full_model, "forget10", builtin_dir, 4)

    def logits() -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out[:, :-1][batch["labels"][:, 1:] != -100]

    expected = gnb_diagonal(logits(), params, torch.Generator().manual_seed(3))
    kept = [torch.full_like(p, 0.5) for p in params]
    for p, g in zip(params, kept, strict=True):
        p.grad = g
    rows = logits()
    got = gnb_diagonal_sharded(rows, params, rows.shape[0], torch.Generator().manual_seed(3))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
    assert all(p.grad is g for p, g in zip(params, kept, strict=True))


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"method": "so_graddiff", "estimator": "hutchinson"}, "no double backward"),
     ({"method": "simu", "estimator": "hutchinson"}, "no double backward")],
)  # fmt: skip
def test_shard_is_refused_where_it_cannot_apply(settings, message):
    from simu_core.methods import preset_config
    from simu_core.unlearn import validate_config

    config = preset_config(settings.pop("method"), shard=True, **settings)
    with pytest.raises(SimuError, match=message):
        validate_config(config)


def test_shard_on_one_process_is_an_ordinary_run(full_model, builtin_dir):
    """Without a launcher there is nothing to shard over: the run is the unsharded one, bit for bit."""
    from simu_core.methods import preset_config
    from simu_core.unlearn import unlearn

    forget = qa.load_data(str(builtin_dir / "data" / "forget10.jsonl"))
    retain = qa.load_data(str(builtin_dir / "data" / "retain10.jsonl"))
    runs = [unlearn(full_model, forget, retain, preset_config("fo_graddiff", steps=2, batch_size=4, retain_batch_size=4,
                                                              shard=shard, device="cpu"))
            for shard in (False, True)]  # fmt: skip
    for a, b in zip(runs[0].model.model.parameters(), runs[1].model.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["so_graddiff", "fo_graddiff"])
def test_two_sharded_gloo_processes_give_the_one_process_weights(method, builtin_dir, tmp_path, capfd):
    """`--processes 2 --shard` (FSDP over two gloo processes) against one process, same seed and settings.

    Each process keeps half of every weight, gradient and optimiser moment (state bytes per process
    halve); only the main process writes the run. Tolerance as for data parallelism (see above): the
    gradients are summed in another order (FSDP's reduce-scatter), so they differ in the last bits,
    which Sophia's clip amplifies where m nearly cancels, and AdamW's m / sqrt(v) where v is tiny.
    Measured: ~20 of 196,928 entries differ by more than 1e-8 (the largest 4e-5 for SOUL). So: every
    entry within lr / 2 (no entry moved in another direction for a whole step), 99.9% within 1e-6.
    `sqgrad` makes SOUL's curvature the squared summed gradient, the same on one and two processes.
    """
    from simu_core.cli import main
    from simu_core.runs import load_run, read_config

    args = ["unlearn", "--model", str(builtin_dir / "models" / "full"),
            "--forget", str(builtin_dir / "data" / "forget10.jsonl"),
            "--retain", str(builtin_dir / "data" / "retain10.jsonl"), "--method", method,
            "--steps", "6", "--batch-size", "8", "--retain-batch-size", "8", "--no-early-stop", "--device", "cpu",
            "--shard", "--json"]  # fmt: skip
    if method == "so_graddiff":
        args += ["--estimator", "sqgrad"]
    summaries = {}
    for n in (1, 2):
        assert main([*args, "--runs-dir", str(tmp_path / str(n)), "--processes", str(n)]) == 0
        summaries[n] = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
        assert summaries[n]["status"] == "ok" and summaries[n]["sharded"] == (n == 2)
        assert len(list((tmp_path / str(n)).iterdir())) == 1  # only the main process wrote a folder
    assert summaries[2]["state_bytes"] == summaries[1]["state_bytes"] // 2
    one, two = (load_run(summaries[n]["run_dir"], device="cpu").model.state_dict() for n in (1, 2))
    diff = torch.cat([(one[name] - two[name]).abs().flatten() for name in one])
    lr = read_config(summaries[1]["run_dir"]).lr
    assert float(diff.max()) <= lr / 2
    assert float((diff <= 1e-6).float().mean()) >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("method", ["so_graddiff", "simu"])
def test_a_sharded_run_estimates_gnb_curvature_across_the_processes(method, builtin_dir, tmp_path, capfd):
    """SOUL's preset estimator (GNB) through FSDP. The labels are sampled per process, so the run is
    not the one-process run bit for bit; Sophia clips most coordinates to the same +-lr step either
    way, and the curvature only decides the few unclipped ones. Measured after 3 steps: unclipped
    share 1.47% sharded vs 1.03% on one process, 96.5% of the weights within 1e-6. So: the shares
    within a factor 2 of each other (a lost or zero estimate would leave nothing unclipped; one
    scaled by the process count would move the share by about that factor), and 95% within 1e-6.
    SIMU (10 steps): its slices' GNB gradients are summed outside FSDP; measured share 0.0048 sharded vs
    0.0034 on one process, and 0.0186 when that sum was left out; 99.4% of the weights within 1e-6."""
    from simu_core.cli import main
    from simu_core.runs import load_run

    args = ["unlearn", "--model", str(builtin_dir / "models" / "full"),
            "--forget", str(builtin_dir / "data" / "forget10.jsonl"),
            "--retain", str(builtin_dir / "data" / "retain10.jsonl"), "--method", method, "--estimator", "gnb",
            "--steps", "3" if method == "so_graddiff" else "10", "--batch-size", "8", "--retain-batch-size", "8",
            "--no-early-stop", "--device", "cpu", "--shard", "--json",
            *(["--mask-method", "grad_x_act"] if method == "simu" else [])]  # fmt: skip
    runs = {}
    for n in (1, 2):
        assert main([*args, "--runs-dir", str(tmp_path / str(n)), "--processes", str(n)]) == 0
        runs[n] = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert 0.5 <= runs[2]["unclipped_mean"] / runs[1]["unclipped_mean"] <= 2.0
    one, two = (load_run(runs[n]["run_dir"], device="cpu").model.state_dict() for n in (1, 2))
    diff = torch.cat([(one[name] - two[name]).abs().flatten() for name in one])
    assert float((diff <= 1e-6).float().mean()) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize(("method", "shard"), [("so_graddiff", False), ("so_graddiff", True), ("simu", True)])
def test_rho_calibrated_on_two_processes_is_one_rho_near_the_one_process_rho(
    method, shard, builtin_dir, tmp_path, capfd
):
    """`--rho-share 0.3` on two gloo processes, data parallel and sharded. Both processes must run with one
    rho: the probe's curvature is averaged (data parallel) or spans the processes (sharded) as in the run,
    and sharded processes pool the ratios of their own coordinates. With sqgrad the state is the one-process
    state up to float order, so the rho (a 0.3-quantile of ~200,000 sampled ratios; sharded: 100,000 from
    each half) is one process's: measured 320.7052 vs 320.7050 both ways, so within 1e-4 relative (sampling
    other coordinates moves such a quantile by well under 1%: a wrong pooling would show). The unclipped
    share, 0.075 over these 4 steps on both (the preset's rho leaves 0.2-1%), agrees within 0.005.
    SIMU sharded, with trainable attention: the attention state is split over the processes and the
    slices' state whole on each, which only the main process adds to the pool (measured: rho 82.5126
    vs 82.5123 on one process, unclipped share 0.067 on both)."""
    from simu_core.cli import main

    args = ["unlearn", "--model", str(builtin_dir / "models" / "full"),
            "--forget", str(builtin_dir / "data" / "forget10.jsonl"),
            "--retain", str(builtin_dir / "data" / "retain10.jsonl"), "--method", method, "--estimator",
            "sqgrad", "--rho-share", "0.3", "--steps", "4", "--batch-size", "8", "--retain-batch-size", "8",
            "--no-early-stop", "--device", "cpu", "--json", *(["--shard"] if shard else []),
            *(["--mask-method", "grad_x_act", "--attention"] if method == "simu" else [])]  # fmt: skip
    runs = {}
    for n in (1, 2):
        assert main([*args, "--runs-dir", str(tmp_path / str(n)), "--processes", str(n)]) == 0
        runs[n] = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
        assert runs[n]["status"] == "ok" and runs[n]["unclipped_mean"] > 0.05
    assert runs[2]["rho"] == pytest.approx(runs[1]["rho"], rel=1e-4)
    assert runs[2]["unclipped_mean"] == pytest.approx(runs[1]["unclipped_mean"], abs=0.005)


# --------------------------------------------------------------------------------------------
# Evaluation on several processes
# --------------------------------------------------------------------------------------------


def test_statistics_of_parts_concatenate_to_the_whole(full_model, builtin_dir):
    """`concat_stats` of two consecutive parts is `token_stats` of all sequences: the [N, A] arrays of
    the part with shorter answers are padded (NaN / False). Tolerance 1e-5: other batches, other sums."""
    import numpy as np

    from simu_core.metrics.likelihood import concat_stats, token_stats

    items = qa.load_data(str(builtin_dir / "data" / "forget10.jsonl")).items[:9]
    examples = qa.encode_dataset(full_model.tokenizer, full_model.fmt, qa.QADataset("f", items))
    pad = qa.pad_id_of(full_model.tokenizer)
    whole = token_stats(full_model.model, examples, pad, 4, full=True)
    parts = concat_stats([token_stats(full_model.model, examples[:4], pad, 4, full=True),
                          token_stats(full_model.model, examples[4:], pad, 4, full=True)])  # fmt: skip
    assert np.array_equal(parts.n_tokens, whole.n_tokens) and np.array_equal(parts.correct, whole.correct)
    np.testing.assert_allclose(parts.log_probs, whole.log_probs, rtol=1e-5, atol=1e-5)  # NaN padding in the same places
    np.testing.assert_allclose(parts.nll_sum, whole.nll_sum, rtol=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_evaluate_like_one(builtin_dir, tmp_path, capfd):
    """`evaluate --processes 2`: each process scores half of every split's items and all get every
    value back in order, so the report is one process's: the same greedy answers, every value within
    1e-5 (relative; teacher-forced NLLs come from other batches), only the main process writes."""
    import math

    from simu_core.cli import main

    data = builtin_dir / "data"
    args = ["evaluate", "--model", str(builtin_dir / "models" / "full"), "--data", str(data / "forget10.jsonl"),
            "--retain", str(data / "retain10.jsonl"), "--holdout", str(data / "holdout.jsonl"),
            "--world-facts", str(data / "world_facts.jsonl"), "--reference", str(builtin_dir / "models" / "retain10"),
            "--max-items", "30", "--batch-size", "8", "--device", "cpu", "--json"]  # fmt: skip
    reports = {}
    for n in (1, 2):
        out = tmp_path / str(n) / "metrics.json"
        assert main([*args, "--out", str(out), "--processes", str(n)]) == 0
        assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["processes"] == n
        assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json", "report.html"]
        reports[n] = json.loads(out.read_text(encoding="utf-8"))
    one, two = reports[1], reports[2]
    assert one["summary"].keys() == two["summary"].keys()
    for key, value in one["summary"].items():
        other = two["summary"][key]
        assert (value is None and other is None) or math.isclose(value, other, rel_tol=1e-5, abs_tol=1e-8), key
    for split, result in one["splits"].items():
        assert result["generations"] == two["splits"][split]["generations"], split
        for metric, values in result["values"].items():
            assert values == pytest.approx(two["splits"][split]["values"][metric], rel=1e-5, abs=1e-8, nan_ok=True)
