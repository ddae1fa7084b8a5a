"""Benchmark the time-left estimates (ETAs) of every kind of background job the app runs.

Each job runs on a `JobRunner`, reporting progress exactly as its page does (attribution weighted by
items, the token view by counted forward passes, unlearning per step with its records, evaluation in
two halves, connectivity as `connect` reports). The status is sampled every 50 ms; afterwards the
samples at 10%, 50% and 90% of the job's actual duration give the ETA shown then and the time that was
actually left. Ratio = ETA / actual (1 = right, 2 = twice too long, 0.5 = half). "estimating" = the app
showed no ETA yet (before 10% of the job's progress). Unlearning runs the SIMU preset with its early stop,
and has two ETAs: to the step budget and to the expected early stop (`jobs.eta_to_stop`).

Jobs: attribution (simu_ig at the preset's m, forget10 + the preset's retain part), token view (one
forget example), unlearning (SIMU preset, early stop on), evaluation of that run (`--eval-items`
items per split), connectivity (Bezier path to that run, `--fit-steps`).

Model: `--root` if given, else the small test build in .pytest_cache/simu_builtin (made by the tests), else
the user's built-in default (the table says which). Nothing is built here.

    .venv/bin/python bench/bench_eta.py [--root DIR] [--threads 1] [--eval-items 40] [--fit-steps 100]

Writes bench/results/eta.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import RESULTS, TEST_BUILD, pick_root, write_json  # noqa: E402

from simu_core import attribution as att  # noqa: E402
from simu_core import data as qa  # noqa: E402
from simu_core import jobs  # noqa: E402
from simu_core.connectivity import ConnectConfig, FitConfig, connect  # noqa: E402
from simu_core.evaluation import evaluate_specs  # noqa: E402
from simu_core.methods import preset_config  # noqa: E402
from simu_core.metrics import EvalConfig  # noqa: E402
from simu_core.models import load_model  # noqa: E402
from simu_core.runs import run_unlearning  # noqa: E402

POINTS = (0.1, 0.5, 0.9)


def attribution_job(ctx, loaded, forget, retain, steps: int) -> None:
    sizes = [len(forget), len(retain)]
    for i, dataset in enumerate((forget, retain)):

        def progress(message: str, fraction: float, i: int = i) -> None:
            ctx.report(jobs.item_weighted(sizes, i, fraction), message)

        att.attribute(loaded, dataset, method="simu_ig", steps=steps, progress=progress)


def token_job(ctx, loaded, item: dict) -> None:
    enc = qa.encode(loaded.tokenizer, loaded.fmt, item["question"], item["answer"], max_length=10_000)
    expected = 3 * max(1, len(enc.ids) - enc.n_prompt)
    calls = [0]

    def count(*_) -> None:
        calls[0] += 1
        ctx.report(min(0.99, calls[0] / expected), f"pass {calls[0]}")

    hook = loaded.model.register_forward_hook(count)
    try:
        att.token_attribution(loaded, item["question"], item["answer"])
    finally:
        hook.remove()


def unlearn_job(ctx, config, base, forget, retain, folder: Path) -> str:
    ctx.report(0.0, "copying the model and computing the neuron mask")

    def on_step(record) -> None:
        ctx.report(record.step / record.steps, f"step {record.step}/{record.steps}", **record.to_dict())

    result, path = run_unlearning(config, folder, base=base, forget=forget, retain=retain, callback=on_step)
    summary = result.summary()
    return f"{path} ({summary['stop_reason']} after {summary['steps_done']} of {config.steps} steps)"


def evaluate_job(ctx, run: Path, items: int) -> None:
    stage = {"n": -1}

    def progress(message: str, fraction: float) -> None:
        if message.startswith("evaluating "):
            stage["n"] += 1
            return
        ctx.report(0.9 * (max(stage["n"], 0) + fraction) / 2, message)

    evaluate_specs(run=run, device="cpu", config=EvalConfig(max_items=items), progress=progress)


def connect_job(ctx, config: ConnectConfig) -> None:
    connect(config, progress=lambda message, fraction: ctx.report(fraction, message), cancel=ctx.cancel_event)


def measure(name: str, fn, stop_target: tuple[str, float] | None = None) -> dict:
    """Run `fn` as a job; the ETA shown and the time actually left at 10/50/90% of its duration."""
    job = jobs.JobRunner().submit(name, fn)
    samples = []
    while True:
        status = job.snapshot()
        if status.state in jobs.FINISHED:
            break
        if status.state == jobs.RUNNING:
            stop = jobs.eta_to_stop(status, *stop_target) if stop_target else None
            samples.append((time.time(), status.progress, status.eta_seconds, stop))
        time.sleep(0.05)
    if status.state != jobs.DONE:
        raise SystemExit(f"{name} ended {status.state}: {status.error}")
    start, end = status.started, status.finished
    out = {"job": name, "seconds": round(end - start, 2), "result": status.result, "at": {}}
    for q in POINTS:
        t, progress, eta, stop = next((s for s in samples if s[0] - start >= q * (end - start)), samples[-1])
        left = end - t
        row = {"progress": round(progress, 3), "actual_left_s": round(left, 2),
               "eta_s": None if eta is None else round(eta, 2),
               "ratio": None if eta is None or left <= 0 else round(eta / left, 2)}  # fmt: skip
        if stop_target:
            row["eta_to_stop_s"] = None if stop is None else round(stop, 2)
            row["stop_ratio"] = None if stop is None or left <= 0 else round(stop / left, 2)
        out["at"][f"{round(q * 100)}%"] = row
    return out


def cell(row: dict, key: str) -> str:
    return "estimating" if row.get(key) is None else f"{row[key]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="built-in folder (default: the small test build if built, else the user's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-items", type=int, default=40)
    parser.add_argument("--fit-steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    small = TEST_BUILD if not args.root and (TEST_BUILD / "manifest.json").is_file() else None
    root, why = (TEST_BUILD, "small test build") if small else pick_root(args.root)
    home = Path(tempfile.mkdtemp(prefix="bench_eta_"))
    (home / "builtin").symlink_to(root.resolve())
    os.environ["SIMU_HOME"] = str(home)  # builtin:... specs resolve to `root`; runs go to the temporary home

    loaded = load_model("builtin:full", device="cpu")
    preset = preset_config("simu", device="cpu")
    forget, retain = qa.load_data(preset.forget), qa.load_data(preset.retain)
    retain_part = qa.QADataset(retain.name, retain.items[: preset.mask.retain_limit])
    results = [
        measure("attribution", partial(attribution_job, loaded=loaded, forget=forget, retain=retain_part,
                                       steps=preset.mask.steps)),
        measure("token view", partial(token_job, loaded=loaded, item=forget.items[0])),
    ]  # fmt: skip
    stop = ("forget_em", preset.stop_forget_em)
    unlearn = measure("unlearning", partial(unlearn_job, config=preset, base=loaded, forget=forget, retain=retain,
                                            folder=home / "runs"), stop_target=stop)  # fmt: skip
    results.append(unlearn)
    run = Path(unlearn["result"].split(" (")[0])
    results.append(measure("evaluation", partial(evaluate_job, run=run, items=args.eval_items)))
    config = ConnectConfig(a="builtin:full", b=str(run), curve="bezier", fit=FitConfig(steps=args.fit_steps),
                           forget=preset.forget, retain=preset.retain, device="cpu")  # fmt: skip
    results.append(measure("connectivity", partial(connect_job, config=config)))

    load = os.getloadavg()
    print(f"\nETA / actual time left ({why}: {root}; {args.threads} thread(s); load {load[0]:.2f})")
    print(f"{'job':<14}{'seconds':>9}" + "".join(f"{q:>12}" for q in ("at 10%", "at 50%", "at 90%")) + "   to stop")
    for r in results:
        ratios = "".join(f"{cell(r['at'][k], 'ratio'):>12}" for k in ("10%", "50%", "90%"))
        stops = " ".join(cell(r["at"][k], "stop_ratio") for k in ("10%", "50%", "90%")) if "unlearn" in r["job"] else ""
        print(f"{r['job']:<14}{r['seconds']:>9.1f}{ratios}   {stops}")
    print(f"unlearning: {unlearn['result']}")
    within = [row[k] for r in results for row in r["at"].values() for k in ("ratio", "stop_ratio")
              if row.get(k) is not None]  # fmt: skip
    write_json(
        RESULTS / "eta.json",
        {
            "root": str(root), "root_why": why, "threads": args.threads, "loadavg": load,
            "python": platform.python_version(), "torch": torch.__version__, "jobs": results,
            "ratios_within_2x": sum(0.5 <= x <= 2 for x in within), "ratios": len(within),
        },
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
