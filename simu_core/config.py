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


def builtin_root() -> Path:
    """Where the built-in default is cached: $SIMU_HOME/builtin."""
    return simu_home() / "builtin"


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config dataclass (nested dataclasses become dicts)."""
    return dataclasses.asdict(config)


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

    epochs: int = 14
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 30


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
