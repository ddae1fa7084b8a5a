"""Benchmark: full evaluation of the built-in model (forget10 + retain + holdout + world facts, with
the retain10 reference), seconds per metric family. Target: < 20 s on 2 CPU cores.

    .venv/bin/python bench/bench_metrics.py [--threads 2] [--max-items 400] [--all-items]

Uses the full-size built-in default ($SIMU_HOME/builtin) when it is built, else the small test
build in .pytest_cache/simu_builtin (the output says which). Prints a table and writes
bench/results/metrics.json. With --all-items it also times the evaluation of every item (no
per-split sample), to show what the `max_items` sample saves.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch  # noqa: E402
from _common import RESULTS, pick_root, write_json  # noqa: E402

from simu_core import builtin, evaluation, metrics, models  # noqa: E402
from simu_core import data as qa  # noqa: E402

FAMILIES = ("generation", "likelihood", "truth_ratio", "membership", "fluency", "summary", "reference")


def run_once(full, reference, datasets, config: metrics.EvalConfig) -> tuple[metrics.Report, float]:
    start = time.perf_counter()
    report = metrics.evaluate(full, datasets, reference, config)
    return report, time.perf_counter() - start


def row(report: metrics.Report, wall: float) -> dict:
    return {
        "wall_seconds": round(wall, 3),
        "seconds": {f: report.seconds.get(f, 0.0) for f in FAMILIES},
        "items": {name: len(s.indices) for name, s in report.splits.items()},
        "items_total": {name: s.n_total for name, s in report.splits.items()},
        "headline": {k: report.summary.get(k) for k in ("forget_quality", "model_utility", "privleak", "mia_score")},
        "forget_rouge_l": report.summary.get("forget/rouge_l"),
        "retain_rouge_l": report.summary.get("retain/rouge_l"),
    }


def print_table(rows: dict[str, dict]) -> None:
    names = list(rows)
    print(f"{'family':<14}" + "".join(f"{n:>16}" for n in names))
    for family in FAMILIES:
        print(f"{family:<14}" + "".join(f"{rows[n]['seconds'][family]:>15.2f}s" for n in names))
    print(f"{'total (wall)':<14}" + "".join(f"{rows[n]['wall_seconds']:>15.2f}s" for n in names))
    for n in names:
        items = ", ".join(f"{k} {v}/{rows[n]['items_total'][k]}" for k, v in rows[n]["items"].items())
        print(f"{n}: items {items}; headline {rows[n]['headline']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--max-items", type=int, default=metrics.EvalConfig().max_items, help="sample per split")
    parser.add_argument("--all-items", action="store_true", help="also time the evaluation of every item")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "metrics.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    root, which = pick_root(None)
    print(f"build: {which}", flush=True)
    full = models.load_model("builtin:full", device=args.device, root=root)
    reference = models.load_model("builtin:retain10", device=args.device, root=root)
    specs = evaluation.builtin_companions("builtin:forget10")
    datasets = {name: qa.load_data(spec, root=root) for name, spec in specs.items()}
    load_avg = os.getloadavg()[0]

    rows = {}
    config = metrics.EvalConfig(max_items=args.max_items)
    rows[f"max_items={args.max_items}"] = row(*run_once(full, reference, datasets, config))
    if args.all_items:
        rows["all items"] = row(*run_once(full, reference, datasets, metrics.EvalConfig(max_items=None)))
    print_table(rows)

    result = {
        "build": str(root),
        "build_kind": which,
        "n_authors": builtin.read_manifest(root)["config"]["n_authors"],
        "device": args.device,
        "threads": args.threads,
        "load_average_1min_at_start": load_avg,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "target_seconds": 20,
        "runs": rows,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
