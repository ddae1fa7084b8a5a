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

With `--targets` (issue 16) it compares attribution targets, baselines, positions and aggregations
instead: every variant's mask keeps the SIMU preset mask's per-layer counts (the preset: answer target,
zero baseline, all positions, layer_threshold 0.3 with retain scores of the first 400 retain items),
and the localisation check (`simu_core.localise`) zeroes it and 20 seeded random masks of the same
per-layer sizes. Forget: the whole forget split; retain: the 600 retain items after the scored ones
(not used for attribution). Writes bench/results/attribution_targets.json.

    nice -n 5 .venv/bin/python bench/bench_attribution.py --targets --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
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
from simu_core.errors import SimuError  # noqa: E402
from simu_core.masks import make_mask, overlap, random_mask_like  # noqa: E402
from simu_core.methods import preset_config  # noqa: E402
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
    model = make_tiny_llama(config.model, tokenizer, config.seed).eval()
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


# --------------------------------------------------------------------------------------------
# --targets: attribution targets, baselines, positions and aggregations (issue 16)
# --------------------------------------------------------------------------------------------

# (name, target, baseline, positions, aggregate); every mask keeps the preset mask's per-layer counts
VARIANTS = [
    ("preset (answer, zero, all, sum)", "answer", "zero", "all", "sum"),
    ("answer, forget_minus_retain", "answer", "zero", "all", "forget_minus_retain"),
    ("fact", "fact", "zero", "all", "sum"),
    ("fact, subject positions", "fact", "zero", "subject", "sum"),
    ("fact, counterfactual", "fact", "counterfactual", "all", "sum"),
    ("fact, consistency", "fact", "zero", "all", "consistency"),
    ("fact, ratio", "fact", "zero", "all", "ratio"),
    ("contrastive", "contrastive", "zero", "all", "sum"),
    ("contrastive, ratio", "contrastive", "zero", "all", "ratio"),
    ("contrastive, counterfactual", "contrastive", "counterfactual", "all", "sum"),
]


def same_counts(ranked: list[torch.Tensor], counts: list[int], rule: str) -> NeuronMask:
    """The top counts[l] neurons of every layer l by `ranked` (ties: lower index)."""
    layers = []
    for scores, n in zip(ranked, counts, strict=True):
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[torch.sort(scores, descending=True, stable=True).indices[:n]] = True
        layers.append(chosen)
    return NeuronMask(layers, rule, {"counts": counts})


def patching_agreement(loaded, forget: qa.QADataset, per_author: int = 1, authors: int = 20) -> dict:
    """Exact activation patching vs IG from the counterfactual baseline (fact target) on a few items
    (one item of each of 20 authors: every item finds a matched author among them)."""
    names = sorted({it["author"] for it in forget.items})[:authors]
    items = [it for a in names for it in [x for x in forget.items if x["author"] == a][:per_author]]
    small = qa.QADataset("patching_items", items)
    start = time.perf_counter()
    exact = attribute(loaded, small, "patching", target="fact", baseline="counterfactual")
    seconds = time.perf_counter() - start
    ig = attribute(loaded, small, "simu_ig", 5, target="fact", baseline="counterfactual")
    out = {"n_items": len(items), "patching_seconds": seconds, "layers": []}
    for layer, (a, b) in enumerate(zip(exact.layers, ig.layers, strict=True)):
        top = torch.argsort(a.abs(), descending=True)[:20]
        out["layers"].append({
            "layer": layer,
            "pearson": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
            "spearman": float(spearmanr(a.numpy(), b.numpy()).statistic),
            "top20_sign_agreement": float((torch.sign(a[top]) == torch.sign(b[top])).float().mean()),
            "sum_patching": float(a.sum()),
            "sum_ig": float(b.sum()),
        })  # fmt: skip
    return out


def targets_main(argv: list[str]) -> None:
    from simu_core.localise import localise
    from simu_core.masks import combined_scores

    parser = argparse.ArgumentParser(description="attribution targets: ablation selectivity and z-scores")
    parser.add_argument("--targets", action="store_true")
    parser.add_argument("--root", default=None, help="built-in folder (default: see module docstring)")
    parser.add_argument("--model", default="builtin:full", help="model spec (builtin:smollm2: the real model)")
    parser.add_argument("--forget", default="builtin:forget10")
    parser.add_argument("--retain", default="builtin:retain10")
    parser.add_argument("--retain-scored", type=int, default=400, help="first retain items attributed (preset: 400)")
    parser.add_argument("--retain-checked", type=int, default=600, help="retain items after those, for the check")
    parser.add_argument(
        "--check-retain", default=None, help="data spec of the check's retain items (default: see above)"
    )
    parser.add_argument("--random", type=int, default=20, help="random masks per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    parser.add_argument("--no-patching", action="store_true", help="skip the patching vs IG agreement")
    parser.add_argument("--out", default=str(RESULTS / "attribution_targets.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    root, why = pick_root(args.root)
    loaded = load_model(args.model, device="cpu", root=root)
    forget = qa.load_data(args.forget, root=root)
    retain = qa.load_data(args.retain, root=root)
    scored = qa.QADataset("retain_scored", retain.items[: args.retain_scored])
    checked = qa.QADataset(
        "retain_checked", retain.items[args.retain_scored : args.retain_scored + args.retain_checked]
    )
    if args.check_retain:
        checked = qa.load_data(args.check_retain, root=root)
    manifest = (read_manifest(root) or {}) if args.model == "builtin:full" else {}
    why = why if args.model == "builtin:full" else "not the built-in"
    print(
        f"model: {args.model} {root} ({why}); forget {len(forget)}, retain scored {len(scored)}, checked {len(checked)}"
    )
    preset = preset_config("simu").mask
    cache: dict[tuple, tuple] = {}

    def scores_for(target: str, baseline: str, positions: str) -> tuple:
        key = (target, baseline, positions)
        if key not in cache:
            how = dict(method=preset.method, steps=preset.steps, target=target, baseline=baseline,
                       positions=positions, per_item=True)  # fmt: skip
            t0 = time.perf_counter()
            f = attribute(loaded, forget, **how)
            r = attribute(loaded, scored, **how)
            cache[key] = (f, r, time.perf_counter() - t0)
            print(f"  scores {key}: {cache[key][2]:.0f} s", file=sys.stderr)
        return cache[key]

    f0, r0, _ = scores_for("answer", "zero", "all")
    preset_mask = make_mask(f0, preset.rule, preset.value, retain=r0, dual=preset.dual, score=preset.score)
    counts = preset_mask.counts()
    chosen = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    rows = []
    for name, target, baseline, positions, aggregate in chosen:
        try:
            f, r, seconds = scores_for(target, baseline, positions)
        except SimuError as err:  # e.g. no matched item for the counterfactual baseline on a small set
            rows.append({"variant": name, "error": str(err)})
            print(f"  {name}: {err}", file=sys.stderr)
            continue
        if aggregate == "forget_minus_retain":
            ranked = combined_scores(f, r, score="forget_minus_retain")
        else:
            ranked = combined_scores(f, r if aggregate != "sum" else None, aggregate=aggregate)
        mask = preset_mask if name.startswith("preset") else same_counts(ranked, counts, name)
        t0 = time.perf_counter()
        check = localise(loaded, mask, forget, checked, n_random=args.random, seed=0)
        rows.append({
            "variant": name, "target": target, "baseline": baseline, "positions": positions, "aggregate": aggregate,
            "neurons": mask.total(), "counts": mask.counts(), "overlap_with_preset": overlap(mask, preset_mask),
            "attribution_seconds": seconds, "check_seconds": time.perf_counter() - t0,
            "rises": check.rises, "z": check.z, "base": check.base,
            "random_mean": {k: {m: statistics.fmean(v) for m, v in d.items()} for k, d in check.random.items()},
        })  # fmt: skip
        print(f"  {name}: " + " | ".join(check.lines()), file=sys.stderr)
        write_json(args.out, {"partial": True, "rows": rows})  # what is done so far survives a crash

    def z(v: float | None) -> str:
        return "  n/a" if v is None else f"{v:+5.1f}"

    print(f"\n{'variant':<34}{'n':>5}{'ovl':>5}  fact: {'dF':>7}{'dR':>7}{'sel':>6}{'zF':>6}{'zR':>6}{'zSel':>6}"
          f"  answer: {'dF':>7}{'dR':>7}{'sel':>6}{'zSel':>6}")  # fmt: skip
    for row in [r for r in rows if "error" not in r]:
        fa, an, zf, za = row["rises"]["fact"], row["rises"]["answer"], row["z"]["fact"], row["z"]["answer"]
        print(f"{row['variant']:<34}{row['neurons']:>5}{row['overlap_with_preset']:>5.2f}  "
              f"      {fa['forget_rise']:>7.4f}{fa['retain_rise']:>7.4f}{fa['selectivity']:>6.2f}"
              f"{z(zf['forget_rise'])}{z(zf['retain_rise'])}{z(zf['selectivity'])}"
              f"          {an['forget_rise']:>7.4f}{an['retain_rise']:>7.4f}{an['selectivity']:>6.2f}"
              f"{z(za['selectivity'])}")  # fmt: skip
    agreement = None if args.no_patching else patching_agreement(loaded, forget)
    if agreement:
        for layer in agreement["layers"]:
            print(f"patching vs IG(counterfactual), layer {layer['layer']}: pearson {layer['pearson']:.2f}, "
                  f"spearman {layer['spearman']:.2f}, top-20 sign agreement {layer['top20_sign_agreement']:.2f}")  # fmt: skip
    load_end = os.getloadavg()
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_end}")
    write_json(args.out, {
        "model": args.model, "model_root": str(root), "model_choice": why, "model_config": manifest.get("config"),
        "data_digest": manifest.get("data_digest"), "forget": args.forget, "n_forget": len(forget),
        "retain": args.retain, "retain_scored": len(scored), "retain_checked": len(checked),
        "n_random": args.random, "preset_mask": preset_mask.summary(), "threads": args.threads,
        "load_average_start": load_start, "load_average_end": load_end, "platform": platform.platform(),
        "rows": rows, "patching_agreement": agreement,
    })  # fmt: skip


if __name__ == "__main__":
    if "--targets" in sys.argv[1:]:
        targets_main(sys.argv[1:])
    else:
        main()
