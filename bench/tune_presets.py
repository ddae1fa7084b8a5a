"""The documented preset search: a small grid per method on one split with the tuning seed.

Every grid point is one quality cell (`simu_core.benchmark`: unlearn with the preset plus the
point's overrides, then the full metrics suite against the retain reference), so the numbers are
the same kind as the quality table's; only the seed differs (the table never uses the tuning seed).
Cells are stored per point under `bench/results/tuning/<method>/<point>/` and resumed.

    .venv/bin/python bench/tune_presets.py --method simu --grid gamma=5,10 --grid mask.value=0.2,0.4
    .venv/bin/python bench/tune_presets.py --method so_graddiff --grid lr=5e-5,1e-4,2e-4

Prints one row per point (forget EM, retain EM, world-facts EM, model utility, log10 forget quality,
steps) and writes bench/results/tuning/<method>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simu_core.benchmark import TUNING_SEED, QualityConfig, ensure_size, run_quality  # noqa: E402
from simu_core.metrics import EvalConfig  # noqa: E402

COLUMNS = ("forget/exact_match", "retain/exact_match", "world_facts/exact_match", "model_utility",
           "log10_forget_quality", "steps_done")  # fmt: skip


def parse_value(text: str):
    """'5' -> 5, '1e-4' -> 0.0001, 'true' -> True, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def grid_points(grid: list[str]) -> list[dict]:
    """['gamma=5,10', 'mask.value=0.2'] -> [{'gamma': 5, 'mask.value': 0.2}, {'gamma': 10, ...}]."""
    axes = []
    for item in grid:
        name, _, values = item.partition("=")
        axes.append([(name, parse_value(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def as_overrides(point: dict) -> dict:
    """Dotted `mask.x` keys become the nested mask dict `preset_config` merges into the preset's."""
    overrides: dict = {}
    for name, value in point.items():
        if name.startswith("mask."):
            overrides.setdefault("mask", {})[name.removeprefix("mask.")] = value
        else:
            overrides[name] = value
    return overrides


def point_name(point: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items()) or "preset"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--grid", action="append", default=[], help="NAME=V1,V2 (repeatable; mask.NAME for mask)")
    parser.add_argument("--split", default="forget10")
    parser.add_argument("--root", default=None, help="built-in cache folder (default: the user's built-in)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.root or str(ensure_size(None))
    out_root = REPO / "bench" / "results" / "tuning" / args.method
    rows = []
    for point in grid_points(args.grid):
        qc = QualityConfig(splits=[args.split], methods=[args.method], seeds=[TUNING_SEED],
                           eval=EvalConfig(max_items=200, max_new_tokens=32), overrides=as_overrides(point),
                           root=root, out=str(out_root / point_name(point)))  # fmt: skip
        result = run_quality(qc)
        record = next(r for r in result.records if r["method"] == args.method)
        values = {c: record.get(c, record["metrics"].get(c)) for c in COLUMNS}
        rows.append({"point": point, "status": record["status"], **values})
        print(point_name(point).ljust(48), record["status"].ljust(7),
              " ".join(f"{c.split('/')[0][:6]}={v:.3f}" if isinstance(v, float) else f"{c}={v}"
                       for c, v in values.items()), flush=True)  # fmt: skip
    out = out_root.with_suffix(".json")
    existing = json.loads(out.read_text()) if out.exists() else []
    seen = {json.dumps(r["point"], sort_keys=True) for r in rows}
    kept = [r for r in existing if json.dumps(r["point"], sort_keys=True) not in seen]
    out.write_text(json.dumps(kept + rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
