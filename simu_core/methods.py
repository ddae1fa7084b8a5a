"""Unlearning methods: their trainable sets, the registry keyed by name, and their presets.

A method names a trainable set (all weights, or SIMU's masked slices), which mask it uses and its
preset settings (optimiser, loss, learning rate, ...). Adding a method is one `Method` line in
`METHODS`; `unlearn.unlearn` runs any of them with one training loop, and `memory.plan` reads the
same registry to size a run before it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from simu_core.arch import neuron_layers
from simu_core.config import MaskConfig, UnlearnConfig, to_dict
from simu_core.errors import SimuError
from simu_core.neurons import NeuronMask
from simu_core.optim import TrainableParam

TrainableSet = Callable[[nn.Module, UnlearnConfig, "NeuronMask | None"], list[TrainableParam]]


def _decays(param: torch.Tensor) -> bool:
    """Decoupled weight decay on matrices only (not on norms and biases), as SOUL does."""
    return param.ndim >= 2


def all_weights(model: nn.Module, config: UnlearnConfig, mask: NeuronMask | None) -> list[TrainableParam]:
    """Every parameter of the model in full (shared tensors once)."""
    return [TrainableParam(name, p, decay=_decays(p)) for name, p in model.named_parameters()]


def masked_weights(model: nn.Module, config: UnlearnConfig, mask: NeuronMask | None) -> list[TrainableParam]:
    """SIMU's set: attention projections in full (if `config.attention`) + the selected neurons'
    output-projection columns (rows for Conv1D), and with `mlp_parts="down_up"` their gate/up rows."""
    if mask is None:
        raise SimuError("this method needs a neuron mask; none was given or computed.")
    result = []
    for layer, keep in zip(neuron_layers(model), mask.layers, strict=True):
        if config.attention:
            for name, module in layer.attention:
                result += [
                    TrainableParam(f"{name}.{pname}", p, decay=_decays(p))
                    for pname, p in module.named_parameters(recurse=False)
                ]
        index = torch.nonzero(keep.to(torch.bool), as_tuple=False).flatten().to(layer.down.weight.device)
        if len(index) == 0:
            continue
        result.append(TrainableParam(f"{layer.down_name}.weight", layer.down.weight, layer.down_dim, index))
        if config.mlp_parts == "down_up":
            for name, module in layer.ups:
                result.append(TrainableParam(f"{name}.weight", module.weight, layer.up_dim, index))
                if getattr(module, "bias", None) is not None:
                    result.append(TrainableParam(f"{name}.bias", module.bias, 0, index, decay=False))
    return result


@dataclass(frozen=True)
class Method:
    """A registered method: its trainable set, which mask it uses, and its preset settings."""

    help: str
    trainables: TrainableSet
    mask: str | None  # "selected" (from attribution or a file), "random" (same counts), or None
    preset: dict = field(default_factory=dict)

    @property
    def whole_tensors(self) -> bool:
        """True when the method trains every weight in full (no mask, no compact slices)."""
        return self.trainables is all_weights


# Presets for the built-in default (1.2M-parameter Llama), tuned on forget10 / retain10 with seed 0
# (`bench/tune_presets.py`; every point and the rule are in docs/RESULTS.md): per method, the grid point
# that reaches the forget target (greedy exact match <= 0.05 within the step budget) with the highest
# model utility; for SIMU only masks of at most 10% of the MLP neurons count (its premise: few neurons).
_SOPHIA = {"optimizer": "sophia", "betas": (0.9, 0.95), "rho": 0.04, "estimator": "gnb", "hessian_interval": 10}
_SIMU = {
    **_SOPHIA,
    "loss": "graddiff",
    "lr": 1e-3,
    "gamma": 10.0,
    "steps": 250,
    "attention": False,
    "mlp_parts": "down_up",
    "mask": {
        "method": "simu_ig",
        "steps": 5,
        "rule": "layer_threshold",
        "value": 0.2,
        "dual": "include",
        "score": "forget",
    },  # fmt: skip
    "stop_forget_em": 0.05,
}
# The paper's trainable set (see ../shared/references.md 1.2, from secondary summaries): the attention
# projections in full plus the critical neurons' down-projection columns; gate/up stay frozen.
_SIMU_PAPER = {**_SIMU, "attention": True, "mlp_parts": "down", "lr": 1e-4, "gamma": 5.0}
PRESET_NOTES = "tuned on forget10 with seed 0 (bench/tune_presets.py); the search is in docs/RESULTS.md"

METHODS: dict[str, Method] = {
    "simu": Method("SIMU: masked Sophia + GradDiff on the critical neurons", masked_weights, "selected", _SIMU),
    "random_mask": Method("SIMU with a random mask of the same size (control)", masked_weights, "random", _SIMU),
    "simu_paper": Method(
        "SIMU as the paper describes it: masked Sophia + GradDiff on the attention projections in full and the "
        "critical neurons' down-projection columns",
        masked_weights,
        "selected",
        _SIMU_PAPER,
    ),
    "random_mask_paper": Method(
        "simu_paper with a random mask of the same size (control)", masked_weights, "random", _SIMU_PAPER
    ),
    "so_graddiff": Method(
        "SO-GradDiff (SOUL): Sophia + GradDiff on all weights",
        all_weights,
        None,
        {**_SOPHIA, "loss": "graddiff", "lr": 1e-4, "gamma": 5.0, "steps": 250, "stop_forget_em": 0.05},
    ),
    "fo_graddiff": Method(
        "FO-GradDiff: AdamW + GradDiff on all weights",
        all_weights,
        None,
        {
            "optimizer": "adamw",
            "betas": (0.9, 0.999),
            "loss": "graddiff",
            "lr": 1e-4,
            "gamma": 5.0,
            "steps": 250,
            "stop_forget_em": 0.05,
        },  # fmt: skip
    ),
    "ga": Method(
        "Gradient ascent (AdamW) on all weights",
        all_weights,
        None,
        {
            "optimizer": "adamw",
            "betas": (0.9, 0.999),
            "loss": "ga",
            "lr": 5e-5,
            "gamma": 0.0,
            "steps": 250,
            "stop_forget_em": 0.05,
        },  # fmt: skip
    ),
    "npo": Method(
        "NPO (AdamW) + retain NLL on all weights",
        all_weights,
        None,
        {
            "optimizer": "adamw",
            "betas": (0.9, 0.999),
            "loss": "npo",
            "lr": 5e-5,
            "gamma": 5.0,
            "npo_beta": 0.1,
            "steps": 250,
            "stop_forget_em": 0.05,
        },  # fmt: skip
    ),
}


# Presets for other built-in models: per model spec, per method, the settings that replace the ones above
# (tuned on splits that are never reported; the search is in docs/RESULTS.md, "SmolLM2 presets").
SMOLLM2_PRESET_NOTES = (
    "tuned for SmolLM2 on the real-knowledge benchmark's other_capitals split (never reported) with seed 0, "
    "3 learning rates per method (bench/tune_presets.py --benchmark smollm2); the search is in docs/RESULTS.md"
)
_SMOLLM2_RUN = {"gamma": 5.0, "steps": 60, "eval_every": 5}  # every method: same retain weight, budget, stop checks
MODEL_PRESETS: dict[str, dict[str, dict]] = {
    "builtin:smollm2": {
        "simu": {**_SMOLLM2_RUN, "lr": 1e-4},
        "random_mask": {**_SMOLLM2_RUN, "lr": 1e-4},  # the control takes SIMU's preset
        "simu_paper": {**_SMOLLM2_RUN, "lr": 1e-5},
        "random_mask_paper": {**_SMOLLM2_RUN, "lr": 1e-5},  # the control takes simu_paper's
        "so_graddiff": {**_SMOLLM2_RUN, "lr": 3e-6},
        "fo_graddiff": {**_SMOLLM2_RUN, "lr": 1e-5},
        "ga": {"steps": 60, "eval_every": 5},  # no retain term: gamma stays 0
        "npo": {**_SMOLLM2_RUN},  # ga and npo: the default's lr, not tuned for SmolLM2
    },
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SimuError(f"unknown method '{name}'. Choose one of: {', '.join(METHODS)}.")
    return METHODS[name]


def preset_config(method: str, **overrides) -> UnlearnConfig:
    """The method's preset as an `UnlearnConfig`, with `overrides` (None values are ignored) on top.

    The preset is the one for the built-in default, with the settings of `MODEL_PRESETS` on top when
    `overrides["model"]` names a model that has its own. `mask` may be given as a `MaskConfig` or a
    dict of its fields (merged into the preset's).
    """
    own = MODEL_PRESETS.get(str(overrides.get("model", "")).strip(), {}).get(method, {})
    preset = {**get_method(method).preset, **own}
    mask = {**to_dict(MaskConfig()), **get_method(method).preset.get("mask", {}), **own.get("mask", {})}
    preset.pop("mask", None)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    given = overrides.pop("mask", {})
    mask.update(to_dict(given) if isinstance(given, MaskConfig) else given)
    config = UnlearnConfig.from_json({**to_dict(UnlearnConfig()), **preset, **overrides, "method": method})
    config.mask = MaskConfig(**mask)
    return config
