"""The documented preset search: a small grid per method on one split with the tuning seed.

Every grid point is one quality cell (`simu_core.benchmark`: unlearn with the preset plus the
point's overrides, then the full metrics suite against the retain reference), so the numbers are
the same kind as the quality table's; only the seed differs (the table never uses the tuning seed).
Cells are stored per point under `bench/results/tuning/<method>/<point>/` and resumed.

    .venv/bin/python bench/tune_presets.py --method simu --grid gamma=5,10 --grid mask.value=0.2,0.4
    .venv/bin/python bench/tune_presets.py --method so_graddiff --grid lr=5e-5,1e-4,2e-4

    .venv/bin/python bench/tune_presets.py --method simu --table     # only the table of stored points

    # SmolLM2's presets: tuned on the real-knowledge benchmark's other_capitals (never reported)
    .venv/bin/python bench/tune_presets.py --benchmark smollm2 --method simu --grid lr=3e-5,1e-4,3e-4

Then prints every point stored for the method so far (forget EM, retain EM, world-facts EM, model
utility, log10 forget quality, steps) as a Markdown table and writes bench/results/tuning/<method>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from _common import RESULTS, write_json  # noqa: E402

from simu_core.benchmark import TUNING_SEED, QualityConfig, ensure_size, get_benchmark, run_quality  # noqa: E402
from simu_core.config import parse_setting_value, unlearn_overrides  # noqa: E402
from simu_core.methods import METHODS  # noqa: E402
from simu_core.metrics import EvalConfig  # noqa: E402

COLUMNS = {
    "builtin": ("forget/exact_match", "retain/exact_match", "world_facts/exact_match", "model_utility",
                "log10_forget_quality", "steps_done"),
    "smollm2": ("forget/knows", "forget/prob", "retain/knows", "neighbour/knows", "general/knows",
                "model_utility", "steps_done"),
}  # fmt: skip
SPLIT = {"builtin": "forget10", "smollm2": "other_capitals"}
# The effective settings of a point, read back from its cell's config (the point name lists only the overrides);
# the trainable-set and mask settings only mean something for the masked methods.
SETTINGS = ("lr", "gamma", "steps")
MASKED_SETTINGS = ("attention", "mlp_parts", "mask.value", "mask.score", "mask.dual")
MASKED = tuple(name for name, method in METHODS.items() if method.mask is not None)


def grid_points(grid: list[str]) -> list[dict]:
    """['gamma=5,10', 'mask.value=0.2'] -> [{'gamma': 5, 'mask.value': 0.2}, {'gamma': 10, ...}]."""
    axes = []
    for item in grid:
        name, _, values = item.partition("=")
        axes.append([(name, parse_setting_value(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def point_name(point: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items()) or "preset"


def tuning_folder(benchmark: str, method: str):
    """bench/results/tuning/<method> for the built-in, bench/results/tuning/<benchmark>/<method> else."""
    return RESULTS / "tuning" / (method if benchmark == "builtin" else f"{benchmark}/{method}")


def stored_points(method: str, benchmark: str = "builtin") -> list[dict]:
    """Every grid point of `method` stored so far (any call), as rows: point, status, mask size, metrics."""
    rows = []
    folder = tuning_folder(benchmark, method)
    for cell in sorted(folder.glob(f"*/quality/cells/*__{method}__seed{TUNING_SEED}.json")):
        record = json.loads(cell.read_text(encoding="utf-8"))
        values = {c: record.get(c, record["metrics"].get(c)) for c in COLUMNS[benchmark]}
        rows.append({"point": cell.parents[2].name, "status": record["status"],
                     "settings": effective_settings(record["config"], method),
                     "mask_neurons": record.get("mask_neurons"), **values})  # fmt: skip
    return rows


def effective_settings(config: dict, method: str) -> dict:
    """The `SETTINGS` (and, for masked methods, `MASKED_SETTINGS`) of one cell's unlearning config."""
    names = SETTINGS + MASKED_SETTINGS if method in MASKED else SETTINGS
    return {n: config["mask"][n.removeprefix("mask.")] if n.startswith("mask.") else config[n] for n in names}


def markdown(method: str, rows: list[dict], benchmark: str = "builtin") -> str:
    """One Markdown table of the stored points of `method`."""
    columns = COLUMNS[benchmark]
    head = ["point", "settings", "status", "mask neurons", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
        cells = [f"`{row['point']}`", settings, row["status"], str(row["mask_neurons"] or "-")]
        cells += [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return f"#### {method}\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=tuple(COLUMNS), default="builtin")
    parser.add_argument("--method", required=True)
    parser.add_argument("--grid", action="append", default=[], help="NAME=V1,V2 (repeatable; mask.NAME for mask)")
    parser.add_argument("--split", default=None, help="tuning split (default forget10; smollm2: other_capitals)")
    parser.add_argument("--root", default=None, help="built-in cache folder (default: the user's built-in)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only print the stored points as Markdown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_root = tuning_folder(args.benchmark, args.method)
    split = args.split or SPLIT[args.benchmark]
    if not args.table:
        builtin = args.benchmark == "builtin"
        root = args.root or (str(ensure_size(None)) if builtin else None)
        new_tokens = get_benchmark(args.benchmark).answer_tokens
        for point in grid_points(args.grid):
            qc = QualityConfig(splits=[split], methods=[args.method], seeds=[TUNING_SEED],
                               eval=EvalConfig(max_items=200, max_new_tokens=new_tokens), overrides=unlearn_overrides(point),
                               root=root, out=str(out_root / point_name(point)), benchmark=args.benchmark)  # fmt: skip
            record = next(r for r in run_quality(qc).records if r["method"] == args.method)
            print(point_name(point).ljust(48), record["status"], record["metrics"].get("model_utility"), flush=True)
    rows = stored_points(args.method, args.benchmark)
    write_json(out_root.with_suffix(".json"), rows)
    print(markdown(args.method, rows, args.benchmark))


if __name__ == "__main__":
    main()
