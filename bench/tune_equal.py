"""One equal tuning grid for every method, on a split no report uses, and each method's pick (issue 17).

    .venv/bin/python bench/tune_equal.py --root DIR [--split forget10] [--methods simu,simu_paper,so_graddiff,fo_graddiff]
        [--lrs 1e-4,3e-4,1e-3,3e-3] [--gammas 1,5,20] [--rho-share 0.3] [--steps 250] [--seed 0] [--threads 1] [--out F]
    .venv/bin/python bench/bench_tradeoff.py --root DIR --split forget10b --tuned F ...   # report at the picks

    # the real-knowledge benchmark on SmolLM2 (tuned on other_capitals, never reported)
    .venv/bin/python bench/tune_equal.py --benchmark smollm2 [--lrs 1e-5,1e-4] [--gammas 5,20] [--steps 60]
    .venv/bin/python -m simu_core bench quality --benchmark smollm2 --tuned bench/results/tuning_equal_smollm2.json ...

Every method runs every (learning rate, retain weight gamma) point of the same grid, with the same step
budget and optimiser seed; a Sophia method has its rho calibrated before each run so that `--rho-share` of
its coordinates stay unclipped (Sophia's authors aim at 10-50%; AdamW has no rho). Each run is scored every
`--every` steps on the same seeded forget, retain and world-facts items (`bench_tradeoff.curve_of`), read at
MUSE's checkpoint (the first point whose forget ROUGE-L is at or below the split's retain reference's), and
ended there: nothing later is read.

On SmolLM2 (`--benchmark smollm2`) there is no retain reference, so no MUSE checkpoint: a point is a quality
cell (`simu_core.benchmark`, the benchmark's own early stop: forget known <= 0.05, checked every 5 steps),
read at that stop if the run reached it within the budget ("matched"). Kept there: the mean of the retain,
neighbour and general known shares; the probe is the forget set's answer probability. Cells are stored per
point under bench/results/tuning/smollm2_equal/ (the original model's row and SIMU's mask once per point).

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
import time
from dataclasses import dataclass
from pathlib import Path

import _common
import torch
from bench_tradeoff import KEPT, PROBE, bench_sets, curve_of, readings

from simu_core.benchmark import QualityConfig, get_benchmark, kept_mean, pick_tuned, run_quality
from simu_core.methods import preset_config
from simu_core.metrics import EvalConfig

# settings that keep stored points (with the value of files written before the setting existed)
SAME_POINTS = {"benchmark": "builtin", "split": None, "root": None, "steps": None, "every": None, "items": None,
               "rho_share": None, "seed": None}  # fmt: skip


@dataclass(frozen=True)
class Grid:
    """A benchmark's tuning defaults and its rule's reading: `reading` names the key of a point that holds its
    scores at matched forgetting (None: not reached), `kept` the scores the rule averages, `probe` the tie-break."""

    reading: str
    reading_title: str
    kept: tuple[str, ...]
    probe: str
    titles: tuple[str, ...]  # the columns of `kept` and `probe`
    split: str
    steps: int
    lrs: str
    gammas: str


GRIDS = {
    "builtin": Grid("muse", "MUSE step", KEPT, PROBE, ("retain EM", "world facts EM", "forget fact probe"),
                    "forget10", 250, "1e-4,3e-4,1e-3,3e-3", "1,5,20"),
    "smollm2": Grid("matched", "stop step", ("retain/knows", "neighbour/knows", "general/knows"), "forget/prob",
                    ("retain known", "neighbour known", "general known", "forget prob"), "other_capitals", 60,
                    "1e-5,1e-4", "5,20"),
}  # fmt: skip


def point_settings(method: str, lr: float, gamma: float, rho_share: float | None) -> dict:
    """The grid point's overrides of `method`'s preset; rho_share only where the preset's optimiser is Sophia."""
    second_order = preset_config(method).optimizer == "sophia"
    return {"lr": lr, "gamma": gamma, **({"rho_share": rho_share} if second_order and rho_share else {})}


def has_point(points: list[dict], method: str, overrides: dict) -> bool:
    """Whether `points` already hold `method` at these settings."""
    return any(p["method"] == method and p["overrides"] == overrides for p in points)


def picks_of(points: list[dict], grid: Grid) -> dict:
    """{method: the overrides of its picked point} for every method with a point that reached the checkpoint."""
    methods = dict.fromkeys(p["method"] for p in points)
    best = {m: pick_tuned([p for p in points if p["method"] == m], grid.kept, grid.probe, grid.reading)
            for m in methods}  # fmt: skip
    return {m: point["overrides"] for m, point in best.items() if point}


def markdown(points: list[dict], picks: dict, grid: Grid) -> str:
    head = ("method", "lr", "gamma", "Sophia unclipped", grid.reading_title, *grid.titles, "kept (mean)", "pick")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(dict.fromkeys(p["method"] for p in points))
    for p in sorted(points, key=lambda p: (order.index(p["method"]), p["gamma"], p["lr"])):
        unclipped = f"{100 * p['unclipped_mean']:.1f}%" if p.get("unclipped_mean") is not None else "–"
        chosen = "**pick**" if picks.get(p["method"]) == p["overrides"] else ""
        at = p[grid.reading]
        scores = (
            [str(at["step"]), *(f"{at[k]:.3f}" for k in (*grid.kept, grid.probe)), f"{kept_mean(at, grid.kept):.3f}"]
            if at
            else ["not reached", *["–"] * (len(grid.kept) + 2)]
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
    return stored["points"] if same_settings(stored["settings"], vars(args)) else []


def same_settings(a: dict, b: dict) -> bool:
    """Whether two files' settings keep each other's points (`SAME_POINTS`)."""
    return all(a.get(k, old) == b.get(k, old) for k, old in SAME_POINTS.items())


def merge(paths: list[str], out: str) -> None:
    """One tuning file from several lanes' (same settings; the first file's copy of a point wins), picks redone."""
    stored = [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]
    differing = [
        p for p, s in zip(paths, stored, strict=True) if not same_settings(s["settings"], stored[0]["settings"])
    ]
    if differing:
        raise SystemExit(
            f"{', '.join(differing)}: other settings than {paths[0]} ({', '.join(SAME_POINTS)}); not merged."
        )
    grid = GRIDS[stored[0]["settings"].get("benchmark", "builtin")]
    points = []
    for p in (p for s in stored for p in s["points"]):
        if not has_point(points, p["method"], p["overrides"]):
            points.append(p)
    picks = picks_of(points, grid)
    covered = {"methods": ",".join(dict.fromkeys(p["method"] for p in points)), "out": out,
               "lrs": ",".join(f"{v:g}" for v in sorted({p["lr"] for p in points})),
               "gammas": ",".join(f"{v:g}" for v in sorted({p["gamma"] for p in points}))}  # fmt: skip
    _common.write_json(out, {**stored[0], "settings": {**stored[0]["settings"], **covered}, "points": points,
                             "picks": picks, "markdown": markdown(points, picks, grid)})  # fmt: skip
    print(markdown(points, picks, grid))


def knowledge_points(methods: list[str], lr: float, gamma: float, args) -> list[dict]:
    """One grid point of every method in `methods` on a knowledge benchmark (SmolLM2): quality cells with the
    point's settings and the benchmark's early stop, stored under bench/results/tuning/<benchmark>_equal/."""
    grid = GRIDS[args.benchmark]
    settings = {m: {**point_settings(m, lr, gamma, args.rho_share), "steps": args.steps} for m in methods}
    out = _common.RESULTS / "tuning" / f"{args.benchmark}_equal" / f"lr={lr:g}_gamma={gamma:g}"
    qc = QualityConfig(splits=[args.split], methods=methods, seeds=[args.seed], tuned=settings, out=str(out),
                       eval=EvalConfig(max_items=200, max_new_tokens=get_benchmark(args.benchmark).answer_tokens),
                       benchmark=args.benchmark)  # fmt: skip
    start = time.perf_counter()
    records = {r["method"]: r for r in run_quality(qc, lambda line, _: print(line, flush=True)).records}
    seconds = round(time.perf_counter() - start, 1)
    points = []
    for method in methods:
        record = records[method]
        scores = {k: record["metrics"].get(k) for k in (*grid.kept, grid.probe, "forget/knows")}
        matched = {"step": record["steps_done"], **scores} if record.get("reached_target") == 1.0 else None
        points.append({"method": method, "seed": args.seed, "status": record["status"],
                       "steps_done": record["steps_done"], "unclipped_mean": record.get("unclipped_mean"),
                       "overrides": point_settings(method, lr, gamma, args.rho_share), "seconds": seconds,
                       "unlearn_seconds": record.get("unlearn_seconds"), "lr": lr, "gamma": gamma,
                       "matched": matched, "at_end": scores})  # fmt: skip
    return points


def builtin_point(method: str, lr: float, gamma: float, args, base, sets, reference) -> dict:
    """One grid point on a built-in: a curve run ended at MUSE's checkpoint."""
    overrides = point_settings(method, lr, gamma, args.rho_share)
    run = curve_of(method, args.seed, base, sets, args, overrides, {"forget/rouge_l": reference["forget/rouge_l"]})
    return {**run, "lr": lr, "gamma": gamma, "muse": readings(run, reference["forget/rouge_l"])["muse"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=tuple(GRIDS), default="builtin")
    parser.add_argument("--root", default=None, help="a built-in cache folder, e.g. a two-stage build")
    parser.add_argument(
        "--split",
        default=None,
        help="the tuning split, disjoint from every reported one (forget10; smollm2: other_capitals)",
    )
    parser.add_argument("--methods", default="simu,simu_paper,so_graddiff,fo_graddiff")
    parser.add_argument("--lrs", default=None, help="1e-4,3e-4,1e-3,3e-3 (smollm2: 1e-5,1e-4)")
    parser.add_argument("--gammas", default=None, help="retain weights: 1,5,20 (smollm2: 5,20)")
    parser.add_argument("--rho-share", type=float, default=0.3, help="Sophia's unclipped share (0: the presets' rho)")
    parser.add_argument("--steps", type=int, default=None, help="every run's step budget (250; smollm2: 60)")
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
    grid = GRIDS[args.benchmark]
    for name in ("split", "steps", "lrs", "gammas"):
        setattr(args, name, getattr(args, name) or getattr(grid, name))
    builtin = args.benchmark == "builtin"
    where = (Path(args.root).name if args.root else "builtin") if builtin else args.benchmark
    args.out = args.out or str(_common.RESULTS / f"tuning_equal_{where}.json")
    if args.merge:
        return merge(args.merge.split(","), args.out)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    found = {}  # the built-in's models and its reference scores, loaded once
    if builtin:
        base, sets, reference = bench_sets(args.split, args.root, args.items)
        found = {"reference": reference, "original": sets["original"]}
    points = stored_points(args)
    for lr, gamma in ((float(lr), float(g)) for lr in args.lrs.split(",") for g in args.gammas.split(",")):
        todo = [
            m for m in args.methods.split(",") if not has_point(points, m, point_settings(m, lr, gamma, args.rho_share))
        ]
        # a built-in point is one run, stored at once; a knowledge point runs its methods together (one mask, one
        # original row)
        for methods in [[m] for m in todo] if builtin else [todo] if todo else []:
            if builtin:
                new = [builtin_point(methods[0], lr, gamma, args, base, sets, reference)]
            else:
                new = knowledge_points(methods, lr, gamma, args)
            for point in new:
                print(f"{point['method']} lr {lr:g} gamma {gamma:g}: {point['steps_done']} steps", flush=True)
            points += new
            picks = picks_of(points, grid)
            _common.write_json(args.out, {"settings": vars(args), **found, "points": points, "picks": picks,
                                          "markdown": markdown(points, picks, grid), "cpu_count": os.cpu_count(),
                                          "load_average": [load_start, os.getloadavg()]})  # fmt: skip
    stored = json.loads(Path(args.out).read_text(encoding="utf-8"))
    print(stored["markdown"])


if __name__ == "__main__":
    main()
