"""What every benchmark script shares: where the model comes from and where results go."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simu_core.builtin import builtin_status  # noqa: E402
from simu_core.config import builtin_root  # noqa: E402

TEST_BUILD = REPO / ".pytest_cache" / "simu_builtin"
RESULTS = REPO / "bench" / "results"


def pick_root(root: str | None) -> tuple[Path, str]:
    """The built-in folder to measure on and why: `--root`, else the user's built-in default, else the
    small test build. Nothing is built here."""
    if root:
        return Path(root), "--root"
    if builtin_status(builtin_root()) == "ok":
        return builtin_root(), "user built-in default"
    if builtin_status(TEST_BUILD) == "ok":
        return TEST_BUILD, "test-size build (the full built-in default is not built)"
    raise SystemExit("no built-in model found: run `python -m simu_core build-default` or pass --root")


def write_json(path: str | Path, result: dict) -> Path:
    """Write a benchmark's result as indented JSON (folders made as needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(f"wrote {path}")
    return path
