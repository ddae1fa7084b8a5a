"""Shared fixtures: a small built-in default (cached between runs) and offline hub settings."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a hub: set before transformers / datasets are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: results do not move with the core count, and the app server that the browser test
# starts does not fight the test process for the two cores.
torch.set_num_threads(1)

from simu_core.config import BuiltinConfig, TinyModelConfig, TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Small enough to build in well under a minute on 2 cores, big enough to memorise its data.
TEST_BUILTIN = BuiltinConfig(
    n_authors=20,
    seed=0,
    model=TinyModelConfig(n_layers=2, d_model=64, d_ff=256, n_heads=4, vocab_size=512, max_positions=96),
    train=TrainConfig(epochs=40, batch_size=32, lr=5e-3, warmup_steps=10),
)


@pytest.fixture(autouse=True)
def _isolated_simu_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's own SIMU_HOME."""
    monkeypatch.setenv("SIMU_HOME", str(tmp_path_factory.getbasetemp() / "simu_home"))


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    """A small built-in default (benchmark + models), built once and cached in .pytest_cache."""
    from simu_core.builtin import ensure_builtin

    root = REPO / ".pytest_cache" / "simu_builtin"
    return ensure_builtin(root, TEST_BUILTIN)


@pytest.fixture(scope="session")
def full_model(builtin_dir):
    """The small built-in `full` model on CPU (shared: tests must not modify it)."""
    from simu_core.models import load_model

    return load_model("builtin:full", device="cpu", root=builtin_dir)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny random Llama GGUF, the HF model it was written from, its tokenizers.Tokenizer)."""
    from tests.tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    model, tok = write_tiny_gguf(path)
    return path, model, tok


@pytest.fixture(scope="session")
def converted(tiny_gguf, tmp_path_factory):
    """The tiny GGUF converted once into a session-wide models root (a plain model folder)."""
    from simu_core.pretrained import convert_gguf

    return convert_gguf(tiny_gguf[0], root=tmp_path_factory.mktemp("models"))
