"""The memory planner against measured peaks on CPU: small and default built-ins, SmolLM2-135M's shape.

Each case runs in its own process with MALLOC_MMAP_THRESHOLD_=65536 (tensors above 64 KiB are their
own mappings, returned to the system when freed) and one thread; the measured peak is the resident
base model + the rise of peak RSS during `unlearn` after a 1-step warm-up (`unlearn.measure_unlearn`).
SmolLM2-135M is a randomly initialised Llama of its published shape (30 layers, d 576, d_ff 1536,
9 heads, 3 kv heads, vocab 49152): the weights do not change the memory, only the shape does. Its
questions come from the small built-in (token ids < 512 are valid in any vocabulary of 49152).

    .venv/bin/python bench/bench_memory.py [--cases small,default,smollm2] [--out bench/results/memory_cpu.json]
    .venv/bin/python bench/bench_memory.py --shards 2 --out bench/results/memory_cpu_sharded.json

With `--shards N` each case runs on N gloo processes (`torch.distributed.run`), sharded with FSDP
(`unlearn --shard`: the working copy of every method, and the whole-tensor methods' gradients and
state); every process measures its own peak, and the row reports the largest against the plan per
process (`plan(..., shards=N)`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CASES = {  # name: (data root, model: "builtin" or a KNOWN_SHAPES name, batch rows forget/retain, steps)
    "small": (".pytest_cache/simu_builtin", "builtin", 32, 32, 3),
    "default": ("simu_core/assets/builtin-default", "builtin", 32, 32, 3),
    "smollm2": (".pytest_cache/simu_builtin", "smollm2-135m", 4, 4, 2),
}


def measure_case(name: str, methods: list[str], shards: int = 1) -> list[dict]:
    """In this process: plan and measure each method on case `name` (see the module docstring); with
    `shards` > 1, this process's part of a run launched on that many processes."""
    import torch

    torch.set_num_threads(1)
    from simu_core import data as qa
    from simu_core import memory
    from simu_core.methods import preset_config
    from simu_core.models import LoadedModel, load_model
    from simu_core.unlearn import compute_mask, measure_unlearn

    root, model, rows, retain_rows, steps = CASES[name]
    base = load_model(str(REPO / root / "models" / "full"), device="cpu")
    if model != "builtin":
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(memory.llama_config(**memory.KNOWN_SHAPES[model])).float().eval()
        base = LoadedModel(net, base.tokenizer, base.fmt, model, model)
    forget = qa.load_data(str(REPO / root / "data" / "forget10.jsonl"))
    retain = qa.load_data(str(REPO / root / "data" / "retain10.jsonl"))
    forget, retain = (qa.QADataset(d.name, d.items[:n]) for d, n in ((forget, rows), (retain, retain_rows)))
    encoded = qa.encode_dataset(base.tokenizer, base.fmt, forget) + qa.encode_dataset(base.tokenizer, base.fmt, retain)
    seq_len = max(len(e.ids) for e in encoded)
    shape = memory.shape_of(base.model)
    out = []
    for method in methods:
        config = preset_config(method, steps=steps, device="cpu", stop_forget_em=None, batch_size=len(forget.items),
                               retain_batch_size=len(retain.items), mask={"method": "grad_x_act"},
                               shard=shards > 1)  # fmt: skip
        config.probe_every = 0
        mask = compute_mask(base, forget, retain, config.mask) if method in ("simu", "random_mask") else None
        t0 = time.perf_counter()
        measured = measure_unlearn(base, forget, retain, config, mask)
        plan = memory.plan(shape, config, seq_len, neurons=mask.total() if mask else None, shards=shards)
        out.append({"case": name, "method": method, "shards": plan.shards, "processes": shards,
                    "params": shape.params, "seq_len": seq_len,
                    "rows": [len(forget.items), len(retain.items)], "measured_bytes": measured,
                    "planned_bytes": plan.total, "planned_over_measured": round(plan.total / measured, 3),
                    "plan": plan.to_dict(), "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    return out


def run_case(name: str, methods: list[str], shards: int = 1) -> list[dict]:
    """`measure_case` in fresh processes with the malloc setting (see the module docstring): one, or
    `shards` launched by `torch.distributed.run`, of which the largest peak per method is kept."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if shards == 1:
        command = [sys.executable, "-c",
                   f"import json, bench.bench_memory as b; print(json.dumps(b.measure_case({name!r}, {methods!r})))"]  # fmt: skip
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(shards), "--master_port",
                   str(29500 + os.getpid() % 1000), __file__, "--worker", name, "--methods", ",".join(methods),
                   "--shards", str(shards)]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:  # one file per process: their stdout lines would interleave
        done = subprocess.run(command, cwd=REPO, env={**env, "BENCH_OUT": folder}, capture_output=True, text=True,
                              check=False)  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"case {name} failed:\n{done.stderr[-3000:]}")
        if shards == 1:
            return json.loads(done.stdout.strip().splitlines()[-1])
        per_process = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("rank*.json"))]
    return [max(rows, key=lambda r: r["measured_bytes"]) for rows in zip(*per_process, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="small,default,smollm2")
    parser.add_argument("--methods", default="simu,so_graddiff")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_cpu.json"))
    parser.add_argument("--shards", type=int, default=1, help="processes per case, sharded (FSDP)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one launched process of a case
    args = parser.parse_args()
    if args.worker:
        rows = measure_case(args.worker, args.methods.split(","), args.shards)
        Path(os.environ["BENCH_OUT"], f"rank{os.environ['RANK']}.json").write_text(json.dumps(rows))
        return
    rows = []
    for name in args.cases.split(","):
        rows += run_case(name, args.methods.split(","), args.shards)
    print(f"{'case':<10}{'method':<18}{'params':>12}{'planned MiB':>14}{'measured MiB':>14}{'ratio':>8}")
    for r in rows:
        label = r["method"] + (f" /{r['shards']}" if r.get("shards", 1) > 1 else "")
        print(f"{r['case']:<10}{label:<18}{r['params']:>12,}{r['planned_bytes'] / 2**20:>14.1f}"
              f"{r['measured_bytes'] / 2**20:>14.1f}{r['planned_over_measured']:>8.3f}")  # fmt: skip
    result = {"load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "rows": rows,
              "method": "peak RSS rise (VmHWM after clear_refs) + resident base, MALLOC_MMAP_THRESHOLD_=65536"}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
