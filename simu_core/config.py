"""Typed settings, saved with every artefact that they produce.

Each dataclass converts to and from plain JSON dicts with `to_dict` / `from_dict`, so a saved
config can be read back and compared field by field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def simu_home() -> Path:
    """Root of SIMU Studio's user files: $SIMU_HOME, else a folder in the user cache."""
    if os.environ.get("SIMU_HOME"):
        return Path(os.environ["SIMU_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "simu-studio"


BUILTIN_SIZES = ("default", "small", "large")


def builtin_size(size: str | None = None) -> str:
    """The built-in size in use: `size` if given, else $SIMU_BUILTIN_SIZE, else "default"."""
    size = size or os.environ.get("SIMU_BUILTIN_SIZE") or "default"
    if size not in BUILTIN_SIZES:
        from simu_core.errors import SimuError

        raise SimuError(f"unknown built-in size '{size}'. Choose one of: {', '.join(BUILTIN_SIZES)}.")
    return size


def builtin_root(size: str | None = None) -> Path:
    """Where the built-in default is cached: $SIMU_HOME/builtin ($SIMU_HOME/builtin-<size> for other sizes)."""
    size = builtin_size(size)
    return simu_home() / ("builtin" if size == "default" else f"builtin-{size}")


def later(default: Any) -> Any:
    """A field added after configs were first saved and hashed: `to_dict` leaves it out while it holds
    its default, so the saved configs, run names and benchmark cell keys of older settings stay the same."""
    return field(default=default, metadata={"omit_default": True})


def _without_later_defaults(config: Any, data: dict) -> dict:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("omit_default") and data.get(f.name) == f.default:
            data.pop(f.name)
        elif dataclasses.is_dataclass(value) and isinstance(data.get(f.name), dict):
            data[f.name] = _without_later_defaults(value, data[f.name])
    return data


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config dataclass (nested dataclasses become dicts; see `later`)."""
    return _without_later_defaults(config, dataclasses.asdict(config))


def from_dict(cls: type[T], data: dict) -> T:
    """Build `cls` from a dict, ignoring unknown keys (configs saved by newer versions load)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TinyModelConfig:
    """Shape of the built-in Llama model (about 1.2M parameters by default)."""

    n_layers: int = 4
    d_model: int = 128
    d_ff: int = 512
    n_heads: int = 4
    vocab_size: int = 1024
    max_positions: int = 128


@dataclass
class TrainConfig:
    """How the built-in models are trained (AdamW, cosine decay, loss on answer tokens only)."""

    epochs: int = 18
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 30
    bucket: int = 0  # sort by length within windows of this many batches (less padding); 0: plain shuffling


@dataclass
class BuiltinConfig:
    """Everything that determines the built-in benchmark and models (part of the cache key)."""

    n_authors: int = 200
    seed: int = 0
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_json(cls, data: dict) -> BuiltinConfig:
        return cls(
            n_authors=data["n_authors"],
            seed=data["seed"],
            model=from_dict(TinyModelConfig, data.get("model", {})),
            train=from_dict(TrainConfig, data.get("train", {})),
        )


def builtin_config(size: str | None = None) -> BuiltinConfig:
    """The built-in config of a size (see `builtin_size`).

    "default": 200 authors, the 1.2M-parameter Llama (CPU friendly). "small": 20 authors and a 2-layer
    0.1M-parameter Llama that builds in well under a minute (the test suite's build; quick demos).
    "large": 1000 authors and an ~82M-parameter Llama (8 layers, d=768, d_ff=3072, 12 heads,
    vocab <= 8192) for machines with a GPU, where localisation has room to work; its recipe is
    untested on CPU (hours there).
    """
    size = builtin_size(size)
    if size == "small":
        return BuiltinConfig(
            n_authors=20,
            model=TinyModelConfig(n_layers=2, d_model=64, d_ff=256, n_heads=4, vocab_size=512, max_positions=96),
            train=TrainConfig(epochs=40, batch_size=32, lr=5e-3, warmup_steps=10),
        )
    if size == "large":
        return BuiltinConfig(
            n_authors=1000,
            model=TinyModelConfig(n_layers=8, d_model=768, d_ff=3072, n_heads=12, vocab_size=8192, max_positions=128),
            train=TrainConfig(epochs=30, batch_size=64, lr=5e-4, weight_decay=0.0, warmup_steps=200),
        )
    return BuiltinConfig()


@dataclass
class MaskConfig:
    """How the `simu` method makes its neuron mask when none is given (see `attribution`, `masks`).

    `method`/`steps`: attribution method and IG steps m; `rule`/`value`: selection rule and its setting
    (threshold t, percent or k); `dual`: include/exclude neurons critical for forget and retain;
    `score`: `forget` or `forget_minus_retain`; `retain_limit`: retain items used for retain scores.
    `target` (answer, fact, contrastive), `baseline` (zero, counterfactual) and `positions` (all,
    answer, subject) choose the attribution objective and path (see `targets`, `attribution`);
    `aggregate` (sum, consistency, ratio) with `top_k` (percent per item) and `eps` how scores become
    a ranking (see `masks`). Their defaults are SIMU's (and the behaviour before they existed).
    """

    method: str = "simu_ig"
    steps: int = 5
    rule: str = "layer_threshold"
    value: float = 0.3
    dual: str = "include"
    score: str = "forget"
    retain_limit: int = 400
    target: str = later("answer")
    baseline: str = later("zero")
    positions: str = later("all")
    aggregate: str = later("sum")
    top_k: float = later(1.0)
    eps: float = later(0.1)


@dataclass
class UnlearnConfig:
    """Every setting of one unlearning run (saved as the run's config.json).

    Learning rates are per optimiser step; losses are in nats per answer token. `gamma` weighs the
    retain term; `rho`, `betas`, `eps`, `hessian_interval` (k; `sqgrad` refreshes every step) and
    `estimator` are Sophia's; `rho_share`, when set, replaces `rho` by the value at which that share
    of Sophia's coordinates stays unclipped (measured by a short probe run first: `calibrate_rho`);
    `attention` / `mlp_parts` ("down" or "down_up") choose SIMU's trainable set. Training stops early once every target set is met: the forget set's greedy exact match (the
    first sentence of each answer against the gold answer, normalised: `answers.answer_matches`)
    falls to `stop_forget_em`, its greedy ROUGE-L recall to `stop_forget_rouge`, its NLL rises to
    `stop_forget_loss` (checked every `eval_every` steps). It fails when the retain loss rises
    `collapse_margin` nats above its start or greedy answers on retain probes degenerate. `shard`
    (runs on several processes only) shards the working copy with FSDP, and the gradients and state
    of whatever trains whole tensors; SIMU's compact slices stay whole on every process.
    `curve_every` > 0 records a trade-off curve: greedy exact match and ROUGE-L on `curve_items` items
    of the forget, retain and any extra sets every that many steps (and at the last step).
    """

    method: str = "simu"
    model: str = "builtin:full"
    forget: str = "builtin:forget10"
    retain: str = "builtin:retain10"
    loss: str = "graddiff"
    optimizer: str = "sophia"
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    retain_batch_size: int = 32
    gamma: float = 1.0
    npo_beta: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    rho: float = 0.04
    rho_share: float | None = later(None)
    weight_decay: float = 0.0
    eps: float = 1e-12
    estimator: str = "gnb"
    hessian_interval: int = 10
    max_grad_norm: float | None = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    attention: bool = True
    mlp_parts: str = "down"
    mask: MaskConfig = field(default_factory=MaskConfig)
    mask_file: str | None = None
    forget_tokens: str = later("answer")  # "fact": ascend only on the fact's value tokens (see `targets`)
    stop_forget_em: float | None = None
    stop_forget_loss: float | None = None
    stop_forget_rouge: float | None = None
    eval_every: int = 10
    collapse_margin: float = 5.0
    probe_every: int = 25
    seed: int = 0
    device: str | None = None
    max_memory_gb: float | None = None
    shard: bool = later(False)  # several processes: shard the weights (and whole tensors' gradients, state) with FSDP
    curve_every: int = later(0)  # > 0: score the model every this many steps (the trade-off curve; `metrics.curve`)
    curve_items: int = later(50)  # items per set scored at each curve point

    @classmethod
    def from_json(cls, data: dict) -> UnlearnConfig:
        config = from_dict(cls, {k: v for k, v in data.items() if k != "mask"})
        config.mask = from_dict(MaskConfig, data.get("mask", {}))
        config.betas = tuple(config.betas)
        return config


def parse_setting_value(text: str) -> Any:
    """'5' -> 5, '1e-4' -> 0.0001, 'true' -> True, 'none' -> None, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def unlearn_overrides(settings: dict[str, Any]) -> dict:
    """{'lr': 1e-4, 'mask.positions': 'subject'} -> {'lr': 1e-4, 'mask': {'positions': 'subject'}}, the
    form `methods.preset_config` takes; names must be `UnlearnConfig` fields or `mask.` + `MaskConfig` fields."""
    from simu_core.errors import SimuError

    fields = {f.name for f in dataclasses.fields(UnlearnConfig)} - {"mask", "method"}
    mask_fields = {f.name for f in dataclasses.fields(MaskConfig)}
    overrides: dict = {}
    for name, value in settings.items():
        inner = name.removeprefix("mask.")
        if name.startswith("mask.") and inner in mask_fields:
            overrides.setdefault("mask", {})[inner] = value
        elif name in fields:
            overrides[name] = value
        else:
            raise SimuError(
                f"unknown setting '{name}'. Use an unlearning setting ({', '.join(sorted(fields))}) "
                f"or mask.<name> ({', '.join(sorted(mask_fields))})."
            )
    return overrides


def parse_settings(items: list[str]) -> dict:
    """['lr=1e-4', 'mask.positions=subject'] (command-line NAME=VALUE pairs) -> `unlearn_overrides`."""
    from simu_core.errors import SimuError

    settings = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SimuError(f"'{item}' is not NAME=VALUE (e.g. lr=1e-4 or mask.positions=subject).")
        settings[name.strip()] = parse_setting_value(value)
    return unlearn_overrides(settings)
