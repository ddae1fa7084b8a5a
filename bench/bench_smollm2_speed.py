"""SmolLM2-135M on CPU: is it usable in the app? Attribution of 20 items and a SIMU run to its stop.

    nice -n 0 .venv/bin/python bench/bench_smollm2_speed.py [--threads 2] [--repeats 2]

Targets (issue 15, 2 CPU cores): attribution with grad_x_act and simu_ig_joint on 20 items within 60 s;
a SIMU run with SmolLM2's preset (`methods.MODEL_PRESETS`) on the teaching scenario (forget Asia's
capitals, keep Europe's) to its early stop within 5 minutes, attribution for its mask included.
Run it alone: the machine's load average at the start and the end is stored with the times.
Writes bench/results/smollm2_speed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

import _common
import torch

from simu_core import data as qa
from simu_core import models
from simu_core.attribution import attribute
from simu_core.knowledge import ensure_knowledge
from simu_core.methods import preset_config
from simu_core.unlearn import compute_mask, unlearn

ATTRIBUTION_TARGET_S = 60.0
RUN_TARGET_S = 300.0
MODEL = "builtin:smollm2"


def time_attribution(loaded, items: qa.QADataset, method: str, steps: int, repeats: int) -> dict:
    """Best and all wall times of `attribute` (the method's own batch settings) on `items`."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        attribute(loaded, items, method=method, steps=steps)
        seconds.append(time.perf_counter() - start)
    return {"method": method, "steps": steps, "items": len(items), "seconds": [round(s, 1) for s in seconds],
            "best_s": round(min(seconds), 1), "target_s": ATTRIBUTION_TARGET_S}  # fmt: skip


def time_simu_run(loaded, forget: qa.QADataset, retain: qa.QADataset) -> dict:
    """One SIMU run with the model's preset: its mask (attribution) and the loop to the early stop."""
    config = preset_config("simu", model=MODEL, forget="builtin:smollm2/forget", retain="builtin:smollm2/retain",
                           seed=1, device="cpu")  # fmt: skip
    start = time.perf_counter()
    mask = compute_mask(loaded, forget, retain, config.mask)
    mask_s = time.perf_counter() - start
    result = unlearn(loaded, forget, retain, config, mask=mask)
    total = time.perf_counter() - start
    summary = result.summary()
    return {"mask_s": round(mask_s, 1), "loop_s": round(summary["seconds"], 1), "total_s": round(total, 1),
            "steps_done": summary["steps_done"], "stop_reason": result.stop_reason, "forget_em": summary["forget_em"],
            "mask_neurons": summary["mask_neurons"], "lr": config.lr, "target_s": RUN_TARGET_S,
            "step_s": round(summary["seconds"] / max(1, summary["steps_done"]), 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="attribution repeats (the best is reported)")
    parser.add_argument("--out", default=str(_common.RESULTS / "smollm2_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensure_knowledge("smollm2")
    result: dict = {"threads": args.threads, "load_average_at_start": os.getloadavg()}
    loaded = models.load_model(MODEL, device="cpu")
    forget, retain = qa.load_data("builtin:smollm2/forget"), qa.load_data("builtin:smollm2/retain")
    items = qa.QADataset("retain20", retain.items[:20])
    result["attribution"] = [
        time_attribution(loaded, items, m, 5, args.repeats) for m in ("grad_x_act", "simu_ig_joint")
    ]
    result["simu_run"] = time_simu_run(loaded, forget, retain)
    result["load_average_at_end"] = os.getloadavg()
    _common.write_json(args.out, result)
    print(f"\nload average at start {result['load_average_at_start']}, end {result['load_average_at_end']}\n")
    print("| what | seconds | target | within |\n|---|---|---|---|")
    for row in result["attribution"]:
        ok = row["best_s"] <= row["target_s"]
        print(f"| attribution {row['method']} (m = {row['steps']}), {row['items']} items | {row['best_s']} | "
              f"{row['target_s']:.0f} | {'yes' if ok else 'no'} |")  # fmt: skip
    run = result["simu_run"]
    print(f"| SIMU run to its stop ({run['steps_done']} steps, {run['stop_reason']}; mask {run['mask_s']} s, "
          f"loop {run['loop_s']} s) | {run['total_s']} | {run['target_s']:.0f} | "
          f"{'yes' if run['total_s'] <= run['target_s'] else 'no'} |")  # fmt: skip


if __name__ == "__main__":
    main()
