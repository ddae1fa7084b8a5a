"""One equal tuning grid for every method, on a split no report uses, and each method's pick (issue 17).

    .venv/bin/python bench/tune_equal.py --root DIR [--split forget10] [--methods simu,simu_paper,so_graddiff,fo_graddiff]
        [--lrs 1e-4,3e-4,1e-3,3e-3] [--gammas 1,5,20] [--rho-share 0.3] [--steps 250] [--seed 0] [--threads 1] [--out F]
    .venv/bin/python bench/bench_tradeoff.py --root DIR --split forget10b --tuned F ...   # report at the picks

Every method runs every (learning rate, retain weight gamma) point of the same grid, with the same step
budget and optimiser seed; a Sophia method has its rho calibrated before each run so that `--rho-share` of
its coordinates stay unclipped (Sophia's authors aim at 10-50%; AdamW has no rho). Each run is scored every
`--every` steps on the same seeded forget, retain and world-facts items (`bench_tradeoff.curve_of`), read at
MUSE's checkpoint (the first point whose forget ROUGE-L is at or below the split's retain reference's), and
ended there: nothing later is read.

The rule, fixed before any report run: among a method's points that reach the checkpoint within the
budget, the one with the highest mean of retain and world-facts exact match there; ties go to the lower
forget fact probe (less of the facts left), then to the earlier step. A random-mask control runs at its
method's pick. Writes every point and the picks to --out after each run (default
bench/results/tuning_equal_<root's name>.json) and prints the grid. Resumable: points already in --out
with the same settings are kept, so a wider grid computes only the new points. Lanes side by side: give
each its own --methods and --out, then `--merge A.json,B.json` writes the one file `--tuned` reads.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import _common
import torch
from bench_tradeoff import KEPT, PROBE, bench_sets, curve_of, readings

from simu_core.benchmark import kept_mean, pick_tuned
from simu_core.unlearn import preset_config

SAME_POINTS = ("split", "root", "steps", "every", "items", "rho_share", "seed")  # settings that keep stored points


def point_settings(method: str, lr: float, gamma: float, rho_share: float | None) -> dict:
    """The grid point's overrides of `method`'s preset; rho_share only where the preset's optimiser is Sophia."""
    second_order = preset_config(method).optimizer == "sophia"
    return {"lr": lr, "gamma": gamma, **({"rho_share": rho_share} if second_order and rho_share else {})}


def has_point(points: list[dict], method: str, overrides: dict) -> bool:
    """Whether `points` already hold `method` at these settings."""
    return any(p["method"] == method and p["overrides"] == overrides for p in points)


def picks_of(points: list[dict]) -> dict:
    """{method: the overrides of its picked point} for every method with a point that reached the checkpoint."""
    methods = dict.fromkeys(p["method"] for p in points)
    best = {m: pick_tuned([p for p in points if p["method"] == m], KEPT, PROBE) for m in methods}
    return {m: point["overrides"] for m, point in best.items() if point}


def markdown(points: list[dict], picks: dict) -> str:
    head = ("method", "lr", "gamma", "Sophia unclipped", "MUSE step", "retain EM", "world facts EM",
            "forget fact probe", "kept (mean)", "pick")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(dict.fromkeys(p["method"] for p in points))
    for p in sorted(points, key=lambda p: (order.index(p["method"]), p["gamma"], p["lr"])):
        unclipped = f"{100 * p['unclipped_mean']:.1f}%" if p.get("unclipped_mean") is not None else "–"
        chosen = "**pick**" if picks.get(p["method"]) == p["overrides"] else ""
        muse = p["muse"]
        scores = (
            [str(muse["step"]), *(f"{muse[k]:.3f}" for k in (*KEPT, PROBE)), f"{kept_mean(muse, KEPT):.3f}"]
            if muse
            else ["not reached", "–", "–", "–", "–"]
        )
        lines.append(
            f"| {p['method']} | {p['lr']:g} | {p['gamma']:g} | {unclipped} | " + " | ".join(scores) + f" | {chosen} |"
        )
    return "\n".join(lines)


def stored_points(args) -> list[dict]:
    path = Path(args.out)
    if not path.exists():
        return []
    stored = json.loads(path.read_text(encoding="utf-8"))
    return stored["points"] if all(stored["settings"].get(k) == getattr(args, k) for k in SAME_POINTS) else []


def merge(paths: list[str], out: str) -> None:
    """One tuning file from several lanes' (same settings; the first file's copy of a point wins), picks redone."""
    stored = [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]
    differing = [p for p, s in zip(paths, stored, strict=True)
                 if any(s["settings"].get(k) != stored[0]["settings"].get(k) for k in SAME_POINTS)]  # fmt: skip
    if differing:
        raise SystemExit(
            f"{', '.join(differing)}: other settings than {paths[0]} ({', '.join(SAME_POINTS)}); not merged."
        )
    points = []
    for p in (p for s in stored for p in s["points"]):
        if not has_point(points, p["method"], p["overrides"]):
            points.append(p)
    picks = picks_of(points)
    grid = {"methods": ",".join(dict.fromkeys(p["method"] for p in points)), "out": out,
            "lrs": ",".join(f"{v:g}" for v in sorted({p["lr"] for p in points})),
            "gammas": ",".join(f"{v:g}" for v in sorted({p["gamma"] for p in points}))}  # fmt: skip
    _common.write_json(out, {**stored[0], "settings": {**stored[0]["settings"], **grid}, "points": points,
                             "picks": picks, "markdown": markdown(points, picks)})  # fmt: skip
    print(markdown(points, picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="a built-in cache folder, e.g. a two-stage build")
    parser.add_argument("--split", default="forget10", help="the tuning split (disjoint from every reported one)")
    parser.add_argument("--methods", default="simu,simu_paper,so_graddiff,fo_graddiff")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    parser.add_argument("--gammas", default="1,5,20", help="retain weights")
    parser.add_argument("--rho-share", type=float, default=0.3, help="Sophia's unclipped share (0: the presets' rho)")
    parser.add_argument("--steps", type=int, default=250, help="every run's step budget")
    parser.add_argument("--every", type=int, default=10, help="steps between curve points")
    parser.add_argument("--items", type=int, default=50, help="items per set at each point")
    parser.add_argument("--seed", type=int, default=0, help="optimiser seed (the reports use 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", default=None, help="compute nothing: FILE,FILE,... of lanes run side by side "
                        "(each its own --methods and --out) -> one file with every point and the picks (--out)")  # fmt: skip
    args = parser.parse_args()
    args.rho_share = args.rho_share or None
    args.set = []  # bench_tradeoff's --set: nothing on top of the grid
    where = Path(args.root).name if args.root else "builtin"
    args.out = args.out or str(_common.RESULTS / f"tuning_equal_{where}.json")
    if args.merge:
        return merge(args.merge.split(","), args.out)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    base, sets, reference = bench_sets(args.split, args.root, args.items)
    points = stored_points(args)
    grid = [(m, float(lr), float(g)) for m in args.methods.split(",") for lr in args.lrs.split(",")
            for g in args.gammas.split(",")]  # fmt: skip
    for method, lr, gamma in grid:
        overrides = point_settings(method, lr, gamma, args.rho_share)
        if has_point(points, method, overrides):
            continue
        run = curve_of(method, args.seed, base, sets, args, overrides, {"forget/rouge_l": reference["forget/rouge_l"]})
        points.append({**run, "lr": lr, "gamma": gamma, "muse": readings(run, reference["forget/rouge_l"])["muse"]})
        print(f"{method} lr {lr:g} gamma {gamma:g}: {run['steps_done']} steps, {run['seconds']} s", flush=True)
        picks = picks_of(points)
        _common.write_json(args.out, {"settings": vars(args), "reference": reference, "original": sets["original"],
                                      "points": points, "picks": picks, "markdown": markdown(points, picks),
                                      "cpu_count": os.cpu_count(), "load_average": [load_start, os.getloadavg()]})  # fmt: skip
    stored = json.loads(Path(args.out).read_text(encoding="utf-8"))
    print(stored["markdown"])


if __name__ == "__main__":
    main()
