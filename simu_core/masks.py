"""Critical-neuron masks (SIMU stage 1, second half): selection rules, dual neurons, controls.

A mask (`neurons.NeuronMask`) selects MLP neurons, one bool vector of length d_ff per decoder layer
(True = critical, i.e. trainable in stage 2). Masks are made from neuron scores
(`neurons.NeuronScores`, or anything with a `layers` list of float [d_ff] tensors) by a rule from
`RULES`:

- `layer_threshold` (SIMU): neuron k of layer l is critical iff `s_l[k] > t * max_k s_l[k]`,
  t in (0, 1]. The comparison is strict as in the paper (t = 1 selects nothing); a layer whose
  best score is <= 0 (no neuron supports the answer) selects nothing.
- `global_top`: the top `value` percent of all neurons of all layers (at least one).
- `layer_top`: the top `value` neurons (an integer k) of every layer.
- `layer_percent`: the top `value` percent of every layer (at least one per layer).

Scores (`score=`): `forget` uses the forget scores as they are. `forget_minus_retain` uses
`f_l / rms(f_l) - r_l / rms(r_l)` per layer, where rms is the root mean square of the layer's
scores: each layer of each set is brought to unit scale (forget and retain sets differ in size,
and layers differ in scale) before subtracting, so a neuron ranks high when it matters much more
for the forget set than for the retain set, relative to the other neurons of its layer.

Aggregations (`aggregate=`, how per-example evidence becomes one score per neuron):
- `sum` (default): the summed scores above (`score=` picks forget or forget_minus_retain).
- `consistency`: per item, the top `top_k` percent of all neurons by that item's score are its
  critical set; a neuron scores `freq_forget - freq_retain`, the share of forget items whose set
  holds it minus the share of retain items (in [-1, 1]; needs per-item scores,
  `attribute(per_item=True)`; without retain scores just `freq_forget`). A neuron counts when it is
  critical for many forget items and few retain items, not when a few items give it a large sum.
- `ratio`: `f+ / (r+ + eps)` per layer, with `f+ = max(f, 0) / rms(f)` and `r+ = max(r, 0) / rms(r)`
  (unit scale per layer as above, `eps` in those units): the retain-aware ratio I_forget /
  (I_retain + eps). Needs retain scores.

Dual neurons are critical under the same rule and value for both the chosen score and the retain
score. Policy `include` (default) keeps them in the mask; `exclude` removes them.

Ties are broken towards the lower neuron index (stable sort), so masks are deterministic.
Saved by `NeuronMask.save` as safetensors (bool [d_ff] tensors named `layer.<i>`, with rule and
params in the file's metadata) plus a human-readable JSON sidecar `<path>.json`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from simu_core.arch import neuron_widths
from simu_core.errors import SimuError
from simu_core.neurons import NeuronMask, NeuronScores, ParamCounts, check_widths, param_counts

DUAL_POLICIES = ("include", "exclude")
SCORE_KINDS = ("forget", "forget_minus_retain")
AGGREGATES = ("sum", "consistency", "ratio")
MLP_PARTS = ("down", "down_up")


# --------------------------------------------------------------------------------------------
# Control masks and checks
# --------------------------------------------------------------------------------------------


def full_mask(model: nn.Module) -> NeuronMask:
    """Every MLP neuron of `model` selected (rule `all`)."""
    return NeuronMask([torch.ones(w, dtype=torch.bool) for w in neuron_widths(model)], "all", {})


def random_mask_like(mask: NeuronMask, seed: int) -> NeuronMask:
    """A seeded random mask with the same number of selected neurons in every layer as `mask`."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for m in mask.layers:
        chosen = torch.zeros(m.numel(), dtype=torch.bool)
        chosen[torch.randperm(m.numel(), generator=gen)[: int(m.sum())]] = True
        layers.append(chosen)
    return NeuronMask(layers, "random", {"seed": seed, "like_rule": mask.rule, "like_params": mask.params})


def check_mask_fits(mask: NeuronMask, model: nn.Module, what: str = "mask") -> None:
    """SimuError unless `mask` has one vector per decoder layer of `model`, each of its d_ff."""
    check_widths(mask.widths(), neuron_widths(model), what)


def overlap(a: NeuronMask, b: NeuronMask) -> float:
    """|A ∩ B| / min(|A|, |B|): 1.0 when the smaller selection lies inside the other (0 if one is empty)."""
    check_widths(a.widths(), b.widths(), "second mask")
    both = sum(int((x & y).sum()) for x, y in zip(a.layers, b.layers, strict=True))
    smaller = min(a.total(), b.total())
    return both / smaller if smaller else 0.0


# --------------------------------------------------------------------------------------------
# Parameter counts: what fraction of the model a mask frees
# --------------------------------------------------------------------------------------------


def trainable_count(
    mask: NeuronMask, model: nn.Module | ParamCounts, mlp: str = "down", attention: bool = False
) -> int:
    """Parameters left trainable: per selected neuron its output-projection column (Linear) or row
    (Conv1D), plus with `mlp="down_up"` its gate/up rows; with `attention=True` all attention
    projections in full. Biases of the output projection are not per-neuron and are not counted."""
    if mlp not in MLP_PARTS:
        raise SimuError(f"unknown MLP part setting '{mlp}'. Choose one of: {', '.join(MLP_PARTS)}.")
    counts = model if isinstance(model, ParamCounts) else param_counts(model)
    if len(counts.down_per_neuron) != len(mask.layers):
        raise SimuError(
            f"the mask has {len(mask.layers)} layers but the model has {len(counts.down_per_neuron)}. "
            "Recompute the mask for this model."
        )
    per_neuron = [
        d + (u if mlp == "down_up" else 0) for d, u in zip(counts.down_per_neuron, counts.up_per_neuron, strict=True)
    ]
    n = sum(c * p for c, p in zip(mask.counts(), per_neuron, strict=True))
    return n + (sum(counts.attention) if attention else 0)


def trainable_fraction(
    mask: NeuronMask, model: nn.Module | ParamCounts, mlp: str = "down", attention: bool = False
) -> float:
    """`trainable_count(...)` / all parameters of the model (see `trainable_count`)."""
    counts = model if isinstance(model, ParamCounts) else param_counts(model)
    return trainable_count(mask, counts, mlp, attention) / counts.total


# --------------------------------------------------------------------------------------------
# Selection rules (registry: name -> fn(scores per layer, value) -> bool per layer)
# --------------------------------------------------------------------------------------------

Rule = Callable[[list[torch.Tensor], float], list[torch.Tensor]]
RULES: dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    """Register a selection rule under `name`."""

    def register(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return register


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the n highest entries of a 1-d tensor (ties: lower index first)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    order = torch.sort(scores, descending=True, stable=True).indices
    chosen[order[:n]] = True
    return chosen


@rule("layer_threshold")
def _layer_threshold(scores: list[torch.Tensor], t: float) -> list[torch.Tensor]:
    if not 0.0 < t <= 1.0:
        raise SimuError(f"threshold t={t} is outside (0, 1]. Pick e.g. 0.5 (higher = fewer neurons).")
    return [s > t * s.max() for s in scores]


@rule("global_top")
def _global_top(scores: list[torch.Tensor], percent: float) -> list[torch.Tensor]:
    if not 0.0 < percent <= 100.0:
        raise SimuError(f"global_top percent {percent} is outside (0, 100]. Pick e.g. 1 (= top 1% of all neurons).")
    flat = torch.cat(scores)
    chosen = _top(flat, max(1, round(percent / 100 * flat.numel())))
    return list(chosen.split([s.numel() for s in scores]))


@rule("layer_top")
def _layer_top(scores: list[torch.Tensor], k: float) -> list[torch.Tensor]:
    widest = min(s.numel() for s in scores)
    if k != int(k) or not 1 <= k <= widest:
        raise SimuError(f"layer_top k={k} must be a whole number in [1, {widest}] (the smallest layer's d_ff).")
    return [_top(s, int(k)) for s in scores]


@rule("layer_percent")
def _layer_percent(scores: list[torch.Tensor], percent: float) -> list[torch.Tensor]:
    if not 0.0 < percent <= 100.0:
        raise SimuError(f"layer_percent {percent} is outside (0, 100]. Pick e.g. 5 (= top 5% of every layer).")
    return [_top(s, max(1, round(percent / 100 * s.numel()))) for s in scores]


# --------------------------------------------------------------------------------------------
# Making a mask from scores
# --------------------------------------------------------------------------------------------


def _layers_of(scores: NeuronScores | Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    layers = [torch.as_tensor(s).detach().to("cpu", torch.float64).flatten() for s in getattr(scores, "layers", scores)]
    if not layers:
        raise SimuError(f"the {what} scores have no layers. Recompute them with `attribute`.")
    if any(not torch.isfinite(s).all() for s in layers):
        raise SimuError(f"the {what} scores contain NaN or inf. Recompute them (check the model and data).")
    return layers


def _rms_normalised(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s / s.pow(2).mean().sqrt().clamp_min(1e-30) for s in layers]


def _top_frequency(scores: NeuronScores, top_k: float, what: str) -> list[torch.Tensor]:
    """Per neuron, the share of items whose top `top_k` percent of all neurons holds it (float64 [d_ff])."""
    if getattr(scores, "items", None) is None:
        raise SimuError(
            f"aggregate 'consistency' needs per-item {what} scores. Recompute them with per-item scores "
            "(attribute --per-item, or attribute(per_item=True))."
        )
    flat = torch.cat([t.double() for t in scores.items], dim=1)  # [n_items, all neurons]
    n = max(1, round(top_k / 100 * flat.shape[1]))
    chosen = torch.zeros_like(flat)
    chosen.scatter_(1, torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :n], 1.0)  # ties: lower index
    return list(chosen.mean(0).split([t.shape[1] for t in scores.items]))


def aggregated_scores(
    forget: NeuronScores | Sequence[torch.Tensor],
    retain: NeuronScores | Sequence[torch.Tensor] | None,
    aggregate: str,
    top_k: float = 1.0,
    eps: float = 0.1,
) -> list[torch.Tensor]:
    """The `consistency` or `ratio` score per layer (float64 [d_ff]); see the module docstring."""
    if aggregate == "consistency":
        if not 0.0 < top_k <= 100.0:
            raise SimuError(f"top_k {top_k} is outside (0, 100]. Pick e.g. 1 (= each item's top 1% of neurons).")
        f = _top_frequency(forget, top_k, "forget")
        if retain is None:
            return f
        r = _top_frequency(retain, top_k, "retain")
        check_widths([s.numel() for s in r], [s.numel() for s in f], "retain scores (compared with the forget scores)")
        return [a - b for a, b in zip(f, r, strict=True)]
    if retain is None:
        raise SimuError("aggregate 'ratio' needs retain scores. Pass --retain-scores (or retain=...).")
    if eps <= 0:
        raise SimuError(f"ratio eps {eps} must be > 0 (e.g. 0.1).")
    f, r = _layers_of(forget, "forget"), _layers_of(retain, "retain")
    check_widths([s.numel() for s in r], [s.numel() for s in f], "retain scores (compared with the forget scores)")
    fp = [s.clamp_min(0) for s in _rms_normalised(f)]
    rp = [s.clamp_min(0) for s in _rms_normalised(r)]
    return [a / (b + eps) for a, b in zip(fp, rp, strict=True)]


def combined_scores(
    forget: NeuronScores | Sequence[torch.Tensor],
    retain: NeuronScores | Sequence[torch.Tensor] | None = None,
    score: str = "forget",
    aggregate: str = "sum",
    top_k: float = 1.0,
    eps: float = 0.1,
) -> list[torch.Tensor]:
    """The per-layer scores a rule ranks (float64 [d_ff] per layer); see the module docstring."""
    if score not in SCORE_KINDS:
        raise SimuError(f"unknown score '{score}'. Choose one of: {', '.join(SCORE_KINDS)}.")
    if aggregate not in AGGREGATES:
        raise SimuError(f"unknown aggregate '{aggregate}'. Choose one of: {', '.join(AGGREGATES)}.")
    if aggregate != "sum":
        return aggregated_scores(forget, retain, aggregate, top_k, eps)
    f = _layers_of(forget, "forget")
    if score == "forget":
        return f
    if retain is None:
        raise SimuError("score 'forget_minus_retain' needs retain scores. Pass --retain-scores (or retain=...).")
    r = _layers_of(retain, "retain")
    check_widths([s.numel() for s in r], [s.numel() for s in f], "retain scores (compared with the forget scores)")
    return [a - b for a, b in zip(_rms_normalised(f), _rms_normalised(r), strict=True)]


def make_mask(
    forget: NeuronScores | Sequence[torch.Tensor],
    rule: str,
    value: float,
    retain: NeuronScores | Sequence[torch.Tensor] | None = None,
    dual: str = "include",
    score: str = "forget",
    aggregate: str = "sum",
    top_k: float = 1.0,
    eps: float = 0.1,
) -> NeuronMask:
    """Select critical neurons from forget (and optionally retain) scores.

    `rule` names an entry of `RULES` and `value` is its setting (threshold t, percent or k);
    `aggregate` (`AGGREGATES`, with `top_k` percent for consistency and `eps` for ratio) picks how
    the scores are combined before the rule ranks them (`score` applies to `sum` only).
    With retain scores the dual neurons (critical for both) are counted; `dual="exclude"` drops
    them from the mask. The returned params record value, score, dual policy and dual counts.
    """
    if rule not in RULES:
        raise SimuError(f"unknown mask rule '{rule}'. Choose one of: {', '.join(sorted(RULES))}.")
    if dual not in DUAL_POLICIES:
        raise SimuError(f"unknown dual policy '{dual}'. Choose one of: {', '.join(DUAL_POLICIES)}.")
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise SimuError(f"mask value {value!r} is not a number. Give the rule's threshold, percent or count.")
    ranked = combined_scores(forget, retain, score, aggregate, top_k, eps)
    critical = RULES[rule](ranked, float(value))
    params: dict = {"value": value, "score": score, "dual": dual}
    if aggregate != "sum":
        params.update({"aggregate": aggregate, **({"top_k": top_k} if aggregate == "consistency" else {"eps": eps})})
    if retain is not None:
        retain_critical = RULES[rule](_layers_of(retain, "retain"), float(value))
        duals = [c & r for c, r in zip(critical, retain_critical, strict=True)]
        params["dual_counts"] = [int(d.sum()) for d in duals]
        if dual == "exclude":
            critical = [c & ~d for c, d in zip(critical, duals, strict=True)]
    elif dual == "exclude":
        raise SimuError("dual policy 'exclude' needs retain scores to find dual neurons. Pass --retain-scores.")
    for key in ("method", "steps", "data"):
        if hasattr(forget, key):
            params[f"forget_{key}"] = getattr(forget, key)
    if (getattr(forget, "target", "answer"), getattr(forget, "baseline", "zero")) != ("answer", "zero"):
        params.update({"forget_target": forget.target, "forget_baseline": forget.baseline})
    return NeuronMask([c.clone() for c in critical], rule, params)
