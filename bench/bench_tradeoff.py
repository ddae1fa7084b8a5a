"""Trade-off curves on the built-in, and each method at MUSE's matched-forgetting checkpoint (issue 17).

    .venv/bin/python bench/bench_tradeoff.py [--methods simu,random_mask,simu_paper,so_graddiff,fo_graddiff]
        [--seeds 1] [--steps 200] [--every 10] [--items 50] [--split forget10] [--threads 1] [--set NAME=VALUE]
    .venv/bin/python bench/bench_tradeoff.py --pool bench/results/tradeoff_forget10b.json,bench/results/tradeoff_forget10c.json

    --split forget10b / forget10c: authors disjoint from forget10 (where the presets were tuned, seed 0),
    each with its own retain reference (built on first use: `build-default --parts retain10b`).
    --set rho_share=0.3: Sophia calibrated to 30% unclipped coordinates, on top of every preset.
    --root DIR: another built-in cache, e.g. a two-stage build (`python -m simu_core build-staged`; give --out
    too). `bench/staged.sh` runs this bench on three two-stage base models.

Every method runs at its preset (`methods.preset_config`) with the same step budget and no early stop,
and scores the model every `--every` steps (`metrics.curve.checkpoint_scores`: greedy exact match and
ROUGE-L recall on the same seeded `--items` forget, retain and world-facts items, and the teacher-forced
fact probe on forget and retain). The retain reference
model (never trained on the forget authors) gives the target: MUSE's rule reads each run at its first
checkpoint whose forget ROUGE-L is at or below the reference's, so all methods are compared where they
forget as much as that model, not more; a second reading takes the first checkpoint at the EM stop
(forget exact match <= 0.05), the quality table's rule. Seeds change batch order, Sophia's sampled
labels and the random mask. Writes bench/results/tradeoff.json, results/tradeoff/curves.html (one figure
per seed) and prints a Markdown table (load average at start and end), then each comparison of
`PAIRS` at both readings, paired by seed with a 95% t-interval. Resumable: runs already in --out with
the same settings are kept, so `--seeds 3` after `--seeds 1` computes seeds 2 and 3 only. `--pool A.json,B.json`
pairs the runs of several files (each pair within one base model, split and seed) for intervals over all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from pathlib import Path

import _common
import torch

from simu_core import data as qa
from simu_core.benchmark import paired_difference, read_tuned
from simu_core.config import parse_settings
from simu_core.errors import SimuError
from simu_core.evaluation import builtin_companions, default_reference
from simu_core.figures import curve_points, tradeoff_figure, write_figures
from simu_core.methods import preset_config
from simu_core.metrics.curve import checkpoint_scores, first_reaching
from simu_core.models import load_model
from simu_core.unlearn import unlearn

KEPT = ("retain/exact_match", "world_facts/exact_match")
PROBE = "forget/fact_probe"  # teacher-forced: is the fact's value still the top prediction (runs since it was added)
# The issue's two questions: SIMU (ours and the paper's) against the unmasked baselines, each mask against
# its random control of the same size.
PAIRS = (("simu", "so_graddiff"), ("simu", "fo_graddiff"), ("simu_paper", "so_graddiff"),
         ("simu_paper", "fo_graddiff"), ("simu", "random_mask"), ("simu_paper", "random_mask_paper"))  # fmt: skip
READINGS = {"muse": "MUSE", "em_stop": "EM stop"}  # MUSE's checkpoint; the quality table's EM stop
# Settings that make stored runs reusable, with the value of files written before the setting existed.
SAME_RUNS = {"steps": None, "every": None, "items": None, "split": None, "set": [], "root": None, "stop_read": False}


def run_config(
    method: str, seed: int, settings: dict, retain_spec: str, steps: int, every: int, overrides: dict | None = None
):
    """`method`'s preset with this bench's settings (`--set`, split, items), `overrides` (e.g. a tuned lr and
    retain weight), `steps` steps and no early stop."""
    config = preset_config(method, **{**parse_settings(settings["set"]), **(overrides or {}),
                                      "forget": f"builtin:{settings['split']}", "steps": steps,
                                      "retain": retain_spec, "seed": seed, "curve_every": every,
                                      "curve_items": settings["items"]})  # fmt: skip
    config.stop_forget_em = None
    return config


def curve_of(
    method: str, seed: int, base, sets: dict, args, overrides: dict | None = None, stop_at: dict | None = None
) -> dict:
    """One run of `method` with a curve point every `args.every` steps (the original model's point first).

    `stop_at` {score: target}: end the run once every score has been at or below its target at some curve
    point (the readings are taken by then; later points would not be read)."""
    config = run_config(method, seed, vars(args), sets["retain_spec"], args.steps, args.every, overrides)
    cancel, met = threading.Event(), set()

    def stop_once_read(record) -> None:
        met.update(k for k, target in stop_at.items() if (record.curve or {}).get(k, math.inf) <= target)
        if met == set(stop_at):
            cancel.set()

    start = time.perf_counter()
    result = unlearn(base, sets["forget"], sets["retain"], config, curve_sets={"world_facts": sets["world_facts"]},
                     callback=stop_once_read if stop_at else None, cancel=cancel)  # fmt: skip
    points = [{"step": 0, **sets["original"]}, *curve_points([r.to_dict() for r in result.history])]
    summary = result.summary()
    return {"method": method, "seed": seed, "status": result.status, "steps_done": len(result.history),
            "rho": result.config.rho, "unclipped_mean": summary.get("unclipped_mean"),
            "overrides": overrides or {}, "seconds": round(time.perf_counter() - start, 1), "points": points}  # fmt: skip


def bench_models(split: str, root: str | None) -> tuple:
    """The base model `builtin:full` (under `root`), the split's forget / retain / world-facts sets (with
    "retain_spec", and "scored": the three sets each checkpoint is scored on), and its retain reference model."""
    specs = builtin_companions(f"builtin:{split}")
    base = load_model("builtin:full", device="cpu", root=root)
    sets = {name: qa.load_data(specs[name], root=root) for name in ("forget", "retain", "world_facts")}
    sets["scored"] = dict(sets)
    sets["retain_spec"] = specs["retain"]
    reference = load_model(default_reference("builtin:full", f"builtin:{split}"), device="cpu", root=root)
    return base, sets, reference


def bench_sets(split: str, root: str | None, items: int) -> tuple:
    """`bench_models`, with the original model's scores in the sets ("original") and the reference's scores
    in place of its model (`checkpoint_scores`, `items` per set)."""
    base, sets, reference = bench_models(split, root)
    sets["original"] = checkpoint_scores(base, base.model, sets["scored"], items)
    return base, sets, checkpoint_scores(reference, reference.model, sets["scored"], items)


def readings(run: dict, reference_rouge: float) -> dict:
    """The run at MUSE's checkpoint (forget ROUGE-L <= the reference's) and at the EM stop (<= 0.05)."""
    muse = first_reaching(run["points"], reference_rouge)
    em = first_reaching(run["points"], 0.05, key="forget/exact_match")
    return {"muse": muse, "em_stop": em}


def markdown(runs: list[dict], reference: dict) -> str:
    head = ("method", "seed", "MUSE step", "forget ROUGE-L", "retain EM", "world facts EM", "forget fact probe",
            "EM-stop step", "retain EM", "world facts EM", "forget fact probe")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    probe = f"{reference[PROBE]:.3f}" if PROBE in reference else "–"
    lines.append(f"| *retain reference* | – | – | {reference['forget/rouge_l']:.3f} | {reference['retain/exact_match']:.3f} "
                 f"| {reference['world_facts/exact_match']:.3f} | {probe} | – | – | – | – |")  # fmt: skip
    for run in runs:
        cells = [run["method"], str(run["seed"])]
        for name in READINGS:
            point = run[name]
            if point is None:
                cells += ["not reached"] + ["–"] * (4 if name == "muse" else 3)
                continue
            cells.append(str(point["step"]))
            if name == "muse":
                cells.append(f"{point['forget/rouge_l']:.3f}")
            cells += [f"{point[k]:.3f}" for k in KEPT]
            cells.append(f"{point[PROBE]:.3f}" if PROBE in point else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_readings(runs: list[dict]) -> list[dict]:
    """Every pair of `PAIRS` that both ran, on each kept score at both readings: method a minus b, paired
    by seed (95% t over the seeds; `benchmark.paired_difference`). A run that never reached a reading
    has no value there, and its seed drops out of that comparison."""
    records = [{"split": name, "method": r["method"], "seed": r["seed"],
                **({k: r[name].get(k) for k in (*KEPT, PROBE)} if r[name] else {})}
               for r in runs for name in READINGS]  # fmt: skip
    methods = {r["method"] for r in runs}
    return [{"reading": name, "a": a, "b": b, "score": k, **paired_difference(records, name, a, b, k)}
            for name in READINGS for a, b in PAIRS if {a, b} <= methods for k in (*KEPT, PROBE)]  # fmt: skip


def paired_markdown(rows: list[dict]) -> str:
    def cell(row: dict) -> str:
        if row["diff"] is None:
            return "–"
        if row["low"] is None:
            return f"{row['diff']:+.3f} ({row['word']}, {row['n']} pairs)"
        return f"{row['diff']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] {row['word']} ({row['n']} pairs)"

    head = "| reading | a − b | retain EM | world facts EM | forget fact probe |\n|---|---|---|---|---|"
    lines = [head]
    for name, label in READINGS.items():
        for a, b in PAIRS:
            pair = {r["score"]: r for r in rows if r["reading"] == name and (r["a"], r["b"]) == (a, b)}
            if pair:
                cells = [cell(pair[k]) for k in (*KEPT, PROBE)]
                lines.append(f"| {label} | {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def means_markdown(runs: list[dict]) -> str:
    """Per method, the mean over its runs at each reading (step, retain and world facts EM, forget fact probe),
    with how many runs reached it, and Sophia's mean unclipped share (runs since it was stored; AdamW: 100%)."""
    keys = ("step", *KEPT, PROBE)
    lines = ["| method | Sophia unclipped | reading | runs reaching it | step | retain EM | world facts EM | "
             "forget fact probe |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        shares = [r["unclipped_mean"] for r in mine if r.get("unclipped_mean") is not None]
        unclipped = f"{100 * sum(shares) / len(shares):.2f}%" if shares else "–"
        for name, label in READINGS.items():
            points = [r[name] for r in mine if r[name]]
            cells = []
            for key in keys:
                values = [p[key] for p in points if p.get(key) is not None]
                cells.append(f"{sum(values) / len(values):.{0 if key == 'step' else 3}f}" if values else "–")
            lines.append(
                f"| {method} | {unclipped} | {label} | {len(points)} of {len(mine)} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def pooled_runs(paths: list[str]) -> list[dict]:
    """The runs of several JSON files (one per split and base model), each seed renamed "<base>:<split>:<seed>"
    so that pairs stay within one base model, split and seed, and the intervals run over all of them."""
    runs = []
    for path in paths:
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
        settings = stored["settings"]
        base = Path(settings["root"]).name if settings.get("root") else "builtin"
        runs += [{**run, "seed": f"{base}:{settings['split']}:{run['seed']}"} for run in stored["runs"]]
    return runs


def tuned_picks(path: str | None, methods: list[str]) -> dict | None:
    """Each method's tuned settings from `bench/tune_equal.py`'s JSON (a control takes its method's; the step
    budget is this bench's `--steps`), or None."""
    if not path:
        return None
    try:
        tuned = read_tuned(path, methods)
    except SimuError as error:
        raise SystemExit(str(error)) from None
    return {m: {k: v for k, v in settings.items() if k != "steps"} for m, settings in tuned.items()}


def stored_runs(args) -> list[dict]:
    """The runs in --out made with the same settings and, each, its method's current pick (`--tuned`; none:
    the preset); none if the file is absent or its settings differ."""
    path = Path(args.out)
    if not path.exists():
        return []
    stored = json.loads(path.read_text(encoding="utf-8"))
    if any(stored["settings"].get(k, old) != getattr(args, k) for k, old in SAME_RUNS.items()):
        return []
    return [r for r in stored["runs"] if r.get("overrides", {}) == (args.picks or {}).get(r["method"], {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="simu,random_mask,simu_paper,so_graddiff,fo_graddiff")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="every method's step budget (no early stop)")
    parser.add_argument("--every", type=int, default=10, help="steps between curve points")
    parser.add_argument("--items", type=int, default=50, help="items per set at each point")
    parser.add_argument("--split", default="forget10")
    parser.add_argument("--root", default=None, help="a built-in cache folder, e.g. a two-stage build "
                        "(`python -m simu_core build-staged`); default: the built-in default's; give --out too")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting on top of every method's preset (e.g. rho_share=0.3); give --out too")  # fmt: skip
    parser.add_argument("--tuned", default=None, help="bench/tune_equal.py's JSON: every method at its pick from that "
                        "equal grid instead of its preset (a random-mask control at its method's); give --out too")  # fmt: skip
    parser.add_argument(
        "--stop-read",
        action="store_true",
        help="end each run once it has reached both readings (saves the steps no reading uses)",
    )
    parser.add_argument("--out", default=None, help="default bench/results/tradeoff.json (other splits: _<split>)")
    parser.add_argument("--html", default=None, help="default results/tradeoff/curves.html (other splits: _<split>)")
    parser.add_argument("--plot-only", action="store_true", help="compute nothing: draw --html from the runs in --out")
    parser.add_argument("--pool", default=None, help="compute nothing: FILE,FILE,... of this script's JSON (one per "
                        "split); prints the comparisons over every (split, seed) pair of them together")  # fmt: skip
    args = parser.parse_args()
    if args.pool:
        runs = pooled_runs(args.pool.split(","))
        return print(means_markdown(runs) + "\n\n" + paired_markdown(paired_readings(runs)))
    args.picks = tuned_picks(args.tuned, args.methods.split(","))
    suffix = "" if args.split == "forget10" else f"_{args.split}"
    args.out = args.out or str(_common.RESULTS / f"tradeoff{suffix}.json")
    args.html = args.html or str(_common.REPO / "results" / "tradeoff" / f"curves{suffix}.html")
    if args.plot_only:
        stored = json.loads(Path(args.out).read_text(encoding="utf-8"))
        return plot(stored["runs"], stored["reference"], args)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    base, sets, reference = bench_sets(args.split, args.root, args.items)
    runs = stored_runs(args)
    done = {(r["method"], r["seed"]) for r in runs}
    both_read = {"forget/rouge_l": reference["forget/rouge_l"], "forget/exact_match": 0.05}  # the two readings
    for seed in range(1, args.seeds + 1):
        for method in args.methods.split(","):
            if (method, seed) in done:
                continue
            run = curve_of(method, seed, base, sets, args, (args.picks or {}).get(method),
                           both_read if args.stop_read else None)  # fmt: skip
            runs.append({**run, **readings(run, reference["forget/rouge_l"])})
            print(f"{method} seed {seed}: {run['steps_done']} steps, {run['seconds']} s", flush=True)
            table = markdown(runs, reference)  # written after every run: a long job keeps what it did
            paired = paired_readings(runs)
            _common.write_json(args.out, {"settings": vars(args), "reference": reference, "original": sets["original"],
                                          "runs": runs, "markdown": table, "paired": paired,
                                          "paired_markdown": paired_markdown(paired), "cpu_count": os.cpu_count(),
                                          "load_average": [load_start, os.getloadavg()]})  # fmt: skip
    print(markdown(runs, reference))
    print(means_markdown(runs))
    print(paired_markdown(paired_readings(runs)))
    plot(runs, reference, args)


def plot(runs: list[dict], reference: dict, args) -> None:
    """One trade-off figure per seed (every method's curve, the reference's forget ROUGE-L dotted) -> --html."""
    seeds = sorted({r["seed"] for r in runs})
    where = f"{Path(args.root).name}, " if getattr(args, "root", None) else ""
    figures = [tradeoff_figure({r["method"]: r["points"] for r in runs if r["seed"] == seed},
                               reference["forget/rouge_l"]).update_layout(title=f"{where}{args.split}, seed {seed}")
               for seed in seeds]  # fmt: skip
    print(f"wrote {write_figures(args.html, figures, f'Trade-off curves on the built-in ({args.split})')}")


if __name__ == "__main__":
    main()
