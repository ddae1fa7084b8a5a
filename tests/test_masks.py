"""Critical-neuron masks: every rule on hand-made scores (expected masks worked out by hand),
dual neurons, the random control, parameter fractions counted from the model's own tensors,
files, and bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from simu_core.errors import SimuError
from simu_core.masks import (
    RULES,
    check_mask_fits,
    combined_scores,
    full_mask,
    make_mask,
    overlap,
    random_mask_like,
    trainable_count,
    trainable_fraction,
)
from simu_core.neurons import NeuronMask

# Two layers of four neurons. Layer 0 max 4 (neuron 1), layer 1 max 2 (neuron 3).
FORGET = [torch.tensor([1.0, 4.0, 3.0, -2.0]), torch.tensor([0.5, 1.5, -1.0, 2.0])]
# Retain: layer 0 mostly neuron 2, layer 1 mostly neuron 1.
RETAIN = [torch.tensor([0.0, 0.0, 5.0, 1.0]), torch.tensor([0.0, 3.0, 0.0, 0.0])]


def as_lists(mask: NeuronMask) -> list[list[bool]]:
    return [m.tolist() for m in mask.layers]


T, F_ = True, False


# --------------------------------------------------------------------------------------------
# Rules on hand-made scores
# --------------------------------------------------------------------------------------------


def test_layer_threshold_keeps_scores_above_t_times_the_layer_max():
    # t = 0.5: layer 0 needs > 2 -> neurons 1 (4) and 2 (3); layer 1 needs > 1 -> neurons 1 (1.5), 3 (2).
    mask = make_mask(FORGET, "layer_threshold", 0.5)
    assert as_lists(mask) == [[F_, T, T, F_], [F_, T, F_, T]]
    assert mask.counts() == [2, 2] and mask.total() == 4 and mask.rule == "layer_threshold"


def test_layer_threshold_is_strict_so_t_1_selects_nothing():
    assert make_mask(FORGET, "layer_threshold", 1.0).total() == 0


def test_layer_threshold_selects_nothing_in_a_layer_with_no_positive_score():
    scores = [torch.tensor([-1.0, -3.0, -2.0]), torch.tensor([1.0, 0.2, 0.9])]
    assert as_lists(make_mask(scores, "layer_threshold", 0.5)) == [[F_, F_, F_], [T, F_, T]]


def test_global_top_takes_the_best_percent_of_all_neurons():
    # 8 neurons, 25% -> 2: the scores 4 (layer 0 n1) and 3 (layer 0 n2); layer 1's best is only 2.
    assert as_lists(make_mask(FORGET, "global_top", 25)) == [[F_, T, T, F_], [F_, F_, F_, F_]]
    # 1% of 8 rounds to 0 -> at least one neuron
    assert make_mask(FORGET, "global_top", 1).total() == 1


def test_layer_top_takes_k_per_layer():
    assert as_lists(make_mask(FORGET, "layer_top", 1)) == [[F_, T, F_, F_], [F_, F_, F_, T]]


def test_layer_percent_takes_the_best_percent_of_each_layer():
    # 50% of 4 = 2 per layer
    assert as_lists(make_mask(FORGET, "layer_percent", 50)) == [[F_, T, T, F_], [F_, T, F_, T]]


def test_ties_go_to_the_lower_index():
    scores = [torch.tensor([1.0, 2.0, 2.0, 2.0])]
    assert as_lists(make_mask(scores, "layer_top", 2)) == [[F_, T, T, F_]]


# --------------------------------------------------------------------------------------------
# Dual neurons and the forget-minus-retain score
# --------------------------------------------------------------------------------------------


def test_dual_neurons_are_kept_by_include_and_dropped_by_exclude():
    # t = 0.5. Forget-critical: L0 {1, 2}, L1 {1, 3}. Retain-critical: L0 {2} (> 2.5), L1 {1} (> 1.5).
    # Dual: L0 {2}, L1 {1}.
    inc = make_mask(FORGET, "layer_threshold", 0.5, retain=RETAIN, dual="include")
    exc = make_mask(FORGET, "layer_threshold", 0.5, retain=RETAIN, dual="exclude")
    assert as_lists(inc) == [[F_, T, T, F_], [F_, T, F_, T]]
    assert as_lists(exc) == [[F_, T, F_, F_], [F_, F_, F_, T]]
    assert inc.params["dual_counts"] == exc.params["dual_counts"] == [1, 1]
    assert exc.params["dual"] == "exclude"


def test_forget_minus_retain_subtracts_rms_normalised_layers():
    # Layer 1: forget rms = sqrt((0.25 + 2.25 + 1 + 4) / 4) = sqrt(1.875); retain rms = sqrt(9 / 4) = 1.5.
    got = combined_scores(FORGET, RETAIN, "forget_minus_retain")[1]
    f_rms, r_rms = math.sqrt(1.875), 1.5
    expected = [0.5 / f_rms, 1.5 / f_rms - 3 / r_rms, -1 / f_rms, 2 / f_rms]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    # neuron 1 of layer 1 is forget-critical but retain-heavy: it drops out of the top 2
    assert as_lists(make_mask(FORGET, "layer_top", 2, retain=RETAIN, score="forget_minus_retain"))[1] == [T, F_, F_, T]


# --------------------------------------------------------------------------------------------
# Random control, full mask, overlap
# --------------------------------------------------------------------------------------------


def test_random_control_has_the_same_counts_and_is_seeded():
    scores = [torch.arange(100.0), torch.arange(60.0)]
    mask = make_mask(scores, "layer_percent", 10)
    a, b, c = random_mask_like(mask, 1), random_mask_like(mask, 1), random_mask_like(mask, 2)
    assert a.counts() == mask.counts() == [10, 6]
    assert as_lists(a) == as_lists(b)
    assert as_lists(a) != as_lists(c)
    assert a.rule == "random" and a.params["seed"] == 1 and a.params["like_rule"] == "layer_percent"


def test_overlap_counts_shared_neurons_over_the_smaller_selection():
    a = NeuronMask([torch.tensor([T, T, F_, F_])], "x")
    b = NeuronMask([torch.tensor([F_, T, T, T])], "x")
    assert overlap(a, b) == pytest.approx(1 / 2)


def test_full_mask_selects_every_neuron_of_the_model(full_model):
    mask = full_mask(full_model.model)
    assert mask.rule == "all" and mask.counts() == [256, 256]
    check_mask_fits(mask, full_model.model)


# --------------------------------------------------------------------------------------------
# Parameter fractions (reference: the model's own named tensors)
# --------------------------------------------------------------------------------------------


def test_trainable_fraction_counts_down_columns_gate_up_rows_and_attention(full_model):
    model = full_model.model
    total = sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    d_model = params["model.layers.0.mlp.down_proj.weight"].shape[0]
    attention = sum(p.numel() for n, p in params.items() if ".self_attn." in n)
    mask = NeuronMask([torch.zeros(256, dtype=torch.bool), torch.zeros(256, dtype=torch.bool)], "x")
    mask.layers[0][:3] = True
    mask.layers[1][:5] = True
    assert trainable_count(mask, model) == 8 * d_model  # one down_proj column each
    assert trainable_count(mask, model, mlp="down_up") == 8 * 3 * d_model  # + gate and up rows
    assert trainable_count(mask, model, attention=True) == 8 * d_model + attention
    assert trainable_fraction(mask, model) == pytest.approx(8 * d_model / total)
    all_mlp = sum(p.numel() for n, p in params.items() if ".mlp." in n)
    assert trainable_count(full_mask(model), model, mlp="down_up") == all_mlp


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_mask_round_trips_through_safetensors(tmp_path):
    mask = make_mask(FORGET, "layer_threshold", 0.5, retain=RETAIN, dual="exclude")
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    back = NeuronMask.load(path)
    assert as_lists(back) == as_lists(mask) and back.rule == mask.rule and back.params == mask.params
    assert all(m.dtype == torch.bool for m in back.layers)
    from safetensors.torch import load_file

    assert sorted(load_file(path)) == ["layer.0", "layer.1"]
    sidecar = json.loads((tmp_path / "mask.safetensors.json").read_text())
    assert sidecar["counts"] == [1, 1] and sidecar["rule"] == "layer_threshold"


def test_loading_a_missing_or_foreign_file_says_so(tmp_path):
    with pytest.raises(SimuError, match="not found"):
        NeuronMask.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(SimuError, match="layer.0"):
        NeuronMask.load(tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    with pytest.raises(SimuError, match="not a readable safetensors"):
        NeuronMask.load(tmp_path / "junk.safetensors")


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_unknown_rule_names_the_choices():
    with pytest.raises(SimuError, match="unknown mask rule 'best'.*layer_threshold"):
        make_mask(FORGET, "best", 0.5)


@pytest.mark.parametrize("t", [0.0, -0.2, 1.5])
def test_threshold_outside_zero_one_is_rejected(t):
    with pytest.raises(SimuError, match=r"outside \(0, 1\]"):
        make_mask(FORGET, "layer_threshold", t)


@pytest.mark.parametrize("rule, value", [("global_top", 0), ("global_top", 101), ("layer_percent", -5)])
def test_percent_outside_range_is_rejected(rule, value):
    with pytest.raises(SimuError, match=r"outside \(0, 100\]"):
        make_mask(FORGET, rule, value)


@pytest.mark.parametrize("k", [0, 5, 1.5])
def test_layer_top_k_must_be_a_whole_number_within_the_layer(k):
    with pytest.raises(SimuError, match="layer_top k="):
        make_mask(FORGET, "layer_top", k)


def test_unknown_dual_policy_and_score_are_rejected():
    with pytest.raises(SimuError, match="unknown dual policy"):
        make_mask(FORGET, "layer_top", 1, retain=RETAIN, dual="maybe")
    with pytest.raises(SimuError, match="unknown score"):
        make_mask(FORGET, "layer_top", 1, score="retain")


def test_exclude_and_forget_minus_retain_need_retain_scores():
    with pytest.raises(SimuError, match="needs retain scores"):
        make_mask(FORGET, "layer_top", 1, dual="exclude")
    with pytest.raises(SimuError, match="needs retain scores"):
        make_mask(FORGET, "layer_top", 1, score="forget_minus_retain")


def test_retain_scores_of_another_shape_are_rejected():
    with pytest.raises(SimuError, match="made for another model"):
        make_mask(FORGET, "layer_top", 1, retain=[torch.zeros(4)], score="forget_minus_retain")
    with pytest.raises(SimuError, match="layer 1"):
        make_mask(FORGET, "layer_top", 1, retain=[torch.zeros(4), torch.zeros(5)], score="forget_minus_retain")


def test_nan_scores_are_rejected():
    with pytest.raises(SimuError, match="NaN"):
        make_mask([torch.tensor([1.0, float("nan")])], "layer_top", 1)


def test_mask_for_another_model_does_not_fit(full_model):
    with pytest.raises(SimuError, match="3 layers but the model has 2"):
        check_mask_fits(NeuronMask([torch.ones(256, dtype=torch.bool)] * 3, "x"), full_model.model)
    with pytest.raises(SimuError, match="128 neurons in layer 0"):
        check_mask_fits(NeuronMask([torch.ones(128, dtype=torch.bool)] * 2, "x"), full_model.model)


def test_every_rule_is_registered_by_name():
    assert {"layer_threshold", "global_top", "layer_top", "layer_percent"} <= set(RULES)
