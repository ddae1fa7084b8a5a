"""Sophia's clipping at the presets' rho against a calibrated rho (issue 17: is "second-order" second-order?).

For SIMU and SO-GradDiff (SOUL) at their presets on forget10 / retain10: the share of Sophia's
coordinate updates that stay unclipped (|m| < rho h) per step, with the preset's rho and with rho
calibrated for 30% (`rho_share=0.3`, `unlearn.calibrate_rho`); and where each run ends (status, steps,
forget EM). Sophia's authors tune rho so that 10-50% of coordinates stay unclipped.

    .venv/bin/python bench/bench_rho.py [--root DIR] [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch  # noqa: E402
from _common import RESULTS, pick_root, write_json  # noqa: E402

from simu_core import data as qa  # noqa: E402
from simu_core.methods import get_method, preset_config  # noqa: E402
from simu_core.models import load_model  # noqa: E402
from simu_core.unlearn import resolve_mask, unlearn  # noqa: E402


def run(base, forget, retain, method: str, steps: int, share: float | None, mask) -> dict:
    config = preset_config(method, steps=steps, rho_share=share, device="cpu", probe_every=0)
    result = unlearn(base, forget, retain, config, mask=mask)
    shares = [r.unclipped_fraction for r in result.history]
    return {
        "method": method, "rho_share": share, "rho": result.config.rho, "status": result.status,
        "stop_reason": result.stop_reason, "steps_done": len(shares),
        "forget_em": result.summary()["forget_em"], "unclipped_mean": statistics.fmean(shares),
        "unclipped_min": min(shares), "unclipped_max": max(shares), "seconds": round(result.seconds, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root, why = pick_root(args.root)
    base = load_model("builtin:full", device="cpu", root=root)
    forget = qa.load_data("builtin:forget10", root=root)
    retain = qa.load_data("builtin:retain10", root=root)
    load_start = os.getloadavg()
    rows = []
    for method in ("simu", "so_graddiff"):
        config = preset_config(method, device="cpu")
        mask = resolve_mask(get_method(method), base, forget, retain, config, None)
        for share in (None, 0.3):
            rows.append(run(base, forget, retain, method, args.steps, share, mask))
            r = rows[-1]
            print(f"{method:12s} share {str(share):5s} rho {r['rho']:10.4g}  unclipped mean {r['unclipped_mean']:.4f} "
                  f"(min {r['unclipped_min']:.4f}, max {r['unclipped_max']:.4f})  {r['status']} / {r['stop_reason']} "
                  f"after {r['steps_done']} steps, forget EM {r['forget_em']}, {r['seconds']} s", flush=True)  # fmt: skip
    write_json(RESULTS / "rho.json", {"root": str(root), "why": why, "steps": args.steps, "threads": args.threads,
                                      "load_average": [load_start, os.getloadavg()], "runs": rows})  # fmt: skip


if __name__ == "__main__":
    main()
