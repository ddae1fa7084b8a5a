"""Per-neuron data shared by attribution, masks, unlearning and the figures (no computation).

- `NeuronScores`: one float score per MLP neuron of every decoder layer (made by `attribution`);
- `NeuronMask`: one bool per MLP neuron of every decoder layer (made by `masks` from scores);
- `ParamCounts` / `param_counts`: what a mask's trainable fraction needs to know about a model;
- `check_widths`: do two per-layer width lists agree (layer count and d_ff);
- `write_layers` / `read_layers`: the file format of scores and masks, a safetensors file with the
  tensors `layer.0 .. layer.N-1` (shape [d_ff] each) and a JSON `simu` metadata entry (with its
  `kind`), plus a human-readable JSON sidecar `<path>.json`.

Sits just above `arch`: `attribution` and `masks` both take their types from here, so neither
imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from simu_core.arch import count_parameters, neuron_layers, neuron_widths
from simu_core.errors import SimuError

# --------------------------------------------------------------------------------------------
# The file format: per-layer tensors in one safetensors file
# --------------------------------------------------------------------------------------------


def write_layers(
    path: str | Path, layers: Sequence[torch.Tensor], dtype: torch.dtype, meta: dict, sidecar: dict
) -> None:
    """Write `layers` as `layer.<i>` tensors (CPU, `dtype`) to `path` with `meta` as its `simu` metadata,
    and `sidecar` as JSON to `<path>.json` (parent folders are created)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{i}": t.detach().to("cpu", dtype).contiguous() for i, t in enumerate(layers)}
    save_file(tensors, str(path), metadata={"simu": json.dumps(meta, default=str)})
    Path(f"{path}.json").write_text(json.dumps(sidecar, indent=2, default=str), encoding="utf-8")


def read_layers(path: str | Path, kind: str) -> tuple[list[torch.Tensor], dict]:
    """The `layer.<i>` tensors of a safetensors file, in order, and its `simu` metadata dict."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SimuError(f"file '{path}' not found. Check the path (it is written by the save step).")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("simu", "{}"))
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except (OSError, ValueError, SafetensorError) as err:
        raise SimuError(f"'{path}' is not a readable safetensors file ({err}). Re-create it.") from err
    if meta.get("kind", kind) != kind:
        raise SimuError(f"'{path}' holds a {meta.get('kind')}, not a {kind}. Pass the right file.")
    expected = [f"layer.{i}" for i in range(len(keys))]
    if sorted(keys) != sorted(expected) or not keys:
        raise SimuError(f"'{path}' does not hold tensors layer.0 .. layer.N-1 (found {keys[:5]}). Re-create it.")
    return [tensors[k] for k in expected], meta


def check_widths(found: Sequence[int], expected: Sequence[int], what: str) -> None:
    """SimuError unless the per-layer widths agree (layer count and d_ff)."""
    if len(found) != len(expected):
        raise SimuError(
            f"the {what} has {len(found)} layers but the model has {len(expected)}: it was made for another "
            "model. Recompute it for this model."
        )
    if list(found) != list(expected):
        bad = next(i for i, (a, b) in enumerate(zip(found, expected, strict=True)) if a != b)
        raise SimuError(
            f"the {what} has {found[bad]} neurons in layer {bad} but the model has {expected[bad]}: it was made "
            "for another model. Recompute it for this model."
        )


# --------------------------------------------------------------------------------------------
# Parameter counts: what fraction of the model a mask frees
# --------------------------------------------------------------------------------------------


@dataclass
class ParamCounts:
    """Parameter counts a mask's trainable fraction needs (so scores files can carry them).

    `down_per_neuron[l]`: parameters of one neuron's slice of layer l's output projection (d_model).
    `up_per_neuron[l]`: parameters of one neuron's input rows in gate/up (incl. their bias entries).
    `attention[l]`: all parameters of layer l's attention projections.
    """

    total: int
    down_per_neuron: list[int]
    up_per_neuron: list[int]
    attention: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ParamCounts:
        return cls(
            int(data["total"]), list(data["down_per_neuron"]), list(data["up_per_neuron"]), list(data["attention"])
        )


def _module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(model: nn.Module) -> ParamCounts:
    """The `ParamCounts` of `model` (shared parameters counted once in `total`)."""
    layers = neuron_layers(model)
    down = [layer.down.weight.numel() // layer.d_ff for layer in layers]
    up = [
        sum(m.weight.numel() // layer.d_ff + (1 if getattr(m, "bias", None) is not None else 0) for _, m in layer.ups)
        for layer in layers
    ]
    attention = [sum(_module_params(m) for _, m in layer.attention) for layer in layers]
    return ParamCounts(count_parameters(model), down, up, attention)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@dataclass
class NeuronScores:
    """Per-neuron scores: `layers[l]` is float32 [d_ff_l] (units: nats of answer log-likelihood).

    `forward_passes` / `backward_passes` count passes over the whole data set (a batch replicated
    k times counts k). `param_counts` lets a mask made from these scores report the fraction of
    the model's parameters it frees without loading the model.
    """

    layers: list[torch.Tensor]
    method: str
    steps: int
    data: str
    model: str
    seconds: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0
    positions: str = "all"
    n_examples: int = 0
    n_answer_tokens: int = 0
    loglik: float = 0.0  # L at the real activations (sum over answer tokens and examples)
    param_counts: dict | None = None
    extra: dict = field(default_factory=dict)
    target: str = "answer"  # the objective (see `targets`); scores from before targets existed are `answer`
    baseline: str = "zero"  # where the integration path starts
    items: list[torch.Tensor] | None = None  # per-item scores float32 [n_items, d_ff] per layer (optional)

    def widths(self) -> list[int]:
        return [int(s.numel()) for s in self.layers]

    def meta(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        return {
            "kind": "neuron_scores",
            "method": self.method,
            "steps": self.steps,
            "data": self.data,
            "model": self.model,
            "seconds": self.seconds,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "positions": self.positions,
            "n_examples": self.n_examples,
            "n_answer_tokens": self.n_answer_tokens,
            "loglik": self.loglik,
            "param_counts": self.param_counts,
            "widths": self.widths(),
            "extra": self.extra,
            "target": self.target,
            "baseline": self.baseline,
            "has_items": self.items is not None,
        }

    def counts(self) -> ParamCounts | None:
        """The stored `ParamCounts` of the model the scores came from (None if not stored)."""
        return ParamCounts.from_dict(self.param_counts) if self.param_counts else None

    def check_fits(self, model: nn.Module) -> None:
        """SimuError unless these scores have the layer count and widths of `model`."""
        check_widths(self.widths(), neuron_widths(model), f"score file ({self.model})")

    def save(self, path: str | Path) -> None:
        """Write `path` (safetensors, `layer.<i>` float32 [d_ff], metadata inside) and `<path>.json`;
        per-item scores go to `items_path(path)` (`layer.<i>` float32 [n_items, d_ff])."""
        meta = self.meta()
        write_layers(path, self.layers, torch.float32, meta, meta)
        if self.items is not None:
            item_meta = {
                "kind": "neuron_item_scores",
                "scores": Path(path).name,
                "n_items": int(self.items[0].shape[0]),
            }
            write_layers(items_path(path), self.items, torch.float32, item_meta, item_meta)

    @classmethod
    def load(cls, path: str | Path) -> NeuronScores:
        """Read scores written by `save` (with their per-item scores when they were saved)."""
        tensors, meta = read_layers(path, "neuron_scores")
        known = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta and k not in ("layers", "items")}
        known.setdefault("method", "unknown")
        known.setdefault("steps", 0)
        known.setdefault("data", "unknown")
        known.setdefault("model", "unknown")
        items = None
        if meta.get("has_items"):
            items = [t.to(torch.float32) for t in read_layers(items_path(path), "neuron_item_scores")[0]]
        return cls(layers=[t.to(torch.float32) for t in tensors], items=items, **known)


def items_path(path: str | Path) -> Path:
    """Where the per-item scores of a scores file live: `<stem>.items.safetensors` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.items{path.suffix or '.safetensors'}")


# --------------------------------------------------------------------------------------------
# The mask
# --------------------------------------------------------------------------------------------


@dataclass
class NeuronMask:
    """Selected MLP neurons: `layers[l]` is a bool tensor [d_ff_l] (True = critical / trainable)."""

    layers: list[torch.Tensor]
    rule: str
    params: dict = field(default_factory=dict)

    def counts(self) -> list[int]:
        """Selected neurons per layer."""
        return [int(m.sum()) for m in self.layers]

    def total(self) -> int:
        """Selected neurons in all layers."""
        return sum(self.counts())

    def widths(self) -> list[int]:
        """d_ff of every layer."""
        return [int(m.numel()) for m in self.layers]

    def fraction(self) -> float:
        """Selected neurons / all neurons."""
        return self.total() / max(1, sum(self.widths()))

    def indices(self, layer: int) -> torch.Tensor:
        """Indices (long [n]) of the selected neurons of one layer."""
        return torch.nonzero(self.layers[layer], as_tuple=False).flatten()

    def summary(self) -> dict:
        """JSON-ready counts, widths, rule and params."""
        return {
            "rule": self.rule,
            "params": self.params,
            "counts": self.counts(),
            "widths": self.widths(),
            "total": self.total(),
            "fraction": self.fraction(),
        }

    def save(self, path: str | Path) -> None:
        """Write `path` (safetensors, `layer.<i>` bool [d_ff]) and the sidecar `<path>.json`."""
        meta = {"kind": "neuron_mask", "rule": self.rule, "params": self.params}
        sidecar = {**meta, "counts": self.counts(), "widths": self.widths(), "total": self.total()}
        write_layers(path, self.layers, torch.bool, meta, sidecar)

    @classmethod
    def load(cls, path: str | Path) -> NeuronMask:
        """Read a mask written by `save` (rule and params come from the file's own metadata)."""
        tensors, meta = read_layers(path, "neuron_mask")
        layers = [t.to(torch.bool) for t in tensors]
        return cls(layers, meta.get("rule", "unknown"), meta.get("params", {}))
