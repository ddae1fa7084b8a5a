"""Mask aggregations: per-item top-k consistency and the retain-aware ratio, against hand computations."""

from __future__ import annotations

import pytest
import torch

from simu_core.errors import SimuError
from simu_core.masks import combined_scores, make_mask
from simu_core.neurons import NeuronScores


def scores(items: list[list[list[float]]]) -> NeuronScores:
    """Scores with per-item values: items[layer][item][neuron]; the summed layers are their item sums."""
    per_item = [torch.tensor(layer) for layer in items]
    return NeuronScores([t.sum(0) for t in per_item], "simu_ig", 5, "d", "m", items=per_item)


# two layers of 3 neurons (6 neurons in all); top_k = 34% -> round(2.04) = 2 neurons per item
FORGET = scores(
    [
        [[9.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],  # layer 0, items 0..2
        [[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 2.0]],  # layer 1
    ]
)
RETAIN = scores([[[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])


def test_consistency_is_the_forget_minus_retain_share_of_items_with_the_neuron_in_their_top_k():
    got = combined_scores(FORGET, RETAIN, aggregate="consistency", top_k=34.0)
    # forget items' top-2 sets: {L0n0, L1n2}, {L0n1, L1n2}, {L0n1, L1n2}; retain: {L0n1, L1n2}, {L0n0, L0n1} (ties: lower index)
    forget_share = [[1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0]]
    retain_share = [[1 / 2, 1.0, 0.0], [0.0, 0.0, 1 / 2]]
    for layer in range(2):
        expected = torch.tensor(forget_share[layer]) - torch.tensor(retain_share[layer])
        assert torch.allclose(got[layer], expected.double())


def test_consistency_prefers_a_neuron_many_items_need_over_one_with_a_large_sum():
    by_sum = make_mask(FORGET, "layer_top", 1)
    by_consistency = make_mask(FORGET, "layer_top", 1, aggregate="consistency", top_k=34.0)
    assert by_sum.indices(0).tolist() == [0]  # item 0 alone gives neuron 0 a sum of 9
    assert by_consistency.indices(0).tolist() == [1]  # neuron 1 is in the top set of 2 of 3 items
    assert by_consistency.params["aggregate"] == "consistency" and by_consistency.params["top_k"] == 34.0


def test_ratio_is_positive_forget_over_positive_retain_plus_eps_in_rms_units():
    f, r = [torch.tensor([2.0, -1.0, 1.0])], [torch.tensor([1.0, 2.0, -2.0])]
    got = combined_scores(f, r, aggregate="ratio", eps=0.5)[0]
    rms_f, rms_r = (6 / 3) ** 0.5, (9 / 3) ** 0.5
    expected = torch.tensor([2 / rms_f / (1 / rms_r + 0.5), 0.0, 1 / rms_f / 0.5])
    assert torch.allclose(got, expected.double())


def test_the_summed_default_keeps_the_mask_params_of_before():
    mask = make_mask(FORGET, "layer_top", 1)
    assert set(mask.params) == {"value", "score", "dual", "forget_method", "forget_steps", "forget_data"}


def test_consistency_needs_per_item_scores():
    plain = NeuronScores([torch.ones(3)], "simu_ig", 5, "d", "m")
    with pytest.raises(SimuError, match="needs per-item forget scores.*--per-item"):
        make_mask(plain, "layer_top", 1, aggregate="consistency")


def test_ratio_needs_retain_scores_and_unknown_aggregates_are_named():
    with pytest.raises(SimuError, match="'ratio' needs retain scores"):
        make_mask(FORGET, "layer_top", 1, aggregate="ratio")
    with pytest.raises(SimuError, match="unknown aggregate 'mean'.*consistency"):
        make_mask(FORGET, "layer_top", 1, aggregate="mean")
