"""Relearning attack at MUSE's checkpoint: after each method forgets as much as the retain reference, is
the forget set gone, or only hidden? (issue 17, the built-in's disjoint forget sets)

    .venv/bin/python bench/bench_relearn_muse.py --tradeoff bench/results/tradeoff_forget10b.json
        [--methods simu,simu_paper,so_graddiff,fo_graddiff] [--seeds 1] [--attack-steps 10] [--attack-lr 1e-3]

Reads a `bench_tradeoff.py` result: for every (method, seed) run that reached MUSE's checkpoint, the run is
made again with its step budget set to that checkpoint's step (constant learning rates and seeded
sampling, so it is the same trajectory, stopped there: the checkpoint's scores are recomputed and the
largest difference from the stored ones is reported), then `relearn.relearning_attack` fine-tunes a copy
on a seeded half of the forget set and counts how many answers of the *other* half come back. The
retain reference (never trained on these authors) takes the same attack: what it gets right on the
held-out half after the attack is what fine-tuning on the other half teaches from nothing, so a method
hid its facts only where its held-out share after the attack is above the reference's. The original
model shows the attack's ceiling. A trade-off run with `--root` (a two-stage build) is attacked on that build.
Writes bench/results/relearn_muse_<split>.json and prints a Markdown
table (load average at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import _common
import torch
from bench_relearn import with_forget_known
from bench_tradeoff import bench_models, run_config

from simu_core import data as qa
from simu_core.metrics.curve import checkpoint_scores
from simu_core.relearn import RelearnConfig, relearning_attack
from simu_core.unlearn import unlearn

COMPARED = ("forget/rouge_l", "retain/exact_match", "world_facts/exact_match")


def attacked(loaded, model, forget: qa.QADataset, attack: RelearnConfig) -> dict:
    """The attack's shares, with the whole forget set's known share before it (from its two halves)."""
    row = relearning_attack(loaded, model, forget, attack)
    row["attack_seed"] = row.pop("seed")  # the run's own seed keeps the name "seed"
    return with_forget_known(row)


def at_muse(run: dict, settings: dict, base, sets: dict, attack: RelearnConfig) -> dict:
    """`run` made again up to its MUSE checkpoint, checked against the stored point, then attacked."""
    point = run["muse"]
    config = run_config(run["method"], run["seed"], settings, sets["retain_spec"], point["step"], 0,
                        run.get("overrides"))  # a run of `bench_tradeoff.py --tuned` at its pick  # fmt: skip
    start = time.perf_counter()
    result = unlearn(base, sets["forget"], sets["retain"], config)
    again = checkpoint_scores(result.model, result.model.model, sets["scored"], settings["items"])
    drift = max(abs(again[k] - point[k]) for k in COMPARED)
    row = {"method": run["method"], "seed": run["seed"], "step": point["step"], "max_score_drift": drift,
           "unlearn_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    return {**row, **attacked(result.model, result.model.model, sets["forget"], attack)}


def markdown(rows: list[dict]) -> str:
    head = ("model", "seed", "MUSE step", "score drift", "forget known", "held-out before", "held-out after",
            "trained after", "attack loss, first → last")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r.get("seed", "–")), str(r.get("step", "–")),
                 f"{r['max_score_drift']:.3f}" if "max_score_drift" in r else "–",
                 *(f"{r[k]:.3f}" for k in ("forget_known", "heldout_before", "heldout_after", "trained_after")),
                 f"{r['losses'][0]:.2f} → {r['losses'][-1]:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tradeoff", required=True, help="a bench_tradeoff.py JSON")
    parser.add_argument("--methods", default="simu,simu_paper,so_graddiff,fo_graddiff")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 1..N of the stored runs")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--attack-lr", type=float, default=1e-3, help="AdamW lr (the tiny models train at 3e-3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default bench/results/relearn_muse_<split>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    stored = json.loads(Path(args.tradeoff).read_text(encoding="utf-8"))
    settings = {"set": [], **stored["settings"]}
    # on the built-in cache the trade-off ran on (a two-stage build, or the default's)
    base, sets, reference = bench_models(settings["split"], settings.get("root"))
    attack = RelearnConfig(steps=args.attack_steps, lr=args.attack_lr, seed=0, max_new_tokens=32)
    rows = [{"method": "original", **attacked(base, base.model, sets["forget"], attack)},
            {"method": "retain reference", **attacked(reference, reference.model, sets["forget"], attack)}]  # fmt: skip
    wanted = args.methods.split(",")
    for run in stored["runs"]:
        if run["method"] in wanted and int(run["seed"]) <= args.seeds and run.get("muse"):
            rows.append(at_muse(run, settings, base, sets, attack))
            print(f"{run['method']} seed {run['seed']}: attacked at step {run['muse']['step']}", flush=True)
    table = markdown(rows)
    out = args.out or str(_common.RESULTS / f"relearn_muse_{settings['split']}.json")
    _common.write_json(out, {"settings": {**vars(args), "tradeoff_settings": settings}, "rows": rows,
                             "markdown": table, "cpu_count": os.cpu_count(),
                             "load_average": [load_start, os.getloadavg()]})  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
