"""Command line: `python -m simu_core <command> ...` (a thin layer over the library).

Every command prints progress to stderr and its result to stdout; with `--json` the last line
of stdout is a JSON summary. User errors (`SimuError`) print one line and exit with code 2.

Adding a command is one function decorated with `@command(name, help, arguments)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from simu_core.config import BUILTIN_SIZES, parse_settings
from simu_core.errors import SimuError

Arguments = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, Arguments, Callable[[argparse.Namespace], dict]]] = {}


def command(name: str, help: str, arguments: Arguments) -> Callable:
    """Register `fn(args) -> summary dict` as the subcommand `name`."""

    def register(fn: Callable[[argparse.Namespace], dict]) -> Callable:
        _COMMANDS[name] = (help, arguments, fn)
        return fn

    return register


def stderr_progress(message: str, fraction: float) -> None:
    print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)


def ensure_builtin_for(*specs: str | None) -> None:
    """Build what these specs need and is missing: parts of the built-in default, real-knowledge benchmarks."""
    from simu_core.builtin import ensure_builtin, parts_for_specs
    from simu_core.knowledge import ensure_knowledge

    parts = parts_for_specs(*specs)
    if parts:
        ensure_builtin(progress=stderr_progress, parts=parts)
    for name in sorted(
        {s.split(":", 1)[1].split("/")[0] for s in specs if s and s.startswith("builtin:") and "/" in s}
    ):
        ensure_knowledge(name, stderr_progress)


# --------------------------------------------------------------------------------------------
# build-default
# --------------------------------------------------------------------------------------------


def _build_default_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (default: $SIMU_HOME/builtin)")
    p.add_argument("--seed", type=int, default=None, help="seed for data and training (default 0)")
    p.add_argument("--authors", type=int, default=None, help="number of trained authors (default 200)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    p.add_argument("--config", help="a BuiltinConfig JSON file (instead of --size/--seed/--authors/--epochs)")
    p.add_argument(
        "--parts",
        help="comma-separated parts to build (default: the app's): data,full,retain10,retain05,retain01; "
        "also retain10b,retain10c (the references of the disjoint forget sets forget10b, forget10c; on request)",
    )
    p.add_argument("--force", action="store_true", help="rebuild every part even if an intact build exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for training (default: torch's choice)")
    p.add_argument("--train", action="store_true",
                   help="train every part here, even those the package ships ready-made (the default size)")  # fmt: skip
    p.add_argument("--size", choices=BUILTIN_SIZES, default=None,
                   help="default (200 authors, 1.2M params), small (20 authors, for tests and quick demos) or large "
                   "(1000 authors, ~82M params, for a GPU); default: $SIMU_BUILTIN_SIZE, else default. "
                   "Sizes other than default are cached in $SIMU_HOME/builtin-<size>")  # fmt: skip


def _requested_config(args: argparse.Namespace):
    """The BuiltinConfig the arguments ask for, or None to keep (or start) the folder's own."""
    from simu_core.config import BuiltinConfig, builtin_config

    if args.config:
        with open(args.config, encoding="utf-8") as f:
            return BuiltinConfig.from_json(json.load(f))
    if args.size is None and args.seed is None and args.authors is None and args.epochs is None:
        return None
    config = builtin_config(args.size)
    if args.seed is not None:
        config.seed = args.seed
    if args.authors is not None:
        config.n_authors = args.authors
    if args.epochs is not None:
        config.train.epochs = args.epochs
    return config


@command(
    "build-default", "build the built-in authors benchmark and tiny models (cached, resumable)", _build_default_args
)
def build_default_cmd(args: argparse.Namespace) -> dict:
    from simu_core.builtin import BUILD_ORDER, PARTS, build, missing_parts, read_manifest
    from simu_core.config import builtin_root

    config = _requested_config(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out or str(builtin_root(args.size))
    parts = tuple(p.strip() for p in args.parts.split(",")) if args.parts else BUILD_ORDER
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SimuError(f"unknown part(s) {', '.join(sorted(unknown))}. Choose from: {', '.join(PARTS)}.")
    built = args.force or bool(missing_parts(out, parts, config))
    if built:
        manifest = build(out, config, parts, stderr_progress, force=args.force, use_shipped=not args.train)
    else:
        manifest = read_manifest(out)
        print(f"up to date: {out}", file=sys.stderr)
    return {
        "out": out,
        "built": built,
        "data": f"{out}/data",
        "models": {name: f"{out}/models/{name}" for name in PARTS[1:] if name in manifest["parts"]},
        "exact_match": manifest["exact_match"],
        "seconds": manifest["seconds"],
    }


# --------------------------------------------------------------------------------------------
# attribute / mask (SIMU stage 1)
# --------------------------------------------------------------------------------------------


def _attribute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec (builtin:full, a folder, or a hub id)")
    p.add_argument("--data", required=True, help="data spec (builtin:forget10, a .jsonl/.csv file, hf:NAME...)")
    p.add_argument("--method", default="simu_ig", help="simu_ig (default), grad_x_act, captum_ig, captum_gxa, ...")
    p.add_argument("--steps", type=int, default=5, help="integration steps m (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (default 16)")
    p.add_argument("--positions", default="all", help="scaled positions: all (default), answer or subject")
    p.add_argument("--target", default="answer", help="objective: answer (default), fact (value tokens) or contrastive")
    p.add_argument("--baseline", default="zero", help="path start: zero (default) or counterfactual (matched item)")
    p.add_argument(
        "--per-item", action="store_true", help="also save per-item scores (for mask --aggregate consistency)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--out", required=True, help="output scores file (.safetensors; a .json sidecar is written too)")
    _processes_arg(p)


def _processes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, default=1,
                   help="data-parallel processes, started with `accelerate launch` (default 1; one per GPU, "
                        "or CPU processes with the gloo backend)")  # fmt: skip


def _launched_elsewhere(args: argparse.Namespace) -> bool:
    """With `--processes N > 1` outside a launcher: run this command on N processes; True when done."""
    from simu_core import distributed

    if args.processes <= 1 or distributed.launched_world_size() > 1:
        return False
    code = launch_processes(args.processes, _without_processes(args.argv))
    if code:
        raise SimuError(f"the {args.processes}-process run failed (exit code {code}); its error is above.")
    return True


@command("attribute", "score every MLP neuron on a data set (SIMU stage 1)", _attribute_args)
def attribute_cmd(args: argparse.Namespace) -> dict | None:
    from simu_core import distributed
    from simu_core.attribution import attribute_sharded
    from simu_core.data import load_data
    from simu_core.models import load_model

    if _launched_elsewhere(args):
        return None
    group = distributed.current(args.device)
    if group.is_main:
        ensure_builtin_for(args.model, args.data)
    group.barrier()
    dataset = load_data(args.data)
    loaded = load_model(args.model, device=str(group.device) if group.world > 1 else args.device)
    if group.world > 1 and (args.per_item or args.baseline == "counterfactual"):
        raise SimuError("--per-item and --baseline counterfactual need every item in one process: drop --processes.")
    progress = stderr_progress if group.is_main else (lambda *_: None)
    scores = attribute_sharded(loaded, dataset, group, method=args.method, steps=args.steps,
                               batch_size=args.batch_size, positions=args.positions, progress=progress,
                               target=args.target, baseline=args.baseline, per_item=args.per_item)  # fmt: skip
    if not group.is_main:
        return None
    scores.save(args.out)
    return {
        "out": args.out,
        "method": scores.method,
        "steps": scores.steps,
        "positions": scores.positions,
        "target": scores.target,
        "baseline": scores.baseline,
        "notes": scores.extra.get("notes", []),
        "n_examples": scores.n_examples,
        "seconds": round(scores.seconds, 3),
        "forward_passes": scores.forward_passes,
        "backward_passes": scores.backward_passes,
        "loglik": scores.loglik,
        "layer_sums": [float(s.sum()) for s in scores.layers],
        "layer_max": [float(s.max()) for s in scores.layers],
        "processes": group.world,
    }


def _mask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forget-scores", required=True, help="scores file from `attribute` on the forget set")
    p.add_argument("--retain-scores", default=None, help="scores file on the retain set (for dual neurons)")
    p.add_argument("--rule", default="layer_threshold", help="layer_threshold (default), global_top, layer_top, ...")
    p.add_argument("--value", type=float, required=True, help="threshold t, percent, or count k (per rule)")
    p.add_argument("--dual", default="include", help="dual neurons: include (default) or exclude")
    p.add_argument("--score", default="forget", help="forget (default) or forget_minus_retain")
    p.add_argument("--aggregate", default="sum", help="sum (default), consistency (needs --per-item scores) or ratio")
    p.add_argument("--top-k", type=float, default=1.0, help="consistency: percent of neurons per item (default 1)")
    p.add_argument("--eps", type=float, default=0.1, help="ratio: eps in per-layer rms units (default 0.1)")
    p.add_argument("--random-seed", type=int, default=None, help="write a random mask with the same counts instead")
    p.add_argument("--model", default=None, help="model spec, to check the scores fit it and count parameters")
    p.add_argument("--mlp", default="down", help="trainable MLP part per neuron: down (default) or down_up")
    p.add_argument("--attention", action="store_true", help="count attention projections as trainable too")
    p.add_argument("--out", required=True, help="output mask file (.safetensors; a .json sidecar is written too)")


@command("mask", "select critical neurons from scores (SIMU stage 1)", _mask_args)
def mask_cmd(args: argparse.Namespace) -> dict:
    from simu_core.masks import check_mask_fits, make_mask, random_mask_like, trainable_fraction
    from simu_core.neurons import NeuronScores

    forget = NeuronScores.load(args.forget_scores)
    retain = NeuronScores.load(args.retain_scores) if args.retain_scores else None
    value = int(args.value) if args.rule == "layer_top" and args.value == int(args.value) else args.value
    mask = make_mask(forget, args.rule, value, retain=retain, dual=args.dual, score=args.score,
                     aggregate=args.aggregate, top_k=args.top_k, eps=args.eps)  # fmt: skip
    if args.random_seed is not None:
        mask = random_mask_like(mask, args.random_seed)
    counts = forget.counts()
    if args.model:
        from simu_core.models import load_model

        ensure_builtin_for(args.model)
        model = load_model(args.model, device="cpu").model
        check_mask_fits(mask, model, "score file")
        counts = model
    mask.save(args.out)
    summary = {"out": args.out, **mask.summary()}
    if counts is not None:
        summary["trainable_fraction"] = trainable_fraction(mask, counts, args.mlp, args.attention)
    return summary


def _localise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:full", help="model spec (default builtin:full)")
    p.add_argument("--mask", required=True, help="neuron mask file from `mask`")
    p.add_argument("--forget", default="builtin:forget10", help="forget data spec (default builtin:forget10)")
    p.add_argument("--retain", default="builtin:retain10", help="retain data spec (default builtin:retain10)")
    p.add_argument("--retain-limit", type=int, default=400, help="first retain items used, 0 = all (default 400)")
    p.add_argument("--random", type=int, default=20, help="random masks of the same per-layer sizes (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first random mask (default 0)")
    p.add_argument("--scale", type=float, default=0.0, help="factor on the selected neurons: 0 zeroes (default)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")


@command("localise", "zero a mask's neurons: forget/retain loss rise and z-scores against random masks", _localise_args)
def localise_cmd(args: argparse.Namespace) -> dict:
    from simu_core.data import QADataset, load_data
    from simu_core.localise import localise
    from simu_core.models import load_model
    from simu_core.neurons import NeuronMask

    mask = NeuronMask.load(args.mask)
    ensure_builtin_for(args.model, args.forget, args.retain)
    forget, retain = load_data(args.forget), load_data(args.retain)
    if args.retain_limit:
        retain = QADataset(retain.name, retain.items[: args.retain_limit])
    loaded = load_model(args.model, device=args.device)
    result = localise(loaded, mask, forget, retain, args.random, args.seed, args.scale, progress=stderr_progress)
    for line in result.lines():
        print(line)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return {"out": args.out, "neurons": result.neurons, "rises": result.rises, "z": result.z, "notes": result.notes}


# --------------------------------------------------------------------------------------------
# connect (mode connectivity)
# --------------------------------------------------------------------------------------------


def _connect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, help="endpoint A: a model spec or a run folder")
    p.add_argument("--b", required=True, help="endpoint B: a model spec or a run folder")
    p.add_argument("--curve", choices=("linear", "bezier", "chain"), default="linear", help="path shape")
    p.add_argument("--points", type=int, default=21, help="points along t in [0, 1] (default 21)")
    p.add_argument("--fit-steps", type=int, default=200, help="bend fitting steps for bezier/chain (default 200)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the bend (default 1e-2)")
    p.add_argument("--forget", default="builtin:forget10", help="forget data spec (default builtin:forget10)")
    p.add_argument("--retain", default="builtin:retain10", help="retain data spec (default builtin:retain10)")
    p.add_argument("--retain-sample", type=int, default=200, help="seeded retain subset size, 0 = all (default 200)")
    p.add_argument("--rouge", action="store_true", help="also ROUGE-L recall of greedy answers along the path (slow)")
    p.add_argument("--no-linear", action="store_true", help="for bezier/chain, skip evaluating the linear path too")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
    p.add_argument("--seed", type=int, default=0, help="seed for the retain sample and the fit (default 0)")
    p.add_argument("--out", required=True, help="JSON file for the result (losses along the path, barrier, config)")
    p.add_argument("--html", default=None, help="also write the plotly figure to this HTML file")


@command("connect", "loss along a linear / Bezier / chain path between two models", _connect_args)
def connect_cmd(args: argparse.Namespace) -> dict:
    from simu_core.connectivity import ConnectConfig, FitConfig, check_endpoint, connect
    from simu_core.figures import path_figure

    for spec in (args.a, args.b):
        check_endpoint(spec)  # before any build: a typo fails at once
    ensure_builtin_for(args.a, args.b, args.forget, args.retain)
    config = ConnectConfig(
        a=args.a,
        b=args.b,
        curve=args.curve,
        points=args.points,
        fit=FitConfig(steps=args.fit_steps, lr=args.lr, seed=args.seed),
        forget=args.forget,
        retain=args.retain,
        retain_sample=args.retain_sample,
        rouge=args.rouge,
        compare_linear=not args.no_linear,
        device=args.device,
    )
    result = connect(config, out=args.out, progress=stderr_progress)
    if args.html:
        path_figure(result).write_html(args.html, include_plotlyjs=True)
    summary = {"out": args.out, "curve": result.curve, "points": len(result.ts), "barrier": result.barrier}
    summary["mean_loss"] = result.mean_loss
    if result.linear is not None:
        summary["linear_mean_loss"] = result.linear.mean_loss
        summary["linear_barrier"] = result.linear.barrier
    summary.update(carried_bytes=result.carried_bytes, seconds=result.total_seconds, html=args.html)
    return summary


# --------------------------------------------------------------------------------------------
# evaluate (metrics and the before/after report)
# --------------------------------------------------------------------------------------------

_EVAL_HEADLINE = ("forget_quality", "model_utility", "privleak", "mia_score", "perplexity", "forget/rouge_l")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec; with --run: the 'before' model (default: run's base)")
    p.add_argument("--run", default=None, help="run folder: its model (after) beside its base (before)")
    p.add_argument("--data", default=None, help="forget set spec (default: the run's, else builtin:forget10)")
    p.add_argument("--retain", default=None, help="retain set (default: matching builtin:retainXX; 'none' drops it)")
    p.add_argument("--holdout", default=None, help="holdout set spec (default: builtin:holdout; 'none' drops it)")
    p.add_argument("--world-facts", default=None, help="general facts (default: builtin:world_facts; 'none' drops it)")
    p.add_argument(
        "--real-authors",
        default=None,
        help="TOFU's real-authors set, for model utility's 3 other components (default: none; the built-in has "
        "none), e.g. hf:locuslab/TOFU:real_authors_perturbed:train",
    )
    p.add_argument("--reference", default=None, help="retain reference model (default: builtin:retainXX)")
    p.add_argument("--out", default=None, help="metrics JSON (default RUN/metrics.json); report.html beside it")
    p.add_argument("--max-items", type=int, default=400, help="seeded sample per split, 0 = every item (default 400)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy generation length (default 48)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-split sample (default 0)")
    p.add_argument("--no-before", action="store_true", help="with --run: do not evaluate the base model")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    _processes_arg(p)


@command("evaluate", "metrics (forget quality, utility, MIA, ...) and report.html, before and after", _evaluate_args)
def evaluate_cmd(args: argparse.Namespace) -> dict | None:
    from simu_core import distributed
    from simu_core.evaluation import builtin_companions, default_reference, evaluate_specs
    from simu_core.metrics import EvalConfig
    from simu_core.runs import read_config

    if _launched_elsewhere(args):
        return None
    given = {"retain": args.retain, "holdout": args.holdout, "real_authors": args.real_authors,
             "world_facts": args.world_facts}  # fmt: skip
    companions = {k: (None if v.lower() == "none" else v) for k, v in given.items() if v}
    run_config = read_config(args.run) if args.run else None
    data = args.data or (run_config.forget if run_config else "builtin:forget10")
    specs = {**builtin_companions(data), **companions}
    base = args.model or (run_config.model if run_config else "")
    group = distributed.current(args.device)
    if group.is_main:  # the retain reference too (a disjoint forget set's is built on first use)
        ensure_builtin_for(args.model, args.reference or default_reference(base, data), *specs.values())
    group.barrier()
    config = EvalConfig(max_items=args.max_items or None, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    progress = stderr_progress if group.is_main else (lambda *_: None)
    files = evaluate_specs(args.model, args.run, args.data, args.reference, args.out, config, args.device,
                           companions, before=not args.no_before, progress=progress)  # fmt: skip
    if not group.is_main:
        return None
    summary = {"out": str(files.metrics_path), "html": str(files.html_path), "model": files.after.model,
               "reference": files.after.reference}  # fmt: skip
    summary.update({k: files.after.summary.get(k) for k in _EVAL_HEADLINE})
    if files.before is not None:
        summary["before"] = {"model": files.before.model, **{k: files.before.summary.get(k) for k in _EVAL_HEADLINE}}
    summary.update(skipped=files.after.skipped, notes=files.after.notes, seconds=files.after.seconds["total"],
                   processes=group.world)  # fmt: skip
    return summary


# --------------------------------------------------------------------------------------------
# relearn (the relearning attack)
# --------------------------------------------------------------------------------------------


def _relearn_args(p: argparse.ArgumentParser) -> None:
    from simu_core.relearn import RelearnConfig

    d = RelearnConfig()  # the defaults live in one place
    p.add_argument("--run", default=None, help="run folder: attack its unlearned model (forget set: the run's)")
    p.add_argument("--model", default=None, help="or a model spec (e.g. builtin:retain10: the floor, never knew them)")
    p.add_argument("--forget", default=None, help="forget set spec (default: the run's, else builtin:forget10)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"AdamW steps on the trained half (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"the attack's learning rate (default {d.lr:g})")
    p.add_argument(
        "--share", type=float, default=d.share, help=f"share of the forget items trained on (default {d.share})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the split into halves (default {d.seed})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"greedy answer length (default {d.max_new_tokens})")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")


@command("relearn", "relearning attack: fine-tune a copy on half the forget set, count what returns on the other half",
         _relearn_args)  # fmt: skip
def relearn_cmd(args: argparse.Namespace) -> dict:
    from simu_core import data as qa
    from simu_core.models import load_model
    from simu_core.relearn import RelearnConfig, attack_run, relearning_attack
    from simu_core.runs import load_run, read_config

    if bool(args.run) == bool(args.model):
        raise SimuError("give the model to attack: --run RUN_FOLDER or --model SPEC (one of them).")
    config = RelearnConfig(steps=args.steps, lr=args.lr, share=args.share, seed=args.seed,
                           max_new_tokens=args.max_new_tokens)  # fmt: skip
    if args.run and not args.forget:  # the run's own forget set; the result is kept in the run folder too
        ensure_builtin_for(read_config(args.run).forget)
        return {"run": args.run, **attack_run(args.run, config, args.device, stderr_progress)}
    forget = args.forget or (read_config(args.run).forget if args.run else "builtin:forget10")
    ensure_builtin_for(args.model, forget)
    loaded = load_run(args.run, device=args.device) if args.run else load_model(args.model, device=args.device)
    result = relearning_attack(loaded, loaded.model, qa.load_data(forget), config, stderr_progress)
    return {"model": loaded.spec, "forget": forget, **result}


# --------------------------------------------------------------------------------------------
# unlearn (SIMU stage 2 and baselines)
# --------------------------------------------------------------------------------------------


def _unlearn_args(p: argparse.ArgumentParser) -> None:
    from simu_core.methods import METHODS

    p.add_argument("--model", default="builtin:full", help="model spec (default builtin:full)")
    p.add_argument("--forget", default="builtin:forget10", help="forget data spec (default builtin:forget10)")
    p.add_argument(
        "--retain", default="builtin:retain10", help="retain data spec, or 'none' (default builtin:retain10)"
    )
    p.add_argument("--method", default="simu", choices=list(METHODS), help="unlearning method (default simu)")
    p.add_argument("--mask", default=None, help="neuron mask file from `mask` (simu/random_mask; else computed)")
    for name, kind, text in [("mask-method", str, "attribution method (simu_ig, grad_x_act, ...)"),
                             ("mask-steps", int, "attribution steps m"), ("mask-rule", str, "selection rule"),
                             ("mask-value", float, "rule setting (threshold t, percent, k)"),
                             ("mask-dual", str, "dual neurons: include or exclude"),
                             ("mask-score", str, "forget or forget_minus_retain"),
                             ("mask-target", str, "attribution target: answer, fact or contrastive"),
                             ("mask-baseline", str, "attribution baseline: zero or counterfactual"),
                             ("mask-positions", str, "scaled positions: all, answer or subject"),
                             ("mask-aggregate", str, "sum, consistency or ratio"),
                             ("forget-tokens", str, "forget term on: answer (all answer tokens) or fact (value only)")]:  # fmt: skip
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: the method's preset)")
    for name, kind, text in [("steps", int, "optimiser steps"), ("lr", float, "learning rate"),
                             ("gamma", float, "retain weight"), ("batch-size", int, "forget batch size"),
                             ("retain-batch-size", int, "retain batch size"), ("rho", float, "Sophia's rho"),
                             ("rho-share", float, "calibrate rho so this share of coordinates stays unclipped "
                              "(e.g. 0.3; Sophia's authors aim at 0.1-0.5)"),
                             ("weight-decay", float, "decoupled weight decay"),
                             ("estimator", str, "Sophia curvature: gnb, hutchinson or sqgrad"),
                             ("hessian-interval", int, "curvature refresh interval k"),
                             ("mlp-parts", str, "SIMU's MLP part: down or down_up"),
                             ("stop-forget-em", float, "stop when forget exact match <= this"),
                             ("stop-forget-loss", float, "stop when forget NLL >= this"),
                             ("stop-forget-rouge", float, "stop when forget ROUGE-L recall <= this"),
                             ("seed", int, "seed"), ("max-memory-gb", float, "refuse runs needing more memory")]:  # fmt: skip
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: the method's preset)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="train attention projections in SIMU (default: the preset)")  # fmt: skip
    p.add_argument("--no-early-stop", action="store_true", help="run all steps (ignore the preset's forget target)")
    p.add_argument("--curve-every", type=int, default=None,
                   help="record the trade-off curve: greedy EM and ROUGE-L on forget, retain and (built-in data) "
                        "world facts / neighbour / general every N steps (default 0: off)")  # fmt: skip
    p.add_argument("--curve-items", type=int, default=None, help="items per set at each curve point (default 50)")
    p.add_argument("--shard", action="store_true", default=None,
                   help="with --processes N: shard the working copy over the processes with FSDP, and for the "
                        "methods that train whole tensors (SOUL, FO-GradDiff, GA, NPO) their gradients and "
                        "optimiser state too; SIMU's compact slices stay whole on every process")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--runs-dir", default=None, help="where run folders go (default $SIMU_HOME/runs)")
    _processes_arg(p)


def launch_processes(n: int, argv: list[str]) -> int:
    """Run `python -m simu_core <argv>` on `n` processes with Accelerate's launcher; its exit code.

    CPU-only machines get gloo processes (each uses one thread), GPU machines one process per GPU (NCCL).
    A free local port is picked so that parallel runs do not collide.
    """
    import os
    import socket
    import subprocess

    if n < 1:
        raise SimuError(f"--processes must be >= 1 (got {n}).")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]  # fmt: skip
    if n > 1:
        launcher.append("--multi_gpu")  # torch.distributed.run; simu_core picks gloo itself without a GPU
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([*launcher, "-m", "simu_core", *argv], env=env, check=False).returncode


def _without_processes(argv: list[str]) -> list[str]:
    """`argv` minus its `--processes N` / `--processes=N`."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--processes":
            skip = True
        elif not token.startswith("--processes="):
            out.append(token)
    return out


@command("unlearn", "unlearn a forget set (SIMU, SOUL, GradDiff, GA, NPO, random-mask control)", _unlearn_args)
def unlearn_cmd(args: argparse.Namespace) -> dict | None:
    import signal
    import threading

    from simu_core import distributed
    from simu_core.evaluation import curve_sets
    from simu_core.methods import preset_config
    from simu_core.runs import run_unlearning
    from simu_core.unlearn import validate_config

    if _launched_elsewhere(args):
        return None  # the main process printed the summary
    retain = None if (args.retain or "").lower() == "none" else args.retain
    group = distributed.current(args.device)
    if group.is_main:  # one process builds what is missing, the others wait
        ensure_builtin_for(args.model, args.forget, retain)
    group.barrier()
    mask = {k: getattr(args, f"mask_{k}") for k in ("method", "steps", "rule", "value", "dual", "score", "target",
                                                    "baseline", "positions", "aggregate")}  # fmt: skip
    names = ("forget_tokens", "steps", "lr", "gamma", "batch_size", "retain_batch_size", "rho", "rho_share",
             "weight_decay", "estimator",
             "hessian_interval", "mlp_parts", "stop_forget_em", "stop_forget_loss", "stop_forget_rouge", "seed",
             "max_memory_gb",
             "attention", "device", "shard", "curve_every", "curve_items")  # fmt: skip
    config = preset_config(args.method, model=args.model, forget=args.forget, retain=retain or "",
                           mask={k: v for k, v in mask.items() if v is not None}, mask_file=args.mask,
                           **{k: getattr(args, k) for k in names})  # fmt: skip
    if args.no_early_stop:
        config.stop_forget_em = config.stop_forget_loss = config.stop_forget_rouge = None

    def progress(record) -> None:
        if group.is_main and (record.step % 10 == 0 or record.step == record.steps or record.forget_em is not None):
            em = "" if record.forget_em is None else f", forget EM {record.forget_em:.3f}"
            stderr_progress(f"step {record.step}: forget {record.forget_loss:.3f}, retain {record.retain_loss or 0:.3f}"
                            f"{em}, ETA {record.eta:.0f}s", record.step / record.steps)  # fmt: skip

    validate_config(config)  # bad settings fail before anything loads
    given, check = ({}, None) if group.world > 1 else _checked_inputs(config)  # one process: check first
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # Ctrl-C: stop and save as cancelled
    try:
        extra = curve_sets(config.forget) if config.curve_every else None
        result, run_dir = run_unlearning(config, args.runs_dir, callback=progress, cancel=cancel, curve_sets=extra,
                                         **given)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    if not group.is_main:
        return None  # only the main process reports (and wrote the run folder)
    if check is not None:
        check.save(run_dir)  # the run says whether the model knew its forget set before it started
    if result.status == "failed":
        raise SimuError(f"{result.error} (run saved, marked failed: {run_dir})")
    knowledge = {"knowledge_check": check.verdict} if check is not None else {}
    return {"run_dir": str(run_dir), **result.summary(), **knowledge, "processes": group.world,
            "sharded": bool(config.shard and group.world > 1)}  # fmt: skip


def _checked_inputs(config) -> tuple[dict, object]:
    """The run's base model and data, loaded once, and the knowledge check on them (warned on stderr when
    the model does not know its forget set: there is nothing to unlearn)."""
    from simu_core import data as qa
    from simu_core.knowledge_check import check_knowledge
    from simu_core.models import load_model

    base = load_model(config.model, device=config.device)
    forget = qa.load_data(config.forget)
    retain = qa.load_data(config.retain) if config.retain else None
    check = check_knowledge(base, forget, retain)
    if not check.knows:
        print(f"warning: nothing to unlearn? {check.reason}", file=sys.stderr)
    return {"base": base, "forget": forget, "retain": retain}, check


# --------------------------------------------------------------------------------------------
# plan (memory per device, before a run)
# --------------------------------------------------------------------------------------------


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:full",
                   help="model spec (its config only is read), or shape:smollm2-135m / shape:llama-1b")  # fmt: skip
    p.add_argument("--methods", default="simu,so_graddiff", help="comma-separated methods, side by side")
    p.add_argument("--batch-size", type=int, default=None, help="forget batch rows (default: the preset's)")
    p.add_argument("--retain-batch-size", type=int, default=None, help="retain batch rows (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row, question + answer (default 64)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="the loaded base model's dtype (default: bfloat16 on CUDA, else float32)")  # fmt: skip
    p.add_argument("--neurons", type=int, default=None, help="SIMU's selected neurons in all (default: 5%% of them)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--processes", type=int, default=None,
                   help="plan per process for `unlearn --processes N` (data parallel): N processes share each "
                        "batch, each holds the whole model (default: --shards)")  # fmt: skip
    p.add_argument("--shards", type=int, default=1,
                   help="plan per process for `unlearn --processes N --shard`: N processes share each batch and "
                        "the working copy; the whole-tensor methods (SOUL, FO-GradDiff, GA, NPO) also their "
                        "gradients and optimiser state (default 1)")  # fmt: skip


@command("plan", "estimated memory per device of an unlearning run (SIMU vs SOUL side by side)", _plan_args)
def plan_cmd(args: argparse.Namespace) -> dict:
    from simu_core import memory
    from simu_core.methods import preset_config

    if not args.model.startswith("shape:"):
        ensure_builtin_for(args.model)
    shape = memory.shape_of_spec(args.model)
    device, free = memory.device_memory(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    configs = [preset_config(m.strip(), batch_size=args.batch_size, retain_batch_size=args.retain_batch_size)
               for m in args.methods.split(",") if m.strip()]  # fmt: skip
    plans = memory.compare(shape, configs, args.seq_len, neurons=args.neurons, base_dtype=dtype,
                           device=device.split(" ")[0], available=free, shards=args.shards,
                           processes=args.processes)  # fmt: skip
    print(memory.table(plans))
    summary = {"model": args.model, "params": shape.params, "device": device, "available_bytes": free}
    if not args.json:
        return {**summary, "fits": ", ".join(f"{p.method}: {'yes' if p.fits else 'no'}" for p in plans)}
    return {**summary, "plans": [p.to_dict() for p in plans]}


# --------------------------------------------------------------------------------------------
# finetune-authors (TOFU's regime: the fictitious authors fine-tuned onto a pretrained model)
# --------------------------------------------------------------------------------------------


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="builtin:smollm2", help="pretrained model spec (default builtin:smollm2)")
    p.add_argument("--out", required=True, help="output folder (laid out like the built-in cache: data/, models/)")
    p.add_argument("--parts", default=None, help="comma-separated: full,retain10,retain05,retain01 (default: all)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per part (default 5, as TOFU)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5, as TOFU)")
    p.add_argument("--batch-size", type=int, default=16, help="answers per step (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for batch order (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base's own code (off by default)")


@command("finetune-authors", "fine-tune the built-in fictitious authors onto a pretrained model, with its retain "
         "references (TOFU's regime); resumable", _finetune_args)  # fmt: skip
def finetune_cmd(args: argparse.Namespace) -> dict:
    import torch

    from simu_core.config import TrainConfig
    from simu_core.finetune import FinetuneConfig, finetune_authors, parse_parts

    if args.threads:
        torch.set_num_threads(args.threads)
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=20)
    config = FinetuneConfig(args.base, parse_parts(args.parts), train, seed=args.seed,
                            trust_remote_code=args.trust_remote_code)  # fmt: skip
    manifest = finetune_authors(config, args.out, device=args.device, progress=stderr_progress)
    return {"out": args.out, **{f"{p}/exact_match": e["exact_match"] for p, e in manifest["parts"].items()}}


def _staged_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=("tiny", "mid"), default="tiny",
                   help="tiny: the default built-in's 1.2M-parameter shape (minutes); mid: 6.8M parameters (about "
                        "40 minutes on 2 CPU cores, minutes on a GPU)")  # fmt: skip
    p.add_argument("--train-seed", type=int, default=0,
                   help="seeds initialisation and batch order only (the data stay the same): one base-model replicate")  # fmt: skip
    p.add_argument("--parts", default=None,
                   help="comma-separated fine-tuned parts (default: full,retain10,retain10b,retain10c)")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default $SIMU_HOME/staged-<size>-seed<train-seed>)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


@command("build-staged", "the two-stage built-in (TOFU's regime): pretrain a small Llama on world facts and other "
         "authors, then fine-tune it on the benchmark's authors and each retain split; resumable", _staged_args)  # fmt: skip
def build_staged_cmd(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from simu_core.finetune import parse_parts
    from simu_core.pretrain import build_staged, staged_config, staged_root

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = staged_config(args.size, args.train_seed)
    if args.parts:
        config.parts = parse_parts(args.parts)
    out = args.out or str(staged_root(args.size, args.train_seed))
    manifest = build_staged(config, out, device=args.device, progress=stderr_progress)
    scores = {
        **manifest["base"]["exact_match"],
        **{k: v for e in manifest["parts"].values() for k, v in e["exact_match"].items()},
    }
    return {"out": out, "parameters": manifest["base"]["parameters"], "exact_match": scores,
            "next": f"python -m simu_core bench quality --root {out} --splits forget10b,forget10c --out results/{Path(out).name}"}  # fmt: skip


# --------------------------------------------------------------------------------------------
# bench quality (the method comparison table)
# --------------------------------------------------------------------------------------------


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("quality", "pool"),
                   help="quality: every method at its preset, evaluated (resumable); pool: compute nothing, pool "
                        "the quality tables of --tables (one per base model) into --out/pooled.md")  # fmt: skip
    p.add_argument("--benchmark", choices=("builtin", "smollm2"), default="builtin",
                   help="builtin: the fictitious authors (default); smollm2: the real-knowledge benchmark on SmolLM2")  # fmt: skip
    p.add_argument("--splits", default=None,
                   help="comma-separated forget splits (default: forget01,forget05,forget10; smollm2: forget); "
                        "forget10b,forget10c: authors disjoint from forget10's, where no preset was tuned")  # fmt: skip
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: all six; smollm2: simu, random_mask, simu_paper, "
                        "random_mask_paper, so_graddiff, fo_graddiff)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per cell (default 3)")
    p.add_argument("--first-seed", type=int, default=1, help="first seed (default 1; presets were tuned with 0)")
    p.add_argument("--max-items", type=int, default=200, help="evaluated items per split, 0 = all (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy answer length (default 32; smollm2: 12)")
    p.add_argument("--steps", type=int, default=None, help="override every preset's steps (smoke tests only)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                   help="a setting on top of every method's preset, e.g. steps=200 or mask.positions=subject "
                        "(repeatable; enters each cell's key, so give such a table its own --out)")  # fmt: skip
    p.add_argument("--tuned", default=None, metavar="FILE",
                   help="every method at its pick from one equal tuning grid (bench/tune_equal.py's JSON; a random "
                        "mask at its method's) instead of its preset")  # fmt: skip
    p.add_argument("--stop", choices=("em", "muse"), default="em",
                   help="em: each preset's forget-EM target (default); muse: stop where the forget set's greedy "
                        "ROUGE-L reaches the retain reference's (MUSE's matched forgetting)")  # fmt: skip
    p.add_argument("--relearn", action="store_true",
                   help="also run the relearning attack on every row (what returns on a held-out half of the "
                        "forget set after a few steps on the other)")  # fmt: skip
    p.add_argument("--size", choices=("default", "large"), default=None,
                   help="built-in size (default: $SIMU_BUILTIN_SIZE, else default); large wants a GPU")  # fmt: skip
    p.add_argument("--root", default=None, help="a built-in cache folder to use instead of --size's")
    p.add_argument("--out", default=None, help="results folder (default results/; smollm2: results/smollm2/)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--fresh", action="store_true", help="recompute every cell instead of resuming")
    p.add_argument("--tables", default=None, metavar="DIR,DIR,...",
                   help="pool: quality-table folders of one protocol, each on its own base model")  # fmt: skip
    p.add_argument("--stored-only", action="store_true",
                   help="compute nothing: write the table from the stored cells and list the ones left out")  # fmt: skip


@command(
    "bench",
    "benchmarks: `bench quality` runs the method comparison table (resumable); `bench pool` pools "
    "such tables over base models",
    _bench_args,
)
def bench_cmd(args: argparse.Namespace) -> dict:
    import torch

    from simu_core.benchmark import (
        KNOWLEDGE_METHODS,
        QUALITY_METHODS,
        QualityConfig,
        ensure_size,
        get_benchmark,
        read_tuned,
        run_quality,
        write_pooled,
    )
    from simu_core.knowledge import ensure_knowledge
    from simu_core.metrics import EvalConfig

    if args.what == "pool":
        if not args.tables or not args.out:
            raise SimuError(
                "`bench pool` needs --tables DIR,DIR,... (quality tables, one per base model) and --out DIR."
            )
        return write_pooled([t.strip() for t in args.tables.split(",") if t.strip()], args.out)
    if args.tables:
        raise SimuError("--tables is for `bench pool`; `bench quality` computes one table per --root.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise SimuError(f"--seeds must be >= 1 (got {args.seeds}).")
    overrides = parse_settings(args.settings)  # before anything loads: a typo fails fast
    if args.fresh and args.stored_only:
        raise SimuError("--fresh recomputes every cell and --stored-only computes none: give one of them.")
    builtin = args.benchmark == "builtin"
    methods = args.methods.split(",") if args.methods else list(QUALITY_METHODS if builtin else KNOWLEDGE_METHODS)
    methods = [m.strip() for m in methods if m.strip()]
    tuned = read_tuned(args.tuned, methods) if args.tuned else {}  # before anything loads, like the settings
    splits = args.splits or ("forget01,forget05,forget10" if builtin else "forget")
    if builtin:
        references = [get_benchmark("builtin").reference(s.strip()) or "" for s in splits.split(",")]
        root = args.root or ensure_size(args.size, stderr_progress, references)
    else:
        root = args.root
        ensure_knowledge(args.benchmark, stderr_progress, device=args.device)
    qc = QualityConfig(
        benchmark=args.benchmark,
        splits=[s.strip() for s in splits.split(",") if s.strip()],
        methods=methods,
        seeds=list(range(args.first_seed, args.first_seed + args.seeds)),
        eval=EvalConfig(
            max_items=args.max_items or None,
            max_new_tokens=args.max_new_tokens or get_benchmark(args.benchmark).answer_tokens,
        ),
        overrides={**overrides, "steps": args.steps} if args.steps else overrides,
        root=str(root) if root else None,
        out=args.out or ("results" if builtin else f"results/{args.benchmark}"),
        device=args.device,
        tuned=tuned,
        stop=args.stop,
        relearn=args.relearn,
    )
    result = run_quality(qc, stderr_progress, fresh=args.fresh, stored_only=args.stored_only)
    return {**result.files, "computed": len(result.computed), "skipped": len(result.skipped),
            "left_out": result.left_out, "seconds": round(result.seconds, 1)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simu_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
        p.set_defaults(func=fn)
    return parser


def _close_group(wait: bool = True) -> None:
    """Tear down a multi-process run's group (`distributed.close`); a command that never made one does not
    pay for importing torch here."""
    module = sys.modules.get("simu_core.distributed")
    if module is not None:
        module.close(wait)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        summary = args.func(args)
    except SimuError as err:
        print(f"error: {err}", file=sys.stderr)
        _close_group(wait=False)
        return 2
    _close_group()
    if summary is None:  # reported elsewhere (another process of a multi-process run)
        return 0
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0
