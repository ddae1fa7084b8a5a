"""Benchmark the neuron-attribution methods on the built-in model and a forget split.

For every method: wall-clock seconds, forward/backward passes over the data, Spearman rank
agreement with `simu_ig` (all neurons pooled), overlap of the top-1% sets with simu_ig's, and
localisation: the rise in mean answer-token NLL (nats) on the forget and retain sets when the
top 1% of neurons are zeroed, next to the mean rise for random masks with the same per-layer
counts. Two selections are measured: global top 1% by forget score, and top 1% per layer by the
forget-minus-retain score (retain scores on a retain sample).

Model: `--root` if given, else the user's built-in default if it is built, else the small
test build in .pytest_cache/simu_builtin (the table says which). Nothing is trained here.

When the model used is not the default 200-author shape, a second table times the methods on
that shape (4 layers, d=128, d_ff=512, vocab 1024; forget10 of a freshly generated 200-author
benchmark) with untrained weights: speed does not depend on the weights, scores do (so only
seconds and passes are reported there).

    .venv/bin/python bench/bench_attribution.py [--root DIR] [--threads 2] [--methods simu_ig,grad_x_act]

Prints a table and writes bench/results/attribution.json.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time

import torch
from _common import REPO, RESULTS, TEST_BUILD, pick_root, write_json  # noqa: E402, F401
from scipy.stats import spearmanr

from simu_core import data as qa  # noqa: E402
from simu_core.arch import neuron_layers  # noqa: E402
from simu_core.attribution import METHODS, attribute, batch_loglik, injected, make_batches  # noqa: E402
from simu_core.builtin import make_tiny_llama, read_manifest, train_tokenizer  # noqa: E402
from simu_core.config import BuiltinConfig  # noqa: E402
from simu_core.masks import make_mask, overlap, random_mask_like  # noqa: E402
from simu_core.models import LoadedModel, load_model  # noqa: E402
from simu_core.neurons import NeuronMask  # noqa: E402

N_RANDOM = 5


def mean_nll(model, batches, mask: NeuronMask | None) -> float:
    """Mean answer-token NLL (nats) with the masked neurons' activations set to zero."""
    keep = None if mask is None else [~m for m in mask.layers]

    def zero(index: int, x: torch.Tensor) -> torch.Tensor:
        return x if keep is None else x * keep[index].to(x.device, x.dtype)

    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            with injected(neuron_layers(model), zero, batch["input_ids"].shape[1]):
                total += float(batch_loglik(model, batch).sum())
            tokens += int((batch["labels"] != -100).sum())
    return -total / tokens


def localisation(model, forget_batches, retain_batches, mask: NeuronMask, base: tuple[float, float]) -> dict:
    rise_f = mean_nll(model, forget_batches, mask) - base[0]
    rise_r = mean_nll(model, retain_batches, mask) - base[1]
    rand_f, rand_r = [], []
    for seed in range(N_RANDOM):
        control = random_mask_like(mask, seed)
        rand_f.append(mean_nll(model, forget_batches, control) - base[0])
        rand_r.append(mean_nll(model, retain_batches, control) - base[1])
    return {
        "counts": mask.counts(),
        "forget_rise": rise_f,
        "retain_rise": rise_r,
        "random_forget_rise": sum(rand_f) / N_RANDOM,
        "random_retain_rise": sum(rand_r) / N_RANDOM,
    }


def default_shape_speed(methods: list[str], steps: int, batch_size: int) -> list[dict]:
    """Seconds and passes of each method on the default shape with untrained weights."""
    config = BuiltinConfig()
    splits = qa.generate_benchmark(config.n_authors, config.seed)
    fmt = qa.PromptFormat()
    texts = [f"{fmt.prompt(it['question'])} {it['answer']}" for items in splits.values() for it in items]
    tokenizer = train_tokenizer(texts, config.model.vocab_size)
    model = make_tiny_llama(config, tokenizer).eval()
    loaded = LoadedModel(model, tokenizer, fmt, "untrained default shape", "")
    forget = qa.QADataset("forget10", splits["forget10"])
    rows = []
    for name in methods:
        attribute(loaded, qa.QADataset("warmup", forget.items[:2]), name, steps=2)
        start = time.perf_counter()
        scores = attribute(loaded, forget, name, steps=steps, batch_size=batch_size)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "method": name,
                "seconds": seconds,
                "forward_passes": scores.forward_passes,
                "backward_passes": scores.backward_passes,
            }
        )
        print(f"  default shape {name}: {seconds:.2f} s", file=sys.stderr)
    print(
        f"default shape (untrained), forget10 = {len(forget)} items, {sum(p.numel() for p in model.parameters())} params"
    )
    print(f"{'method':<20}{'sec':>7}{'fwd':>5}{'bwd':>5}")
    for r in rows:
        print(f"{r['method']:<20}{r['seconds']:>7.2f}{r['forward_passes']:>5}{r['backward_passes']:>5}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="built-in folder (default: see module docstring)")
    parser.add_argument("--forget", default="builtin:forget10")
    parser.add_argument("--retain", default="builtin:retain10")
    parser.add_argument("--retain-sample", type=int, default=200, help="retain items scored for forget-minus-retain")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(RESULTS / "attribution.json"))
    parser.add_argument("--no-shape-speed", action="store_true", help="skip the default-shape speed table")
    parser.add_argument("--shape-methods", default="simu_ig,simu_ig_joint,grad_x_act", help="methods timed there")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    root, why = pick_root(args.root)
    loaded = load_model("builtin:full", device="cpu", root=root)
    forget = qa.load_data(args.forget, root=root)
    retain = qa.load_data(args.retain, root=root)
    sample = qa.QADataset("retain_sample", random.Random(0).sample(retain.items, min(args.retain_sample, len(retain))))
    pad = qa.pad_id_of(loaded.tokenizer)
    encode = lambda ds: qa.encode_dataset(loaded.tokenizer, loaded.fmt, ds)  # noqa: E731
    forget_batches = make_batches(encode(forget), 64, pad)
    retain_batches = make_batches(encode(retain), 64, pad)
    base = (mean_nll(loaded.model, forget_batches, None), mean_nll(loaded.model, retain_batches, None))
    manifest = read_manifest(root) or {}
    print(f"model: {root} ({why}); {manifest.get('config', {}).get('model', '')}", file=sys.stderr)
    print(f"forget {len(forget)} items, retain {len(retain)} (scored sample {len(sample)}), threads {args.threads}")

    methods = args.methods.split(",")
    if "simu_ig" in methods:
        methods.remove("simu_ig")
    methods.insert(0, "simu_ig")
    rows, ref_scores, ref_top = [], None, None
    for name in methods:
        attribute(loaded, qa.QADataset("warmup", forget.items[:2]), name, steps=2)  # imports, lazy init
        start = time.perf_counter()
        scores = attribute(loaded, forget, name, steps=args.steps, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        retain_scores = attribute(loaded, sample, name, steps=args.steps, batch_size=args.batch_size)
        top = make_mask(scores, "global_top", 1)
        flat = torch.cat(scores.layers)
        if ref_scores is None:
            ref_scores, ref_top = flat, top
        fmr = make_mask(scores, "layer_percent", 1, retain=retain_scores, score="forget_minus_retain")
        rows.append(
            {
                "method": name,
                "steps": scores.steps,
                "seconds": seconds,
                "forward_passes": scores.forward_passes,
                "backward_passes": scores.backward_passes,
                "spearman_vs_simu_ig": float(spearmanr(flat.numpy(), ref_scores.numpy()).statistic),
                "top1_overlap_vs_simu_ig": overlap(top, ref_top),
                "global_top1_forget": localisation(loaded.model, forget_batches, retain_batches, top, base),
                "layer_top1_forget_minus_retain": localisation(loaded.model, forget_batches, retain_batches, fmr, base),
            }
        )
        print(f"  {name}: {seconds:.2f} s", file=sys.stderr)

    header = (
        f"{'method':<20}{'sec':>7}{'fwd':>5}{'bwd':>5}{'rho':>7}{'top1%':>7}"
        f"{'  global top1% (forget) dF / dR | random dF / dR':<52}{'  per-layer 1% (f-r) dF / dR | random dF / dR'}"
    )
    print(header)
    for r in rows:
        g, d = r["global_top1_forget"], r["layer_top1_forget_minus_retain"]
        print(
            f"{r['method']:<20}{r['seconds']:>7.2f}{r['forward_passes']:>5}{r['backward_passes']:>5}"
            f"{r['spearman_vs_simu_ig']:>7.2f}{r['top1_overlap_vs_simu_ig']:>7.2f}"
            f"  {g['forget_rise']:.4f} / {g['retain_rise']:.4f} | {g['random_forget_rise']:.4f} / "
            f"{g['random_retain_rise']:.4f}              "
            f"  {d['forget_rise']:.4f} / {d['retain_rise']:.4f} | {d['random_forget_rise']:.4f} / "
            f"{d['random_retain_rise']:.4f}"
        )
    result = {
        "model_root": str(root),
        "model_choice": why,
        "model_config": manifest.get("config"),
        "forget": args.forget,
        "n_forget": len(forget),
        "retain": args.retain,
        "n_retain": len(retain),
        "retain_sample": len(sample),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "base_nll": {"forget": base[0], "retain": base[1]},
        "torch": torch.__version__,
        "machine": platform.platform(),
        "note": "timings taken on a shared 2-core machine with other jobs running are noisy",
        "methods": rows,
    }
    default_shape = (manifest.get("config") or {}).get("model") == {**vars(BuiltinConfig().model)}
    if not default_shape and not args.no_shape_speed:
        result["default_shape_speed"] = default_shape_speed(args.shape_methods.split(","), args.steps, args.batch_size)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
