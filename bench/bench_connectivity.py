"""Benchmark mode connectivity on the built-in model (CPU): path speed, bend fit, carried memory.

Endpoints: A = `builtin:full`, B = a SIMU run made here with the SIMU preset (saved as a run folder in
a temporary directory and loaded back with `runs.load_run`, as the CLI does with `--b RUN_FOLDER`).
Data: forget10 and a seeded retain sample (`--retain-sample`, default 200 items).

Measured (one process, `--threads` torch threads):
- linear path, `--points` points (default 21): wall and CPU seconds of `evaluate_path` (target < 15 s);
- Bezier bend fit, `--fit-steps` steps (default FitConfig().steps): wall and CPU seconds (target < 60 s),
  and the mean loss along the path (trapezoid over t) before (= the linear path) and after the fit;
- bytes the path carries besides its one working model, against the model's own bytes;
- peak resident memory of the process.
Other processes on the machine make wall times noisy; CPU seconds of this process are steadier
(with OMP_WAIT_POLICY=PASSIVE, set here unless given, idle threads do not burn CPU spinning).

Model: `--root` if given, else the user's built-in default if it is built, else the small test build
in .pytest_cache/simu_builtin (the table says which). Nothing is built here.

    .venv/bin/python bench/bench_connectivity.py [--root DIR] [--threads 2] [--points 21] [--fit-steps 200]

Writes bench/results/connectivity-<threads>threads.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other processes, spinning
# threads made 2-thread runs ~10x slower than 1 thread (measured); on an idle machine it changes little.
# Must be set before torch starts its thread pool; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import REPO, RESULTS, TEST_BUILD, pick_root, write_json  # noqa: E402, F401

from simu_core import data as qa  # noqa: E402
from simu_core.connectivity import (  # noqa: E402
    FitConfig,
    evaluate_path,
    fit_bend,
    load_endpoint,
    make_path,
    sample_items,
)
from simu_core.methods import preset_config  # noqa: E402
from simu_core.models import load_model  # noqa: E402
from simu_core.runs import save_run  # noqa: E402
from simu_core.unlearn import compute_mask, unlearn  # noqa: E402

TARGETS = {"linear_seconds": 15.0, "fit_seconds": 60.0}


class Timer:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def simu_run_folder(base, forget, retain, workdir: Path, steps: int | None) -> tuple[Path, dict]:
    """A SIMU run at its preset (attribution mask + masked Sophia GradDiff; `steps` caps its length:
    the delta's structure, which is what the path carries, does not depend on it), saved as a run folder."""
    config = preset_config("simu", probe_every=0, steps=steps)
    with Timer() as t:
        mask = compute_mask(base, forget, retain, config.mask)
        result = unlearn(base, forget, retain, config, mask=mask)
    folder = save_run(result, workdir)
    return folder, {"seconds": t.wall, "status": result.status, "summary": result.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points", type=int, default=21)
    parser.add_argument("--fit-steps", type=int, default=FitConfig().steps)
    parser.add_argument("--retain-sample", type=int, default=200)
    parser.add_argument("--simu-steps", type=int, default=None, help="cap the SIMU run's steps (default: preset)")
    parser.add_argument("--run", default=None, help="use this existing run folder as B instead of making one")
    parser.add_argument("--keep-run", default=None, help="save the SIMU run made here under this folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root, where = pick_root(args.root)

    base = load_model("builtin:full", device="cpu", root=root)
    forget = qa.load_data("builtin:forget10", root=root)
    retain_full = qa.load_data("builtin:retain10", root=root)
    retain = sample_items(retain_full, args.retain_sample, seed=0)
    splits = {"forget": forget, "retain": retain}
    if args.run:
        run_b, run_info = load_endpoint(args.run, device="cpu"), {"folder": args.run, "seconds": 0.0, "status": "given"}
    else:
        log("making a SIMU run (attribution + unlearning)")
        with tempfile.TemporaryDirectory() as tmp:
            runs_dir = Path(args.keep_run or tmp)
            folder, run_info = simu_run_folder(base, forget, retain_full, runs_dir, args.simu_steps)
            run_b = load_endpoint(str(folder), device="cpu")
            log(f"SIMU run: {run_info['status']} in {run_info['seconds']:.1f} s, folder {folder}")
    log("linear path")

    with Timer() as t_build:
        path = make_path(base, run_b, "linear")
    model_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    with Timer() as t_linear:
        linear = evaluate_path(path, splits, points=args.points)

    log(f"linear path done in {t_linear.wall:.1f} s; fitting the Bezier bend")
    bezier = make_path(base, run_b, "bezier")
    with Timer() as t_fit:
        history = fit_bend(bezier, forget, retain, FitConfig(steps=args.fit_steps))
    log(f"fit done in {t_fit.wall:.1f} s; fitted path")
    fitted = evaluate_path(bezier, splits, points=args.points)

    def objective(result) -> float:  # the fit objective: equal weights of forget and retain
        return (result.mean_loss["forget"] + result.mean_loss["retain"]) / 2

    rows = {
        "linear_path": {"wall_s": t_linear.wall, "cpu_s": t_linear.cpu, "target_s": TARGETS["linear_seconds"]},
        "bezier_fit": {"wall_s": t_fit.wall, "cpu_s": t_fit.cpu, "target_s": TARGETS["fit_seconds"]},
        "bezier_path": {"wall_s": fitted.seconds, "cpu_s": float("nan"), "target_s": TARGETS["linear_seconds"]},
        "make_path": {"wall_s": t_build.wall, "cpu_s": t_build.cpu, "target_s": float("nan")},
    }
    n_tokens = linear.n_tokens
    print(
        f"\nMode connectivity on CPU ({torch.get_num_threads()} threads), {where}: builtin:full -> SIMU run "
        f"({run_info['status']}, {run_info['seconds']:.1f} s); forget10 {len(forget)} items / {n_tokens['forget']} "
        f"answer tokens, retain sample {len(retain)} items / {n_tokens['retain']} tokens; {args.points} points"
    )
    print(f"{'step':<12} {'wall s':>8} {'cpu s':>8} {'target s':>9}")
    for name, row in rows.items():
        print(f"{name:<12} {row['wall_s']:>8.2f} {row['cpu_s']:>8.2f} {row['target_s']:>9.0f}")
    print(
        f"\ncarried by the path: {linear.carried_bytes:,} bytes ({linear.carried_elements:,} entries per endpoint) = "
        f"{linear.carried_bytes / model_bytes:.2%} of the model's {model_bytes:,} bytes; bezier "
        f"{fitted.carried_bytes:,} bytes"
    )
    print(
        f"{'path':<14} {'forget mean':>11} {'retain mean':>11} {'objective':>9} {'forget barrier':>14} {'retain barrier':>14}"
    )
    for name, result in (("linear", linear), ("bezier fitted", fitted)):
        print(
            f"{name:<14} {result.mean_loss['forget']:>11.4f} {result.mean_loss['retain']:>11.4f} "
            f"{objective(result):>9.4f} {result.barrier['forget']:>14.4f} {result.barrier['retain']:>14.4f}"
        )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"fit: {history.steps} steps, objective {history.summary()['first_loss']:.4f} -> "
          f"{history.summary()['last_loss']:.4f}; peak RSS {peak_rss / 2**20:.0f} MiB")  # fmt: skip

    out = {
        "where": where,
        "root": str(root),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "machine": platform.platform(),
        "points": args.points,
        "forget_items": len(forget),
        "retain_items": len(retain),
        "simu_run": run_info,
        "timings": rows,
        "model_bytes": model_bytes,
        "carried": {
            "linear_bytes": linear.carried_bytes,
            "bezier_bytes": fitted.carried_bytes,
            "entries": linear.carried_elements,
            "parameters": path.summary(),
        },  # fmt: skip
        "linear": linear.to_dict(),
        "bezier": fitted.to_dict(),
        "fit": history.summary(),
        "mean_objective": {"linear": objective(linear), "bezier_fitted": objective(fitted)},
        "peak_rss_bytes": peak_rss,
    }
    write_json(RESULTS / f"connectivity-{args.threads}threads.json", out)


if __name__ == "__main__":
    main()
