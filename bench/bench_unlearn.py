"""Benchmark the unlearning methods on the built-in model (CPU): speed, state memory, quality.

Speed (default): for every method at its preset, seconds per optimiser step (after 2 warm-up
steps: the median time of plain steps and of curvature-refresh steps, weighted by how often each
occurs, so load spikes from other processes do not count; median over `--rounds` rounds in which
the methods take turns, so machine load hits all of them alike) and the bytes of
optimiser state. SIMU's and the random-mask control's ratios to so_graddiff are printed too.
Attribution time for SIMU's mask is reported apart (it runs once per mask, not per step).

Quality (`--quality`): every method at its full preset (early stop included), before/after greedy
exact match and ROUGE-L recall (`metrics.rouge_l_recall`) on the forget split
and a seeded sample of its retain split, next to the retain reference model (never trained on the
forget authors), the gold standard for forget quality.

Model: `--root` if given, else the user's built-in default if it is built, else the small test build
in .pytest_cache/simu_builtin (the table says which). Nothing is built here.

    .venv/bin/python bench/bench_unlearn.py [--root DIR] [--threads 2] [--rounds 3] [--steps 20]
    .venv/bin/python bench/bench_unlearn.py --quality [--methods simu,so_graddiff]

Writes bench/results/unlearn.json (speed) or bench/results/unlearn_quality.json (quality).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from _common import REPO, RESULTS, TEST_BUILD, pick_root, write_json  # noqa: E402, F401

from simu_core import data as qa  # noqa: E402
from simu_core.methods import METHODS, preset_config  # noqa: E402
from simu_core.metrics import rouge_l_recall  # noqa: E402
from simu_core.models import exact_match, greedy_answers, load_model  # noqa: E402
from simu_core.unlearn import compute_mask, unlearn  # noqa: E402


def evaluate(model, loaded, splits: dict[str, qa.QADataset]) -> dict[str, float]:
    """Greedy exact match and mean ROUGE-L recall per split."""
    out = {}
    for name, ds in splits.items():
        answers = greedy_answers(model, loaded.tokenizer, loaded.fmt, ds.questions(), max_new_tokens=40)
        out[f"{name}_em"] = exact_match(answers, ds.answers())
        out[f"{name}_rouge"] = sum(map(rouge_l_recall, answers, ds.answers())) / len(ds)
    return out


def load_splits(root: Path, forget: str, retain_sample: int, seed: int = 0):
    forget_ds = qa.load_data(f"builtin:{forget}", root=root)
    retain_ds = qa.load_data(f"builtin:retain{forget[-2:]}", root=root)
    sample = random.Random(seed).sample(retain_ds.items, min(retain_sample, len(retain_ds)))
    return forget_ds, retain_ds, {"forget": forget_ds, "retain": qa.QADataset("retain_sample", sample)}


def robust_step_seconds(kinds: list[bool], seconds: list[float]) -> float:
    """Mean step time, robust to load spikes: the median of plain steps and of curvature-refresh
    steps, weighted by how often each kind occurs."""
    groups: dict[bool, list[float]] = {}
    for kind, value in zip(kinds, seconds, strict=True):
        groups.setdefault(kind, []).append(value)
    return sum(len(v) / len(seconds) * statistics.median(v) for v in groups.values())


def timed_run(base, forget, retain, cfg, mask):
    """Run and time every step: wall seconds and this process's CPU seconds (robust to waiting for
    cores that other processes hold). Steps 1-2 are warm-up and dropped."""
    stamps = []

    def callback(record) -> None:
        stamps.append((record.hessian_updated, time.perf_counter(), time.process_time()))

    result = unlearn(base, forget, retain, cfg, mask=mask, callback=callback)
    kinds = [s[0] for s in stamps[2:]]
    wall = [b[1] - a[1] for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    cpu = [b[2] - a[2] for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    return result, robust_step_seconds(kinds, wall), robust_step_seconds(kinds, cpu)


def speed(args, root: Path, where: str) -> dict:
    base = load_model("builtin:full", device="cpu", root=root)
    forget, retain, _ = load_splits(root, args.forget, 1)
    t0 = time.perf_counter()
    mask = compute_mask(base, forget, retain, preset_config("simu").mask)
    mask_seconds = time.perf_counter() - t0
    rows = {m: {"step_seconds": [], "step_cpu_seconds": [], "state_bytes": 0} for m in args.methods}
    for _ in range(args.rounds):
        for method in args.methods:
            cfg = preset_config(method, steps=args.steps, probe_every=0)
            cfg.stop_forget_em = cfg.stop_forget_rouge = cfg.stop_forget_loss = None  # time training steps only
            result, wall, cpu = timed_run(base, forget, retain, cfg, mask if METHODS[method].mask else None)
            rows[method]["step_seconds"].append(wall)
            rows[method]["step_cpu_seconds"].append(cpu)
            rows[method]["state_bytes"] = result.state_bytes
            rows[method]["trainable_params"] = result.trainable_params
            rows[method]["total_params"] = result.total_params
    for row in rows.values():
        row["seconds_per_step"] = statistics.median(row["step_seconds"])
        row["cpu_seconds_per_step"] = statistics.median(row["step_cpu_seconds"])
    ref = rows.get("so_graddiff")
    print(f"\nUnlearning speed on CPU ({torch.get_num_threads()} threads), {where}; mask: {mask.total()} neurons "
          f"({mask.fraction():.1%}), attribution {mask_seconds:.2f} s (once per mask)")  # fmt: skip
    print(f"{'method':<13} {'s/step':>8} {'cpu s/step':>10} {'state bytes':>12} {'trainable':>10} {'step/SO':>8} "
          f"{'cpu/SO':>7} {'state/SO':>9}")  # fmt: skip
    nan = float("nan")
    for method, row in rows.items():
        if ref:
            row["step_ratio_to_so_graddiff"] = row["seconds_per_step"] / ref["seconds_per_step"]
            row["cpu_step_ratio_to_so_graddiff"] = row["cpu_seconds_per_step"] / ref["cpu_seconds_per_step"]
            row["state_ratio_to_so_graddiff"] = row["state_bytes"] / ref["state_bytes"]
        print(f"{method:<13} {row['seconds_per_step']:>8.4f} {row['cpu_seconds_per_step']:>10.4f} "
              f"{row['state_bytes']:>12,} {row['trainable_params']:>10,} "
              f"{row.get('step_ratio_to_so_graddiff', nan):>8.2f} {row.get('cpu_step_ratio_to_so_graddiff', nan):>7.2f} "
              f"{row.get('state_ratio_to_so_graddiff', nan):>9.3f}")  # fmt: skip
    return {"mask_neurons": mask.total(), "mask_fraction": mask.fraction(), "mask_seconds": mask_seconds,
            "steps_per_run": args.steps, "rounds": args.rounds, "methods": rows}  # fmt: skip


def quality(args, root: Path, where: str) -> dict:
    base = load_model("builtin:full", device="cpu", root=root)
    forget, retain, splits = load_splits(root, args.forget, args.retain_sample)
    reference = load_model(f"builtin:retain{args.forget[-2:]}", device="cpu", root=root)
    rows = {
        "original": evaluate(base.model, base, splits),
        "retain_reference": evaluate(reference.model, reference, splits),
    }
    for method in args.methods:
        result = unlearn(base, forget, retain, preset_config(method))
        rows[method] = {
            **evaluate(result.model.model, base, splits),
            "status": result.status,
            "stop_reason": result.stop_reason,
            "steps": len(result.history),
            "seconds": round(result.seconds, 1),
        }
    print(f"\nUnlearning quality, {where}, {args.forget} (forget {len(forget)} items, retain sample "
          f"{len(splits['retain'])}); greedy exact match / ROUGE-L recall")  # fmt: skip
    print(f"{'model':<17} {'forget EM':>9} {'forget R':>9} {'retain EM':>9} {'retain R':>9} {'steps':>6} {'stop':>14}")
    for name, row in rows.items():
        print(f"{name:<17} {row['forget_em']:>9.3f} {row['forget_rouge']:>9.3f} {row['retain_em']:>9.3f} "
              f"{row['retain_rouge']:>9.3f} {row.get('steps', ''):>6} {row.get('stop_reason', ''):>14}")  # fmt: skip
    return {"forget": args.forget, "retain_sample": len(splits["retain"]), "rows": rows,
            "presets": {m: METHODS[m].preset for m in args.methods}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="built-in folder (default: user's, else the test build)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    parser.add_argument("--forget", default="forget10", help="forget split (default forget10)")
    parser.add_argument("--rounds", type=int, default=3, help="speed: rounds over the methods (default 3)")
    parser.add_argument("--steps", type=int, default=22, help="speed: steps per run (default 22)")
    parser.add_argument("--quality", action="store_true", help="run the quality table instead of the speed table")
    parser.add_argument("--retain-sample", type=int, default=300, help="quality: retain items evaluated (default 300)")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    torch.set_num_threads(args.threads)
    root, where = pick_root(args.root)
    start = time.perf_counter()
    body = quality(args, root, where) if args.quality else speed(args, root, where)
    report = {
        "model": where,
        "root": str(root),
        "threads": args.threads,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
        "note": "measured on a shared 2-core machine while other jobs ran: absolute times are noisy; "
        "ratios come from one interleaved run",
        **body,
    }
    write_json(RESULTS / ("unlearn_quality.json" if args.quality else "unlearn.json"), report)


if __name__ == "__main__":
    main()
