"""Relearning attack after each method on SmolLM2's real-knowledge benchmark: forgotten, or only hidden?

    .venv/bin/python bench/bench_relearn.py [--methods simu,simu_paper,fo_graddiff] [--threads 2]

Each method unlearns Asia's 15 capitals at its SmolLM2 preset (`methods.MODEL_PRESETS`, seed 1: the
quality table's first seed; the runs are the table's), then `relearn.relearning_attack` fine-tunes a copy
for `--attack-steps` AdamW steps on a seeded half of the capitals and counts how many of the *other* half
the model gives again. The attack on the original model (which knows every capital) shows nothing; the
trained half's share shows the attack itself works. `--steps` gives every method the same larger budget
(for the random-mask control, which does not reach the forget target in the table's 60 steps).
Writes bench/results/relearn_smollm2.json and prints a Markdown table (load average at start and end).
"""

from __future__ import annotations

import argparse
import os
import time

import _common
import torch

from simu_core import data as qa
from simu_core import models
from simu_core.knowledge import ensure_knowledge
from simu_core.methods import preset_config
from simu_core.relearn import RelearnConfig, known_share, relearning_attack
from simu_core.unlearn import unlearn

MODEL = "builtin:smollm2"
FORGET, RETAIN = "builtin:smollm2/forget", "builtin:smollm2/retain"


def attack_after(method: str, base, forget, retain, attack: RelearnConfig, steps: int | None, seed: int) -> dict:
    """Unlearn with `method`'s preset, then attack; the run's stop and the attack's shares."""
    config = preset_config(method, model=MODEL, forget=FORGET, retain=RETAIN, seed=seed, steps=steps)
    start = time.perf_counter()
    result = unlearn(base, forget, retain, config)
    seconds = time.perf_counter() - start
    row = {"method": method, "status": result.status, "steps_done": result.summary()["steps_done"],
           "stop_reason": result.stop_reason, "unlearn_s": round(seconds, 1)}  # fmt: skip
    if result.status != "ok":
        return {**row, "forget_known": known_share(result.model, result.model.model, forget, attack.max_new_tokens)}
    return with_forget_known({**row, **relearning_attack(result.model, result.model.model, forget, attack)})


def with_forget_known(row: dict) -> dict:
    """The whole forget set's known share, from the two halves the attack measured before training."""
    n = row["n_trained"] + row["n_heldout"]
    known = (row["trained_before"] * row["n_trained"] + row["heldout_before"] * row["n_heldout"]) / n
    return {**row, "forget_known": known}


def markdown(rows: list[dict]) -> str:
    head = ("method", "steps", "forget known", "held-out before", "held-out after", "trained after", "loss")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        loss = f"{r['losses'][0]:.2f} → {r['losses'][-1]:.2f}" if r.get("losses") else "–"
        cells = [r["method"], str(r["steps_done"]), f"{r['forget_known']:.3f}", f"{r.get('heldout_before', 0):.3f}",
                 f"{r.get('heldout_after', 0):.3f}", f"{r.get('trained_after', 0):.3f}", loss]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="simu,simu_paper,fo_graddiff")
    parser.add_argument("--steps", type=int, default=None, help="every method's step budget (default: the presets')")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--attack-lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(_common.RESULTS / "relearn_smollm2.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    ensure_knowledge("smollm2")
    base = models.load_model(MODEL, device="cpu")
    forget, retain = qa.load_data(FORGET), qa.load_data(RETAIN)
    attack = RelearnConfig(steps=args.attack_steps, lr=args.attack_lr, seed=0, max_new_tokens=12)
    original = with_forget_known({"method": "original", "status": "ok", "steps_done": 0,
                                  **relearning_attack(base, base.model, forget, attack)})  # fmt: skip
    rows = [original]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        rows.append(attack_after(method, base, forget, retain, attack, args.steps, args.seed))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    result = {"model": MODEL, "forget": FORGET, "retain": RETAIN, "seed": args.seed, "steps": args.steps,
              "attack": vars(attack), "threads": args.threads, "load_start": load_start,
              "load_end": os.getloadavg(), "rows": rows}  # fmt: skip
    _common.write_json(args.out, result)
    print(markdown(rows))


if __name__ == "__main__":
    main()
