"""Trade-off curves on the built-in, and each method at MUSE's matched-forgetting checkpoint (issue 17).

    .venv/bin/python bench/bench_tradeoff.py [--methods simu,random_mask,simu_paper,so_graddiff,fo_graddiff]
        [--seeds 1] [--steps 200] [--every 10] [--items 50] [--split forget10] [--threads 1]

Every method runs at its preset (`unlearn.preset_config`) with the same step budget and no early stop,
and scores the model every `--every` steps (`metrics.curve.checkpoint_scores`: greedy exact match and
ROUGE-L recall on the same seeded `--items` forget, retain and world-facts items). The retain reference
model (never trained on the forget authors) gives the target: MUSE's rule reads each run at its first
checkpoint whose forget ROUGE-L is at or below the reference's, so all methods are compared where they
forget as much as that model, not more; a second reading takes the first checkpoint at the EM stop
(forget exact match <= 0.05), the quality table's rule. Seeds change batch order, Sophia's sampled
labels and the random mask. Writes bench/results/tradeoff.json, results/tradeoff/curves.html (one figure
per seed) and prints a Markdown table (load average at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import _common
import torch

from simu_core import data as qa
from simu_core.evaluation import builtin_companions, default_reference
from simu_core.figures import curve_points, tradeoff_figure, write_figures
from simu_core.metrics.curve import checkpoint_scores, first_reaching
from simu_core.models import load_model
from simu_core.unlearn import preset_config, unlearn

KEPT = ("retain/exact_match", "world_facts/exact_match")


def curve_of(method: str, seed: int, base, sets: dict, args) -> dict:
    """One run of `method` with a curve point every `args.every` steps (the original model's point first)."""
    config = preset_config(method, forget=f"builtin:{args.split}", retain=sets["retain_spec"], seed=seed,
                           steps=args.steps, curve_every=args.every, curve_items=args.items)  # fmt: skip
    config.stop_forget_em = None
    start = time.perf_counter()
    result = unlearn(base, sets["forget"], sets["retain"], config, curve_sets={"world_facts": sets["world_facts"]})
    points = [{"step": 0, **sets["original"]}, *curve_points([r.to_dict() for r in result.history])]
    return {"method": method, "seed": seed, "status": result.status, "steps_done": len(result.history),
            "seconds": round(time.perf_counter() - start, 1), "points": points}  # fmt: skip


def readings(run: dict, reference_rouge: float) -> dict:
    """The run at MUSE's checkpoint (forget ROUGE-L <= the reference's) and at the EM stop (<= 0.05)."""
    muse = first_reaching(run["points"], reference_rouge)
    em = first_reaching(run["points"], 0.05, key="forget/exact_match")
    return {"muse": muse, "em_stop": em}


def markdown(runs: list[dict], reference: dict) -> str:
    head = ("method", "seed", "MUSE step", "forget ROUGE-L", "retain EM", "world facts EM", "EM-stop step",
            "retain EM", "world facts EM")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| *retain reference* | – | – | {reference['forget/rouge_l']:.3f} | {reference['retain/exact_match']:.3f} "
                 f"| {reference['world_facts/exact_match']:.3f} | – | – | – |")  # fmt: skip
    for run in runs:
        cells = [run["method"], str(run["seed"])]
        for name in ("muse", "em_stop"):
            point = run[name]
            if point is None:
                cells += ["not reached"] + ["–"] * (3 if name == "muse" else 2)
                continue
            cells.append(str(point["step"]))
            if name == "muse":
                cells.append(f"{point['forget/rouge_l']:.3f}")
            cells += [f"{point[k]:.3f}" for k in KEPT]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="simu,random_mask,simu_paper,so_graddiff,fo_graddiff")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="every method's step budget (no early stop)")
    parser.add_argument("--every", type=int, default=10, help="steps between curve points")
    parser.add_argument("--items", type=int, default=50, help="items per set at each point")
    parser.add_argument("--split", default="forget10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(_common.RESULTS / "tradeoff.json"))
    parser.add_argument("--html", default=str(_common.REPO / "results" / "tradeoff" / "curves.html"))
    parser.add_argument("--plot-only", action="store_true", help="compute nothing: draw --html from the runs in --out")
    args = parser.parse_args()
    if args.plot_only:
        stored = json.loads(Path(args.out).read_text(encoding="utf-8"))
        return plot(stored["runs"], stored["reference"], args)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    specs = builtin_companions(f"builtin:{args.split}")
    base = load_model("builtin:full", device="cpu")
    sets = {name: qa.load_data(specs[name]) for name in ("forget", "retain", "world_facts")}
    sets["retain_spec"] = specs["retain"]
    scored = {k: sets[k] for k in ("forget", "retain", "world_facts")}
    sets["original"] = checkpoint_scores(base, base.model, scored, args.items)
    reference_model = load_model(default_reference("builtin:full", f"builtin:{args.split}"), device="cpu")
    reference = checkpoint_scores(reference_model, reference_model.model, scored, args.items)
    runs = []
    for seed in range(1, args.seeds + 1):
        for method in args.methods.split(","):
            run = curve_of(method, seed, base, sets, args)
            runs.append({**run, **readings(run, reference["forget/rouge_l"])})
            print(f"{method} seed {seed}: {run['steps_done']} steps, {run['seconds']} s", flush=True)
            table = markdown(runs, reference)  # written after every run: a long job keeps what it did
            _common.write_json(args.out, {"settings": vars(args), "reference": reference, "original": sets["original"],
                                          "runs": runs, "markdown": table, "cpu_count": os.cpu_count(),
                                          "load_average": [load_start, os.getloadavg()]})  # fmt: skip
    print(table)
    plot(runs, reference, args)


def plot(runs: list[dict], reference: dict, args) -> None:
    """One trade-off figure per seed (every method's curve, the reference's forget ROUGE-L dotted) -> --html."""
    seeds = sorted({r["seed"] for r in runs})
    figures = [tradeoff_figure({r["method"]: r["points"] for r in runs if r["seed"] == seed},
                               reference["forget/rouge_l"]).update_layout(title=f"{args.split}, seed {seed}")
               for seed in seeds]  # fmt: skip
    print(f"wrote {write_figures(args.html, figures, f'Trade-off curves on the built-in ({args.split})')}")


if __name__ == "__main__":
    main()
