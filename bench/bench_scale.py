"""SIMU vs SOUL at scale: step time, peak memory, optimiser state, forward+backward MFU, attribution time.

On a GPU (what `bench/gpu.sh` runs; under 10 minutes on one H100/H200): a 1B-shaped Llama (Llama-3.2-1B's
sizes) and a SmolLM2-135M-shaped one, randomly initialised (speed and memory depend on the shape only),
loaded in bf16 as the app loads a model on a GPU. `--device cpu --quick` runs the same measurements on
the small and default built-in shapes (the numbers in bench/results/scale_cpu.json).

Per shape:
- attribution: seconds of `attribute(simu_ig, m=5)` and `grad_x_act` on the forget items;
- unlearning: `unlearn` with the SIMU and SOUL (so_graddiff) presets for `--steps` steps (no early
  stop, no probes); the weight entries changed outside the slices each run trained (must be 0);
  median step time (curvature steps are 1 in 10 and included in the mean), peak
  memory after a 1-step warm-up (CUDA: max_memory_allocated; CPU: peak RSS rise + the resident base, with
  MALLOC_MMAP_THRESHOLD_=65536, see `memory.measure_peak`), optimiser state bytes,
  and the planner's estimate next to the measured peak;
- forward+backward MFU: a plain LM loss on `--mfu-batch` x `--mfu-len` random tokens, model FLOPs
  6 N T + 12 L d T^2 per sequence (N: non-embedding parameters), against the device's dense bf16 peak
  (H100/H200: 989 TFLOP/s; CPU: no peak, achieved FLOP/s only).
Targets: SIMU step <= 0.8x SOUL's; SIMU optimiser state <= 10% of SOUL's.

    .venv/bin/python bench/bench_scale.py [--device cuda] [--quick] [--steps 20] [--out bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch
from _common import REPO, write_json

ASSETS = REPO / "simu_core" / "assets" / "builtin-default"
SHAPES = {  # name: (layers, d, d_ff, heads, kv_heads, vocab)
    "small": dict(layers=2, d=64, d_ff=256, heads=4, kv_heads=4, vocab=1024),  # the small built-in's, vocab 1024
    "default": dict(layers=4, d=128, d_ff=512, heads=4, kv_heads=4, vocab=1024),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def load_shape(name: str, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Llama of the shape `name`, as a LoadedModel with the built-in's tokenizer."""
    from transformers import AutoModelForCausalLM

    from simu_core import memory
    from simu_core.models import LoadedModel, load_model

    sizes = SHAPES.get(name) or memory.KNOWN_SHAPES[name]
    tokenizer_side = load_model(str(ASSETS / "models" / "full"), device="cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(memory.llama_config(**sizes), dtype=dtype)
    return LoadedModel(model.eval(), tokenizer_side.tokenizer, tokenizer_side.fmt, f"shape:{name}", name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_of(fn, device: torch.device, base_bytes: int) -> tuple[object, int]:
    """(fn(), peak bytes): CUDA allocator peak, or on CPU the resident base + the peak RSS rise."""
    from simu_core.memory import measure_peak

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        return out, torch.cuda.max_memory_allocated(device)
    out, rise = measure_peak(fn)
    return out, base_bytes + rise


def mfu(loaded, device: torch.device, batch: int, length: int, repeats: int) -> dict:
    """Forward+backward of a plain LM loss on random tokens: seconds, achieved TFLOP/s and MFU."""
    from simu_core.memory import shape_of

    model, shape = loaded.model, shape_of(loaded.model)
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(
        0, shape.vocab, (batch, length), device=device, generator=torch.Generator(device).manual_seed(0)
    )

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    times = [timed(step, device)[1] for _ in range(repeats)]
    for p in model.parameters():
        p.requires_grad_(False)
    embedding = shape.vocab * shape.d
    flops = batch * (6 * (shape.params - embedding) * length + 12 * shape.layers * shape.d * length**2)
    seconds = statistics.median(times)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = flops / seconds / 1e12
    return {"batch": batch, "length": length, "seconds": round(seconds, 4), "tflops": round(achieved, 3),
            "peak_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None}  # fmt: skip


def changed_outside(result) -> int:
    """Entries of the unlearned model that differ from the base outside the slices the run trained
    (`result.changes`: whole tensors or `index` on `dim`). 0 when the mask held, bit for bit."""
    trained = {c.name: c for c in result.changes}
    count = 0
    for name, after in result.model.model.named_parameters():
        differs = after.detach() != result.base.model.get_parameter(name).detach()
        change = trained.get(name)
        if change is not None and change.index is None:
            continue
        if change is not None:
            differs.index_fill_(change.dim, change.index.to(differs.device), False)
        count += int(differs.sum())
    return count


def run_method(loaded, forget, retain, method: str, steps: int, mask, device: torch.device) -> dict:
    from simu_core import memory
    from simu_core.methods import preset_config
    from simu_core.unlearn import unlearn

    config = preset_config(method, steps=steps, device=str(device), stop_forget_em=None, batch_size=32,
                           retain_batch_size=32)  # fmt: skip
    config.probe_every = 0
    base = memory.base_bytes(loaded.model)
    unlearn(loaded, forget, retain, dataclasses.replace(config, steps=1), mask=mask)  # warm-up (code pages, caches)
    result, peak = peak_of(lambda: unlearn(loaded, forget, retain, config, mask=mask), device, base)
    seconds = [r.seconds for r in result.history]
    plan = memory.plan(memory.shape_of(loaded.model), config, memory.longest_row(loaded, forget, retain),
                       neurons=mask.total() if mask is not None else None,
                       base_dtype=str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
                       device=device.type)  # fmt: skip
    return {"status": result.status, "steps": len(seconds),
            "step_median_s": round(statistics.median(seconds[1:] or seconds), 5),
            "step_mean_s": round(statistics.mean(seconds[1:] or seconds), 5),
            "peak_bytes": peak, "planned_bytes": plan.total, "planned_over_measured": round(plan.total / peak, 3),
            "state_bytes": result.state_bytes, "trainable": result.trainable_params,
            "changed_outside_trained": changed_outside(result)}  # fmt: skip


def bench_shape(name: str, device: torch.device, args) -> dict:
    from simu_core import data as qa
    from simu_core.attribution import attribute
    from simu_core.masks import make_mask
    from simu_core.methods import preset_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_shape(name, device, dtype)
    forget = qa.load_data(str(ASSETS / "data" / "forget10.jsonl"))
    retain = qa.load_data(str(ASSETS / "data" / "retain10.jsonl"))
    forget = qa.QADataset("forget10", forget.items[: args.items])
    retain = qa.QADataset("retain10", retain.items[: args.items])
    row = {"shape": name, "params": sum(p.numel() for p in loaded.model.parameters()), "dtype": str(dtype)}
    scores, row["attribution_simu_ig_s"] = timed(lambda: attribute(loaded, forget, "simu_ig", steps=5), device)
    _, row["attribution_grad_x_act_s"] = timed(lambda: attribute(loaded, forget, "grad_x_act", steps=1), device)
    m = preset_config("simu").mask
    mask = make_mask(scores, m.rule, m.value)
    row["mask_neurons"] = mask.total()
    row["simu"] = run_method(loaded, forget, retain, "simu", args.steps, mask, device)
    row["soul"] = run_method(loaded, forget, retain, "so_graddiff", args.steps, None, device)
    simu, soul = row["simu"], row["soul"]
    row["step_ratio_simu_over_soul"] = round(simu["step_median_s"] / soul["step_median_s"], 3)
    row["peak_ratio_simu_over_soul"] = round(simu["peak_bytes"] / soul["peak_bytes"], 3)
    row["state_ratio_simu_over_soul"] = round(simu["state_bytes"] / soul["state_bytes"], 4)
    row["targets_met"] = {"step <= 0.8x": row["step_ratio_simu_over_soul"] <= 0.8,
                          "state <= 10%": row["state_ratio_simu_over_soul"] <= 0.10,
                          "nothing changed outside": simu["changed_outside_trained"] == soul["changed_outside_trained"] == 0}  # fmt: skip
    row["fwd_bwd"] = mfu(loaded, device, args.mfu_batch, args.mfu_len, args.mfu_repeats)
    loaded.model.to("meta")  # free the weights before the next shape
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, few steps (the CPU dry run)")
    parser.add_argument("--shapes", default=None, help="comma-separated: small, default, smollm2-135m, llama-1b")
    parser.add_argument("--steps", type=int, default=None, help="unlearning steps per method (default 20; quick 4)")
    parser.add_argument("--items", type=int, default=None, help="forget / retain items (default 200; quick 32)")
    parser.add_argument("--mfu-batch", type=int, default=None, help="rows of the MFU batch (default 8; quick 4)")
    parser.add_argument("--mfu-len", type=int, default=None, help="tokens per MFU row (default 1024; quick 64)")
    parser.add_argument("--mfu-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/gpu.json; cpu: scale_cpu.json)")
    args = parser.parse_args()
    quick = args.quick
    args.steps = args.steps or (4 if quick else 20)
    args.items = args.items or (32 if quick else 200)
    args.mfu_batch = args.mfu_batch or (4 if quick else 8)
    args.mfu_len = args.mfu_len or (64 if quick else 1024)
    shapes = (args.shapes or ("small,default" if quick else "smollm2-135m,llama-1b")).split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # see memory.measure_peak
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for the CPU dry run")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    rows = [bench_shape(s.strip(), device, args) for s in shapes]
    print(f"device: {name}")
    print(f"{'shape':<14}{'params':>14}{'SIMU step s':>13}{'SOUL step s':>13}{'step x':>8}{'peak x':>8}"
          f"{'state x':>9}{'attr s':>8}{'MFU':>8}{'outside':>9}")  # fmt: skip
    for r in rows:
        mfu_text = "n/a" if r["fwd_bwd"]["mfu"] is None else f"{r['fwd_bwd']['mfu']:.3f}"
        print(f"{r['shape']:<14}{r['params']:>14,}{r['simu']['step_median_s']:>13.4f}{r['soul']['step_median_s']:>13.4f}"
              f"{r['step_ratio_simu_over_soul']:>8.3f}{r['peak_ratio_simu_over_soul']:>8.3f}"
              f"{r['state_ratio_simu_over_soul']:>9.4f}{r['attribution_simu_ig_s']:>8.2f}{mfu_text:>8}"
              f"{r['simu']['changed_outside_trained'] + r['soul']['changed_outside_trained']:>9}")  # fmt: skip
    out = args.out or str(REPO / "bench" / "results" / ("gpu.json" if device.type == "cuda" else "scale_cpu.json"))
    write_json(out, {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1),
                     "settings": {k: getattr(args, k) for k in ("steps", "items", "mfu_batch", "mfu_len", "quick")},
                     "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
