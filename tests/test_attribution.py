"""Neuron attribution: each method against an independent reference (Captum, a hand-written
formula, completeness), invariances, localisation against random neurons, and bad inputs.

References in this file build their own batches (`data.collate`, right padding), their own
answer log-likelihood (`F.cross_entropy`) and their own hooks, so they share no code with
`simu_core.attribution` beyond the model and tokenizer.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerGradientXActivation

from simu_core import data as qa
from simu_core.arch import neuron_layers
from simu_core.attribution import (
    METHODS,
    attribute,
    attribute_examples,
    token_attribution,
)
from simu_core.cli import main
from simu_core.errors import SimuError
from simu_core.masks import make_mask, random_mask_like
from simu_core.neurons import NeuronScores

N_SMALL = 6  # examples for the Captum comparisons (keeps each test well under a second)


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def ref_loglik(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Per-example sum of answer-token log-probabilities [B], via cross_entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none")
    return -nll.sum(1)


def ref_batch(loaded, dataset, n):
    examples = qa.encode_dataset(loaded.tokenizer, loaded.fmt, dataset)[:n]
    return examples, qa.collate(examples, qa.pad_id_of(loaded.tokenizer), "right")


def capture_inputs(model, batch) -> list[torch.Tensor]:
    """The inputs of every output projection on `batch` (detached), via plain forward hooks."""
    seen = []
    handles = [
        layer.down.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
        for layer in neuron_layers(model)
    ]
    with torch.no_grad():
        ref_loglik(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    for h in handles:
        h.remove()
    return seen


def answer_positions(labels) -> torch.Tensor:
    """[B, T] float: 1 where position t predicts an answer token (labels[t + 1] scored)."""
    mask = torch.zeros(labels.shape)
    mask[:, :-1] = (labels[:, 1:] != -100).float()
    return mask


def loglik_with(model, batch, layer_index, value_fn) -> torch.Tensor:
    """Answer log-likelihood [B] with layer `layer_index`'s activation x replaced by value_fn(x)."""
    down = neuron_layers(model)[layer_index].down
    handle = down.register_forward_pre_hook(lambda mod, args: (value_fn(args[0]),))
    try:
        return ref_loglik(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    finally:
        handle.remove()


def injected_loglik(model, layer_index):
    """f(act, ids, attention_mask, labels) -> answer log-likelihood [B] with `act` as layer's activation."""

    def forward(act, input_ids, attention_mask, labels):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return loglik_with(model, batch, layer_index, lambda x: act)

    return forward


def assert_scores_close(ours: NeuronScores, ref: list[torch.Tensor], rel: float) -> None:
    """Every layer within `rel` x (largest |score| of that layer) of the reference."""
    for layer, (a, b) in enumerate(zip(ours.layers, ref, strict=True)):
        scale = float(b.abs().max())
        assert float((a.double() - b.double()).abs().max()) <= rel * scale, f"layer {layer}"


@pytest.fixture(scope="module")
def forget(builtin_dir):
    return qa.load_data("builtin:forget10", root=builtin_dir)


@pytest.fixture(scope="module")
def retain(builtin_dir):
    return qa.load_data("builtin:retain10", root=builtin_dir)


# --------------------------------------------------------------------------------------------
# Agreement with Captum
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["grad_x_act", "captum_gxa"])
def test_grad_x_act_equals_captum_layer_gradient_x_activation(full_model, forget, method):
    examples, batch = ref_batch(full_model, forget, N_SMALL)
    model = full_model.model

    def forward(ids, attention_mask, labels):
        return ref_loglik(model, ids, attention_mask, labels)

    gxa = LayerGradientXActivation(forward, [layer.down for layer in neuron_layers(model)])
    attrs = gxa.attribute(
        batch["input_ids"],
        additional_forward_args=(batch["attention_mask"], batch["labels"]),
        attribute_to_layer_input=True,
    )
    ref = [(a[0] if isinstance(a, tuple) else a).detach().sum((0, 1)) for a in attrs]
    ours = attribute_examples(model, examples, qa.pad_id_of(full_model.tokenizer), method=method, batch_size=4)
    # Same float32 maths in other batch shapes. Memorised tokens have p ~ 1, so dlog p/dlogit = 1 - p is
    # resolved to ~1e-7 absolute only (~1e-3 relative when 1 - p ~ 1e-4); measured 1e-4 of the largest
    # score, held to 1e-3.
    assert_scores_close(ours, ref, 1e-3)


@pytest.mark.parametrize("positions", ["all", "answer"])
@pytest.mark.parametrize("method", ["simu_ig", "captum_ig"])
def test_simu_ig_equals_captum_integrated_gradients_over_the_activation(full_model, forget, method, positions):
    examples, batch = ref_batch(full_model, forget, N_SMALL)
    model, steps = full_model.model, 4
    reals = capture_inputs(model, batch)
    scaled = batch["attention_mask"].float() if positions == "all" else answer_positions(batch["labels"])
    ref = []
    for index, real in enumerate(reals):
        ig = IntegratedGradients(injected_loglik(model, index))
        baseline = real * (1 - scaled).unsqueeze(-1)  # zero where scaled; the real value elsewhere
        extra = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        attr = ig.attribute(
            real, baselines=baseline, additional_forward_args=extra, n_steps=steps, method="riemann_right"
        )
        ref.append(attr.detach().sum((0, 1)))
    ours = attribute_examples(
        model, examples, qa.pad_id_of(full_model.tokenizer), method, steps, batch_size=4, positions=positions
    )
    # Same Riemann-right points and float32 arithmetic, different batching: 1e-4 of the largest score.
    assert_scores_close(ours, ref, 1e-4)


def test_simu_ig_joint_equals_captum_integrated_gradients_over_all_layers_at_once(full_model, forget):
    """The joint path: Captum IG over the tuple of every layer's injected activation."""
    examples, batch = ref_batch(full_model, forget, N_SMALL)
    model, steps = full_model.model, 4
    reals = capture_inputs(model, batch)
    downs = [layer.down for layer in neuron_layers(model)]

    def forward(*args):
        acts, (ids, attention_mask, labels) = args[: len(downs)], args[len(downs) :]
        handles = [d.register_forward_pre_hook(lambda mod, a, v=v: (v,)) for d, v in zip(downs, acts, strict=True)]
        try:
            return ref_loglik(model, ids, attention_mask, labels)
        finally:
            for h in handles:
                h.remove()

    attrs = IntegratedGradients(forward).attribute(
        tuple(reals),
        baselines=tuple(torch.zeros_like(r) for r in reals),
        additional_forward_args=(batch["input_ids"], batch["attention_mask"], batch["labels"]),
        n_steps=steps,
        method="riemann_right",
    )
    ref = [a.detach().sum((0, 1)) for a in attrs]
    ours = attribute_examples(model, examples, qa.pad_id_of(full_model.tokenizer), "simu_ig_joint", steps, batch_size=4)
    # Same points and float32 arithmetic, different batching: 1e-4 of the largest score.
    assert_scores_close(ours, ref, 1e-4)


def test_ig_scores_of_a_layer_sum_to_the_loss_change_of_zeroing_it(full_model, forget):
    """Completeness: sum_k Att_l[k] -> L(real) - L(layer l zero) as the grid gets finer.

    The right Riemann sum has an O(1/m) error, so Richardson extrapolation 2 S(2m) - S(m)
    (O(1/m^2); measured within 0.01%) is held to 0.5%, and the raw error must shrink with m.
    """
    examples, batch = ref_batch(full_model, forget, 4)
    model, pad = full_model.model, qa.pad_id_of(full_model.tokenizer)
    coarse = attribute_examples(model, examples, pad, "simu_ig", 64, batch_size=4)
    fine = attribute_examples(model, examples, pad, "simu_ig", 128, batch_size=4)
    with torch.no_grad():
        real = float(loglik_with(model, batch, 0, lambda x: x).sum())
        for layer in range(len(fine.layers)):
            delta = real - float(loglik_with(model, batch, layer, torch.zeros_like).sum())
            extrapolated = 2 * float(fine.layers[layer].sum()) - float(coarse.layers[layer].sum())
            assert extrapolated == pytest.approx(delta, rel=5e-3)
            # and the raw sums converge: doubling m roughly halves the error (O(1/m))
            assert abs(float(fine.layers[layer].sum()) - delta) < 0.6 * abs(float(coarse.layers[layer].sum()) - delta)


def test_captum_conductance_equals_the_conductance_formula(full_model, forget):
    """LayerConductance with zero embeddings as baseline: cond_l[k] = sum_j dL/da(alpha_j) *
    (a(alpha_{j+1}) - a(alpha_j)), alpha_j = j/m, written here with plain autograd."""
    examples, batch = ref_batch(full_model, forget, 3)
    model, steps = full_model.model, 4
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    layers = neuron_layers(model)
    acts, grads = [[] for _ in layers], [[] for _ in layers]
    for j in range(steps + 1):
        probes: list[torch.Tensor] = []

        def add_probe(mod, args, index, probes=probes):
            probe = torch.zeros_like(args[0], requires_grad=True)
            probes.append(probe)
            acts[index].append(args[0].detach())
            return (args[0] + probe,)

        handles = [
            layer.down.register_forward_pre_hook(lambda m, a, i=layer.index: add_probe(m, a, i)) for layer in layers
        ]
        with torch.enable_grad():
            out = model(inputs_embeds=embeds * (j / steps), attention_mask=batch["attention_mask"]).logits[:, :-1]
            nll = F.cross_entropy(out.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="sum")
        for h in handles:
            h.remove()
        for index, g in enumerate(torch.autograd.grad(-nll, probes)):
            grads[index].append(g)
    ref = [
        sum((grads[i][j] * (acts[i][j + 1] - acts[i][j])).sum((0, 1)) for j in range(steps)) for i in range(len(layers))
    ]
    ours = attribute_examples(
        model, examples, qa.pad_id_of(full_model.tokenizer), "captum_conductance", steps, batch_size=3
    )
    # float32, same points: 1e-4 of the layer's largest score.
    assert_scores_close(ours, ref, 1e-4)


def test_captum_layer_ig_integrates_from_the_all_padding_input_activation(full_model, forget):
    """LayerIntegratedGradients' baseline is the activation of an all-padding input (not zero):
    its scores sum to L(real) - L(that activation injected); Richardson-extrapolated, 0.5%."""
    examples, batch = ref_batch(full_model, forget, 3)
    model, pad = full_model.model, qa.pad_id_of(full_model.tokenizer)
    pad_batch = {**batch, "input_ids": torch.full_like(batch["input_ids"], pad)}
    baselines = capture_inputs(model, pad_batch)
    coarse = attribute_examples(model, examples, pad, "captum_layer_ig", 32, batch_size=3)
    fine = attribute_examples(model, examples, pad, "captum_layer_ig", 64, batch_size=3)
    with torch.no_grad():
        real = float(loglik_with(model, batch, 0, lambda x: x).sum())
        for layer, base in enumerate(baselines):
            delta = real - float(loglik_with(model, batch, layer, lambda x, b=base: b).sum())
            extrapolated = 2 * float(fine.layers[layer].sum()) - float(coarse.layers[layer].sum())
            assert extrapolated == pytest.approx(delta, rel=5e-3)


# --------------------------------------------------------------------------------------------
# Invariances and the model left alone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["grad_x_act", "simu_ig"])
def test_scores_do_not_depend_on_batch_size_or_padding_side(full_model, forget, method):
    examples = qa.encode_dataset(full_model.tokenizer, full_model.fmt, forget)
    pad = qa.pad_id_of(full_model.tokenizer)
    ref = attribute_examples(full_model.model, examples, pad, method, batch_size=len(examples))
    for batch_size, side in [(1, "right"), (7, "left")]:
        other = attribute_examples(full_model.model, examples, pad, method, batch_size=batch_size, padding_side=side)
        # float32 sums in a different order (measured ~1e-6): 1e-4 of the layer's largest score.
        assert_scores_close(other, ref.layers, 1e-4)


def test_attribution_leaves_the_model_untouched_and_works_when_frozen(full_model, forget):
    model = full_model.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    examples, _ = ref_batch(full_model, forget, N_SMALL)
    pad = qa.pad_id_of(full_model.tokenizer)
    scores = attribute_examples(model, examples, pad, "simu_ig", 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad == flags[k] for k, p in model.named_parameters())
    frozen = copy.deepcopy(model).requires_grad_(False)
    frozen_scores = attribute_examples(frozen, examples, pad, "simu_ig", 3)
    assert all(torch.equal(a, b) for a, b in zip(scores.layers, frozen_scores.layers, strict=True))


# --------------------------------------------------------------------------------------------
# Localisation: the top neurons matter for the forget set, more than random ones
# --------------------------------------------------------------------------------------------


def mean_nll(loaded, dataset, mask) -> float:
    """Mean answer-token NLL (nats) with the masked neurons' activations set to zero."""
    examples = qa.encode_dataset(loaded.tokenizer, loaded.fmt, dataset)
    batch = qa.collate(examples, qa.pad_id_of(loaded.tokenizer), "right")
    handles = [
        layer.down.register_forward_pre_hook(lambda mod, args, keep=~m: (args[0] * keep.to(args[0].dtype),))
        for layer, m in zip(neuron_layers(loaded.model), mask.layers, strict=True)
    ]
    try:
        with torch.no_grad():
            total = ref_loglik(loaded.model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum()
    finally:
        for h in handles:
            h.remove()
    return -float(total) / int((batch["labels"] != -100).sum())


@pytest.mark.parametrize(
    "method, rule, score",
    [("grad_x_act", "global_top", "forget"), ("simu_ig", "layer_percent", "forget_minus_retain")],
)
def test_zeroing_top_neurons_hurts_the_forget_set_more_than_random_neurons(
    full_model, forget, retain, method, rule, score
):
    """Top 1% (5-6 of 512 neurons) vs 8 random masks with the same per-layer counts.

    Measured on the 2x256 test model (build format 3): forget NLL +0.024 (grad_x_act) / +0.019
    (simu_ig) vs +0.0025 for random (largest random +0.009 / +0.008); retain +0.011 / +0.004. On
    the format-2 build the bounds held with a margin of 1.3x only, and with the plain forget score
    simu_ig's top neurons raised the retain loss as much as the forget loss (+0.011 vs +0.010), so
    simu_ig is checked with the forget-minus-retain score.
    """
    retain_part = qa.QADataset("retain_part", retain.items[:60])
    f_scores = attribute(full_model, forget, method, steps=5, batch_size=20)
    r_scores = attribute(full_model, retain_part, method, steps=5, batch_size=30)
    mask = make_mask(f_scores, rule, 1, retain=r_scores, score=score)
    base_f, base_r = mean_nll(full_model, forget, mask_none(mask)), mean_nll(full_model, retain, mask_none(mask))
    rise_f = mean_nll(full_model, forget, mask) - base_f
    rise_r = mean_nll(full_model, retain, mask) - base_r
    random_rises = [mean_nll(full_model, forget, random_mask_like(mask, seed)) - base_f for seed in range(8)]
    assert rise_f > 3 * sum(random_rises) / len(random_rises)
    assert rise_f > max(random_rises)
    assert rise_r < rise_f


def mask_none(mask):
    return type(mask)([torch.zeros_like(m) for m in mask.layers], "none", {})


# --------------------------------------------------------------------------------------------
# Scores files, token view, CLI
# --------------------------------------------------------------------------------------------


def test_scores_round_trip_through_safetensors(full_model, forget, tmp_path):
    examples, _ = ref_batch(full_model, forget, 3)
    scores = attribute_examples(
        full_model.model, examples, 0, "grad_x_act", data_name="f", model_name="m", batch_size=3
    )
    scores.save(tmp_path / "s.safetensors")
    back = NeuronScores.load(tmp_path / "s.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(scores.layers, back.layers, strict=True))
    assert back.meta() == scores.meta()
    assert json.loads((tmp_path / "s.safetensors.json").read_text())["method"] == "grad_x_act"


def test_token_attribution_rows_sum_to_the_log_prob_change(full_model, forget):
    """LayerIntegratedGradients on the embeddings: each answer token's row sums (completeness) to
    log p(token | prompt) - log p(token | prompt tokens replaced by padding). With 64 Gauss-Legendre
    steps the rows matched to 1e-4 (16 steps were 3% off on the first token), so 0.1% is held."""
    item = forget.items[0]
    view = token_attribution(full_model, item["question"], item["answer"], steps=64)
    enc = qa.encode(full_model.tokenizer, full_model.fmt, item["question"], item["answer"])
    assert len(view.prompt_tokens) == enc.n_prompt and len(view.matrix) == len(enc.ids) - enc.n_prompt
    pad = qa.pad_id_of(full_model.tokenizer)
    ids = torch.tensor([enc.ids])
    base_ids = ids.clone()
    base_ids[0, : enc.n_prompt] = pad
    with torch.no_grad():
        logp = torch.log_softmax(full_model.model(ids).logits[0, :-1], -1)
        base_logp = torch.log_softmax(full_model.model(base_ids).logits[0, :-1], -1)
    for row, t in zip(view.matrix, range(enc.n_prompt, len(enc.ids)), strict=True):
        delta = float(logp[t - 1, enc.ids[t]] - base_logp[t - 1, enc.ids[t]])
        assert sum(row) == pytest.approx(delta, rel=1e-3, abs=1e-4)


@pytest.fixture
def cli_home(builtin_dir, tmp_path, monkeypatch):
    """SIMU_HOME whose built-in default is the small test build (so the CLI does not build one)."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "builtin").symlink_to(builtin_dir)
    monkeypatch.setenv("SIMU_HOME", str(tmp_path / "home"))
    return tmp_path


def test_cli_attribute_then_mask(cli_home, capsys):
    scores = cli_home / "f.safetensors"
    args = ["attribute", "--model", "builtin:full", "--data", "builtin:forget10", "--method", "grad_x_act"]
    assert main([*args, "--device", "cpu", "--out", str(scores), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "grad_x_act" and summary["n_examples"] == 20 and len(summary["layer_sums"]) == 2
    out = cli_home / "m.safetensors"
    assert (
        main(
            ["mask", "--forget-scores", str(scores), "--rule", "layer_top", "--value", "4", "--out", str(out), "--json"]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["counts"] == [4, 4]
    counts = NeuronScores.load(scores).param_counts
    d_model, full_params = counts["down_per_neuron"][0], counts["total"]
    assert summary["trainable_fraction"] == pytest.approx(8 * d_model / full_params)


def test_cli_reports_user_errors_with_exit_code_2(cli_home, capsys):
    args = ["attribute", "--model", "builtin:full", "--data", "builtin:forget10", "--out", str(cli_home / "x")]
    assert main([*args, "--method", "nope"]) == 2
    assert "unknown attribution method 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_unknown_method_is_rejected_with_the_choices(full_model, forget):
    with pytest.raises(SimuError, match="unknown attribution method 'magic'.*simu_ig"):
        attribute(full_model, forget, "magic")


@pytest.mark.parametrize("steps", [0, -3])
def test_fewer_than_one_step_is_rejected(full_model, forget, steps):
    with pytest.raises(SimuError, match="steps m=.* must be a whole number >= 1"):
        attribute(full_model, forget, "simu_ig", steps=steps)


def test_unknown_positions_are_rejected(full_model, forget):
    with pytest.raises(SimuError, match="unknown positions 'middle'"):
        attribute(full_model, forget, "grad_x_act", positions="middle")


def test_empty_forget_set_is_rejected(full_model):
    with pytest.raises(SimuError, match="empty"):
        attribute(full_model, qa.QADataset("nothing", []), "grad_x_act")


@pytest.mark.parametrize("widths", [[256], [256, 256, 256], [256, 128]])
def test_scores_from_another_model_do_not_fit(full_model, widths):
    scores = NeuronScores([torch.zeros(w) for w in widths], "grad_x_act", 1, "d", "other")
    with pytest.raises(SimuError, match="made for another model"):
        scores.check_fits(full_model.model)


def test_every_registered_method_gives_finite_scores_of_the_layer_widths(full_model, forget):
    examples, _ = ref_batch(full_model, forget, 2)
    for name in METHODS:
        scores = attribute_examples(full_model.model, examples, 0, name, steps=2, batch_size=2)
        assert scores.widths() == [256, 256] and all(torch.isfinite(s).all() for s in scores.layers), name


# --------------------------------------------------------------------------------------------
# Other model families (tiny random models): hooks find the neurons, shapes are handled
# --------------------------------------------------------------------------------------------

FAMILY_CONFIGS = {
    "gpt2": lambda tf: tf.GPT2Config(n_embd=32, n_inner=48, n_layer=2, n_head=4, vocab_size=64, n_positions=32),
    "gpt_neox": lambda tf: tf.GPTNeoXConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    ),
    "opt": lambda tf: tf.OPTConfig(
        hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, word_embed_proj_dim=32
    ),
    "phi": lambda tf: tf.PhiConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_other_families_match_captum_and_completeness(family):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family](tf)).eval()
    gen = torch.Generator().manual_seed(1)
    examples = [
        qa.Encoded(torch.randint(2, 64, (n,), generator=gen).tolist(), 3) for n in (7, 9, 6)
    ]  # 3-token prompts, answers of 4, 6 and 3 tokens
    batch = qa.collate(examples, 0, "right")

    def forward(ids, attention_mask, labels):
        return ref_loglik(model, ids, attention_mask, labels)

    gxa = LayerGradientXActivation(forward, [layer.down for layer in neuron_layers(model)])
    attrs = gxa.attribute(
        batch["input_ids"],
        additional_forward_args=(batch["attention_mask"], batch["labels"]),
        attribute_to_layer_input=True,
    )
    ref = [(a[0] if isinstance(a, tuple) else a).detach().reshape(-1, 48).sum(0) for a in attrs]
    assert_scores_close(attribute_examples(model, examples, 0, "grad_x_act", batch_size=2), ref, 1e-4)
    coarse = attribute_examples(model, examples, 0, "simu_ig", 32, batch_size=2)
    fine = attribute_examples(model, examples, 0, "simu_ig", 64, batch_size=2)
    with torch.no_grad():
        real = float(loglik_with(model, batch, 0, lambda x: x).sum())
        for layer in range(2):
            delta = real - float(loglik_with(model, batch, layer, torch.zeros_like).sum())
            extrapolated = 2 * float(fine.layers[layer].sum()) - float(coarse.layers[layer].sum())
            # random models are nearly linear in one layer's activations: 1% of |delta| + 1e-4 nats
            assert extrapolated == pytest.approx(delta, rel=1e-2, abs=1e-4)
