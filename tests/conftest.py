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

from simu_core.config import builtin_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The "small" built-in: builds in well under a minute on 2 cores, big enough to memorise its data.
TEST_BUILTIN = builtin_config("small")


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

    loaded = load_model("builtin:full", device="cpu", root=builtin_dir)
    FULL_MODEL_STATE["tensors"] = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    return loaded


FULL_MODEL_STATE: dict = {}


@pytest.fixture(autouse=True)
def _full_model_untouched(request):
    """Every test that uses the shared `full_model` leaves its weights exactly as loaded."""
    yield
    if "full_model" not in request.fixturenames or not FULL_MODEL_STATE:
        return
    model = request.getfixturevalue("full_model").model
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, FULL_MODEL_STATE["tensors"][k])]
    assert not changed, f"{request.node.nodeid} modified the shared full_model in place: {changed[:3]}"


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing browser test leaves what its page showed (visible text and a screenshot) in artifacts/, for CI."""
    report = yield
    page = item.funcargs.get("page") if hasattr(item, "funcargs") else None
    if report.failed and call.when == "call" and page is not None and hasattr(page, "screenshot"):
        out = Path(__file__).resolve().parents[1] / "artifacts" / "failures"
        out.mkdir(parents=True, exist_ok=True)
        name = item.name.replace("/", "_")
        try:
            (out / f"{name}.txt").write_text(page.inner_text("body", timeout=5_000), encoding="utf-8")
            page.screenshot(path=str(out / f"{name}.png"))
        except Exception as err:  # the page may be gone: the report matters more than the evidence
            (out / f"{name}.txt").write_text(f"could not read the page: {err}", encoding="utf-8")
    return report
