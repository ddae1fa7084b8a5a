"""Unlearning (SIMU stage 2 and the baselines): one training loop for every method.

A method names a trainable set, an optimiser and a loss (`methods.METHODS`); its preset fills the
other settings. Before it trains, a run checks its memory plan (`memory.plan`) against the device's
free memory. `unlearn(base, forget, retain, config)` trains a deep copy of `base.model` (the original is
never modified) and returns an `UnlearnResult` with the unlearned model, the per-step history and the
changed parameter slices (what `runs.save_run` writes as the run's delta).

Running it in the background (what the app does): call `unlearn` (or `runs.run_unlearning`) in a
worker thread with `callback=` a plain function that receives a `StepRecord` after every step, and
`cancel=` a `threading.Event`; setting the event stops the run between two steps (status
"cancelled"). The loop never touches any UI.

Guards: a NaN/inf loss stops the run (status "failed"); so does collapse, i.e. the retain loss
(smoothed) rising `collapse_margin` nats above its first value, or greedy answers to retain probe
questions degenerating into one repeated token. Optional early stop once every forget target that
is set is met: greedy exact match (the answer's first sentence, `forget_exact_match`) <=
`stop_forget_em`, greedy ROUGE-L recall <= `stop_forget_rouge`, NLL >= `stop_forget_loss` (whole
forget set, every `eval_every` steps).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import math
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from simu_core import data as qa
from simu_core import distributed, memory
from simu_core import targets as tg
from simu_core.arch import count_parameters
from simu_core.config import MaskConfig, UnlearnConfig
from simu_core.errors import SimuError
from simu_core.losses import (
    NEEDS_REFERENCE,
    PER_SEQUENCE_FORGET,
    LossInputs,
    answer_logits,
    get_loss,
    mean_nll,
)
from simu_core.masks import MLP_PARTS, check_mask_fits, make_mask, random_mask_like
from simu_core.methods import Method, get_method
from simu_core.models import LoadedModel, greedy_answers, pick_device
from simu_core.neurons import NeuronMask
from simu_core.optim import (
    ESTIMATORS,
    AdamW,
    SliceLeaves,
    Sophia,
    TrainableParam,
    gnb_diagonal,
    gnb_diagonal_sharded,
    hutchinson_diagonal,
    squared_gradient,
)

STATUSES = ("ok", "failed", "cancelled")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("sophia", "adamw")


def validate_config(config: UnlearnConfig) -> None:
    """SimuError naming the first bad setting and its fix."""
    get_method(config.method)
    get_loss(config.loss)
    checks = [
        (config.steps >= 1 and int(config.steps) == config.steps, f"steps must be a whole number >= 1 (got {config.steps})."),
        (config.lr > 0, f"learning rate must be > 0 (got {config.lr}). Pass a positive --lr such as 1e-3."),
        (config.batch_size >= 1 and config.retain_batch_size >= 1, "batch sizes must be >= 1."),
        (config.gamma >= 0, f"retain weight gamma must be >= 0 (got {config.gamma})."),
        (config.optimizer in OPTIMIZERS, f"unknown optimizer '{config.optimizer}'. Choose one of: {', '.join(OPTIMIZERS)}."),
        (config.estimator in ESTIMATORS, f"unknown estimator '{config.estimator}'. Choose one of: {', '.join(ESTIMATORS)}."),
        (config.schedule in SCHEDULES, f"unknown schedule '{config.schedule}'. Choose one of: {', '.join(SCHEDULES)}."),
        (config.mlp_parts in MLP_PARTS, f"unknown mlp_parts '{config.mlp_parts}'. Choose one of: {', '.join(MLP_PARTS)}."),
        (config.hessian_interval >= 1, f"hessian_interval must be >= 1 (got {config.hessian_interval})."),
        (config.eval_every >= 1, f"eval_every must be >= 1 (got {config.eval_every})."),
        (config.npo_beta > 0, f"npo_beta must be > 0 (got {config.npo_beta})."),
        (config.rho_share is None or 0 < config.rho_share < 1,
         f"rho_share must be between 0 and 1 (got {config.rho_share}); Sophia's authors aim at 0.1-0.5."),
        (config.rho_share is None or config.optimizer == "sophia",
         f"rho_share calibrates Sophia's rho; optimizer '{config.optimizer}' has none. Drop --rho-share."),
        (config.forget_tokens in tg.FORGET_TOKENS, f"unknown forget_tokens '{config.forget_tokens}'. Choose one of: {', '.join(tg.FORGET_TOKENS)}."),
        (not config.shard or config.estimator != "hutchinson" or config.optimizer != "sophia",
         "--shard cannot run Hutchinson's estimator (FSDP has no double backward). Use --estimator gnb or sqgrad."),
        (config.curve_every >= 0 and config.curve_items >= 1,
         f"curve_every must be >= 0 and curve_items >= 1 (got {config.curve_every}, {config.curve_items})."),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise SimuError(message)


# --------------------------------------------------------------------------------------------
# Records and result
# --------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One step, as the callback and history.jsonl see it. Losses in nats per answer token (batch
    values); `seconds` is this step's wall time, `elapsed`/`eta` in seconds for the whole run.
    `forget_em` / `forget_rouge` / `forget_nll` (whole forget set) are filled on evaluation steps only
    (those the early-stop targets ask for); `curve` on the steps `curve_every` asks for."""

    step: int
    steps: int
    forget_loss: float
    retain_loss: float | None
    objective: float
    lr: float
    grad_norm: float
    seconds: float
    elapsed: float
    eta: float
    hessian_updated: bool = False
    unclipped_fraction: float = 1.0
    forget_em: float | None = None
    forget_rouge: float | None = None
    forget_nll: float | None = None
    curve: dict[str, float] | None = None  # trade-off curve point ("forget/rouge_l", ...) on curve steps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ParamChange:
    """New values of one parameter: the whole tensor (`index is None`) or its slices `index` on `dim`."""

    name: str
    values: torch.Tensor
    dim: int | None = None
    index: torch.Tensor | None = None


@dataclass
class UnlearnResult:
    """What a run produced. `status` is ok / failed / cancelled; `stop_reason` one of steps,
    forget_target, cancelled, nan, collapse; `error` the user-facing reason when not ok."""

    model: LoadedModel
    base: LoadedModel
    config: UnlearnConfig
    status: str
    stop_reason: str
    error: str | None
    history: list[StepRecord]
    mask: NeuronMask | None
    changes: list[ParamChange]
    seconds: float
    state_bytes: int
    trainable_params: int
    total_params: int
    device: str
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        last = self.history[-1] if self.history else None
        evals = [r for r in self.history if r.forget_em is not None]
        rouges = [r for r in self.history if r.forget_rouge is not None]
        return {
            "method": self.config.method,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "error": self.error,
            "steps_done": last.step if last else 0,
            "forget_loss": last.forget_loss if last else None,
            "retain_loss": last.retain_loss if last else None,
            "forget_em": evals[-1].forget_em if evals else None,
            "forget_rouge": rouges[-1].forget_rouge if rouges else None,
            "seconds": round(self.seconds, 3),
            "state_bytes": self.state_bytes,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "mask_neurons": self.mask.total() if self.mask else None,
            "rho": self.config.rho if self.config.optimizer == "sophia" else None,
            "unclipped_mean": (
                sum(r.unclipped_fraction for r in self.history) / len(self.history)
                if self.history and self.config.optimizer == "sophia"
                else None
            ),  # fmt: skip
            "device": self.device,
            "warnings": self.warnings,
        }


Callback = Callable[[StepRecord], None]


# --------------------------------------------------------------------------------------------
# Helpers: batches, schedule, evaluation, guards, memory
# --------------------------------------------------------------------------------------------


def _forever(
    examples: Sequence[qa.Encoded], batch_size: int, pad: int, seed: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (reshuffled every epoch, seeded), moved to `device`."""
    epoch = 0
    while True:
        for batch in qa.iter_batches(examples, batch_size, pad, shuffle=True, seed=seed * 7919 + epoch):
            yield {k: v.to(device) for k, v in batch.items()}
        epoch += 1


def lr_at(config: UnlearnConfig, step: int) -> float:
    """Learning rate of step `step` (1-based): linear warm-up, then constant / linear / cosine decay."""
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "linear":
        return config.lr * (1 - progress)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def dataset_nll(model: nn.Module, examples: Sequence[qa.Encoded], pad: int, batch_size: int = 64) -> float:
    """Mean NLL per answer token over all examples (nats), independent of batching."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in qa.iter_batches(examples, batch_size, pad):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(mean_nll(model, batch)) * n
        count += n
    return total / max(1, count)


@torch.no_grad()
def reproduced(model: nn.Module, examples: Sequence[qa.Encoded], pad: int, batch_size: int = 64) -> list[bool]:
    """Per example: is every answer token (and the closing EOS, when the format appends one) the argmax
    given the true prefix? One teacher-forced pass per batch; True iff greedy decoding reproduces the
    answer token for token (and, with the EOS, then stops)."""
    device = next(model.parameters()).device
    out: list[bool] = []
    for batch in qa.iter_batches(examples, batch_size, pad):  # in order
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, targets = answer_logits(model, batch)
        correct = (logits.argmax(-1) == targets) | (targets == -100)
        out += correct.all(dim=1).tolist()
    return out


def greedy_exact_match(model: nn.Module, examples: Sequence[qa.Encoded], pad: int, batch_size: int = 64) -> float:
    """Share of examples that greedy decoding reproduces exactly (`reproduced`), without a generation loop.

    With EOS-closed answers this is `models.exact_match` of `greedy_answers`, barring a different
    tokenisation of the same text. The early stop uses `forget_exact_match`, which also accepts
    answers that go on after the gold one.
    """
    hits = reproduced(model, examples, pad, batch_size)
    return sum(hits) / max(1, len(hits))


def forget_exact_match(
    loaded: LoadedModel, model: nn.Module, dataset: qa.QADataset, examples: Sequence[qa.Encoded]
) -> float:
    """Share of `dataset`'s questions whose greedy answer gives the gold answer by `answers.gives_answer`
    (its first sentence(s), normalised, equal the gold answer: the metrics' exact match; for items with
    accepted answers, the real-knowledge benchmark's rule: it begins with one of them).

    `examples` are `dataset` encoded with `loaded`'s format. When that format closes answers with EOS, an
    item that greedy decoding reproduces exactly (`reproduced`, one teacher-forced pass) is a match without
    generating; the others are generated (up to 8 tokens past the longest of their answers, stopping at
    EOS, or at a newline for completion-style formats) and matched.
    """
    from simu_core.answers import answer_matches, gives_answer

    refs = dataset.answers()
    pad = qa.pad_id_of(loaded.tokenizer)
    sure = reproduced(model, examples, pad) if loaded.fmt.appends_eos else [False] * len(refs)
    sure = [hit and answer_matches(ref, ref) for hit, ref in zip(sure, refs, strict=True)]
    todo = [i for i, hit in enumerate(sure) if not hit]
    hits = sum(sure)
    if todo:
        longest = max(len(examples[i].ids) - examples[i].n_prompt for i in todo)
        questions = [dataset.items[i]["question"] for i in todo]
        answers = greedy_answers(model, loaded.tokenizer, loaded.fmt, questions, max_new_tokens=longest + 8)
        hits += sum(gives_answer(answer, dataset.items[i]) for answer, i in zip(answers, todo, strict=True))
    return hits / max(1, len(refs))


def is_degenerate(token_ids: Sequence[int], min_length: int = 8, share: float = 0.75) -> bool:
    """True for an output of at least `min_length` tokens where one token makes up `share` or more."""
    if len(token_ids) < min_length:
        return False
    return Counter(token_ids).most_common(1)[0][1] / len(token_ids) >= share


def degenerate_fraction(loaded: LoadedModel, model: nn.Module, questions: Sequence[str]) -> float:
    """Share of greedy answers (24 new tokens) to `questions` that are one repeated token."""
    answers = greedy_answers(model, loaded.tokenizer, loaded.fmt, list(questions), max_new_tokens=24)
    ids = [loaded.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    return sum(is_degenerate(i) for i in ids) / max(1, len(ids))


def _warn_overlap(forget: qa.QADataset, retain: qa.QADataset | None) -> list[str]:
    if retain is None:
        return []
    n = qa.overlap_count(forget, retain)
    if not n:
        return []
    message = (
        f"{n} of {len(forget)} forget items also appear in the retain set; the objective pushes them both "
        "ways. Remove them from the retain set."
    )
    warnings.warn(message, UserWarning, stacklevel=3)
    return [message]


# --------------------------------------------------------------------------------------------
# Mask
# --------------------------------------------------------------------------------------------


def compute_mask(
    loaded: LoadedModel, forget: qa.QADataset, retain: qa.QADataset | None, options: MaskConfig
) -> NeuronMask:
    """Attribute the forget (and, when needed, retain) set and select neurons per `options`."""
    from simu_core.attribution import attribute

    how = {"method": options.method, "steps": options.steps, "target": options.target, "baseline": options.baseline,
           "positions": options.positions, "per_item": options.aggregate == "consistency"}  # fmt: skip
    forget_scores = attribute(loaded, forget, **how)
    retain_scores = None
    if retain is not None and (options.score != "forget" or options.dual == "exclude" or options.aggregate != "sum"):
        retain_scores = attribute(loaded, qa.QADataset(retain.name, retain.items[: options.retain_limit]), **how)
    value = int(options.value) if options.rule == "layer_top" else options.value
    return make_mask(forget_scores, options.rule, value, retain=retain_scores, dual=options.dual, score=options.score,
                     aggregate=options.aggregate, top_k=options.top_k, eps=options.eps)  # fmt: skip


def resolve_mask(
    method: Method, loaded: LoadedModel, forget: qa.QADataset, retain: qa.QADataset | None, config: UnlearnConfig,
    mask: NeuronMask | None,
) -> NeuronMask | None:  # fmt: skip
    """The mask the method trains under: given, loaded from `config.mask_file`, or computed."""
    if method.mask is None:
        return None
    if mask is None and config.mask_file:
        mask = NeuronMask.load(config.mask_file)
    if mask is None:
        mask = compute_mask(loaded, forget, retain, config.mask)
    check_mask_fits(mask, loaded.model)
    if method.mask == "random":
        mask = random_mask_like(mask, config.seed)
    if mask.total() == 0 and not config.attention:
        raise SimuError(
            "the mask selects no neuron and attention is off, so nothing would train. Lower the threshold "
            "(mask value) or turn attention on."
        )
    return mask


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _curvature(
    config: UnlearnConfig, model: nn.Module, params: list[nn.Parameter], batches, generator, autocast,
    sharded: distributed.Group | None = None,
):  # fmt: skip
    """The closure Sophia calls on curvature steps: diagonal estimates shaped like each of `params`.
    `sharded`: the group over which the model is sharded (its GNB estimate spans every process's rows)."""

    def gnb() -> list[torch.Tensor]:
        rows = []
        with autocast():
            for batch in batches():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                rows.append(logits[:, :-1][batch["labels"][:, 1:] != -100])
        logits = torch.cat(rows).float()
        if sharded is None:
            return gnb_diagonal(logits, params, generator)
        counted = 0 if batches.empty else logits.shape[0]  # a process without rows runs a stand-in at weight 0
        positions = int(sharded.reduce_sum([torch.tensor([counted], dtype=torch.float64, device=logits.device)])[0])
        weight = sharded.world * float(counted > 0)  # x world: FSDP averages the gradients (see shard_model)
        return gnb_diagonal_sharded(logits, params, positions, generator, weight=weight,
                                    reduce=lambda grads: _sum_replicated(sharded, grads))  # fmt: skip

    def hutchinson() -> list[torch.Tensor]:
        with autocast():
            parts = [(mean_nll(model, b), int((b["labels"][:, 1:] != -100).sum())) for b in batches()]
        loss = sum(v * n for v, n in parts) / max(1, sum(n for _, n in parts))
        return hutchinson_diagonal(loss, params, generator)

    return {"gnb": gnb, "hutchinson": hutchinson, "sqgrad": lambda: squared_gradient(params)}[config.estimator]


def _changes(trainables: list[TrainableParam], base: nn.Module) -> list[ParamChange]:
    """The trainable slices whose values differ from the base model's (CPU copies)."""
    changes = []
    for tp in trainables:
        new = tp.gather(tp.param.detach())
        old = tp.gather(base.get_parameter(tp.name).detach().to(new.device, new.dtype))
        if not torch.equal(new, old):
            index = None if tp.index is None else tp.index.cpu()
            changes.append(ParamChange(tp.name, new.cpu().clone(), tp.dim, index))
    return changes


class _StepBatches(list):
    """This process's batches of the current step; `empty` when it got no rows (stand-ins at weight 0)."""

    empty: bool = False

    def __call__(self) -> list[dict]:
        return list(self)


@dataclass
class _Session:
    """Everything one run works with (built by `_prepare`)."""

    config: UnlearnConfig
    loaded: LoadedModel  # the working copy, with the base's tokenizer and format
    mask: NeuronMask | None
    trainables: list[TrainableParam]
    leaves: SliceLeaves
    opt: Sophia | AdamW
    device: torch.device
    reference: nn.Module | None
    forget: qa.QADataset
    forget_examples: list[qa.Encoded]
    batches: Iterator[tuple[dict, dict | None]]
    probes: list[str]
    needed_bytes: int
    use_bf16: bool
    group: distributed.Group  # the processes of this run (one without a launcher)
    sharded: bool  # the working copy is sharded over the group with FSDP (`config.shard`, several processes)
    current: _StepBatches = field(default_factory=_StepBatches)  # for the curvature closure

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)


def _make_optimizer(config: UnlearnConfig, trainables: list[TrainableParam]) -> Sophia | AdamW:
    kwargs = {"lr": config.lr, "betas": tuple(config.betas), "weight_decay": config.weight_decay,
              "max_grad_norm": config.max_grad_norm}  # fmt: skip
    if config.optimizer == "adamw":
        return AdamW(trainables, **kwargs)
    interval = 1 if config.estimator == "sqgrad" else config.hessian_interval  # SOUL refreshes every step
    return Sophia(trainables, rho=config.rho, eps=config.eps, update_interval=interval, **kwargs)


def _check_memory(
    base: LoadedModel,
    work: nn.Module,
    config: UnlearnConfig,
    mask: NeuronMask | None,
    length: int,
    device: torch.device,
    group: distributed.Group,
    sharded: bool,
    items: tuple[int, int],
) -> int:
    """The run's planned peak bytes per process (`memory.plan`, on the whole working copy); SimuError
    naming the size when that is more than `device` has free or `config.max_memory_gb`. `items`: the
    forget and retain examples there are (0: no retain set); a batch has at most that many rows."""
    planned = memory.plan(memory.shape_of(work), memory.batch_rows(config, *items), length,
                          neurons=mask.total() if mask is not None else 0, base_dtype=memory.dtype_name(base.model),
                          device=device.type, shards=group.world if sharded else 1, processes=group.world)  # fmt: skip
    memory.check_fits(planned.total, memory.free_bytes(device), device, config.max_memory_gb)
    return planned.total


def measure_unlearn(base, forget, retain, config: UnlearnConfig, mask: NeuronMask | None = None) -> int:
    """Measured peak bytes of `unlearn(base, forget, retain, config, mask)` (to check `memory.plan`): the
    resident base model plus the rise of peak resident memory during the run (`memory.measure_peak`,
    Linux only; a 1-step warm-up run first). Pass `mask` to leave attribution out of the measurement."""
    unlearn(base, forget, retain, dataclasses.replace(config, steps=1), mask=mask)
    _, rise = memory.measure_peak(lambda: unlearn(base, forget, retain, config, mask=mask))
    return memory.base_bytes(base.model) + rise


def _prepare(base, forget, retain, config: UnlearnConfig, mask: NeuronMask | None) -> _Session:
    """Working copy, mask, trainable set, optimiser, batches, memory check."""
    method = get_method(config.method)
    group = distributed.current(config.device)
    device = group.device if group.world > 1 else pick_device(config.device)
    distributed.check_batch_sizes(
        group, config.batch_size, config.retain_batch_size if retain is not None else group.world
    )
    work = copy.deepcopy(base.model).to(device=device, dtype=torch.float32)
    work.eval()
    if config.estimator == "hutchinson" and config.optimizer == "sophia" and hasattr(work, "set_attn_implementation"):
        work.set_attn_implementation("eager")  # SDPA has no double backward on CPU
    for p in work.parameters():
        p.requires_grad_(False)
    loaded = LoadedModel(work, base.tokenizer, base.fmt, base.spec, base.source)
    mask = resolve_mask(method, loaded, forget, retain, config, mask)  # attribution runs on the whole model
    pad = qa.pad_id_of(base.tokenizer)
    forget_ex = qa.encode_dataset(base.tokenizer, base.fmt, forget)
    ascend = (
        forget_ex if config.forget_tokens == "answer" else tg.forget_examples(base.tokenizer, base.fmt, forget, "fact")
    )
    retain_ex = qa.encode_dataset(base.tokenizer, base.fmt, retain) if retain is not None else None
    length = max(len(e.ids) for e in forget_ex + (retain_ex or []))
    sharded = config.shard and group.world > 1
    items = (len(ascend), len(retain_ex) if retain_ex else 0)
    needed = _check_memory(base, work, config, mask, length, device, group, sharded, items)
    if sharded:
        distributed.shard_model(work, group)  # before the trainable set: sharding makes new (frozen) parameters
    trainables = method.trainables(work, config, mask)
    opt = _make_optimizer(config, trainables)
    for tp in trainables:
        tp.param.requires_grad_(True)
    leaves = SliceLeaves(work, trainables)  # masked slices train through compact leaves
    reference = None
    if config.loss in NEEDS_REFERENCE:
        reference = base.model if base.device == device else copy.deepcopy(base.model).to(device).eval()
    forget_it = _forever(ascend, config.batch_size, pad, config.seed, device)
    retain_it = _forever(retain_ex, config.retain_batch_size, pad, config.seed + 1, device) if retain_ex else None
    batches = ((next(forget_it), next(retain_it) if retain_it else None) for _ in itertools.count())
    probes = (retain if retain is not None else forget).questions()[:8]
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return _Session(config, loaded, mask, trainables, leaves, opt, device, reference, forget, forget_ex, batches,
                    probes, needed, use_bf16, group, sharded)  # fmt: skip


class _CollapseGuard:
    """Collapse: the smoothed retain loss rises `margin` nats above its first value, or most greedy
    answers to the retain probes are one repeated token (checked every `probe_every` steps)."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.start: float | None = None
        self.smooth: float | None = None

    def check(self, step: int, retain_loss: float | None) -> str | None:
        config = self.session.config
        if retain_loss is not None:
            self.start = retain_loss if self.start is None else self.start
            self.smooth = retain_loss if self.smooth is None else 0.7 * self.smooth + 0.3 * retain_loss
            if self.smooth > self.start + config.collapse_margin:
                return (
                    f"collapse at step {step}: the retain loss rose from {self.start:.3f} to {self.smooth:.3f} nats "
                    f"(bound: +{config.collapse_margin:g}). Lower the learning rate or raise gamma."
                )
        if config.probe_every and step % config.probe_every == 0:
            share = degenerate_fraction(self.session.loaded, self.session.model, self.session.probes)
            if share >= 0.5:
                return (
                    f"collapse at step {step}: {share:.0%} of the probe answers are one repeated token. "
                    "Lower the learning rate or raise gamma."
                )
        return None


def _train_step(session: _Session, step: int, curvature) -> StepRecord | str:
    """One optimiser step; returns its record, or the error message when the loss is not finite."""
    config, model = session.config, session.model
    forget, retain = map(session.group.shard, next(session.batches))  # this process's rows (all on one)
    shares = [s for s in (forget, retain) if s is not None]
    session.current[:] = [s.batch for s in shares if not s.empty] or [s.batch for s in shares]
    session.current.empty = all(s.empty for s in shares)
    session.opt.lr = lr_at(config, step)
    forget_weight = forget.row_weight if config.loss in PER_SEQUENCE_FORGET else forget.token_weight
    inputs = LossInputs(model, forget.batch, retain.batch if retain else None, session.reference, config.gamma,
                        config.npo_beta, forget_weight, retain.token_weight if retain else 1.0)  # fmt: skip
    with session.autocast():
        out = get_loss(config.loss)(inputs)
    retain_loss = out.retain
    if retain_loss is None and retain is not None:  # monitored even when the loss ignores it
        with torch.no_grad(), session.autocast():
            retain_loss = float(mean_nll(model, retain.batch))
    objective = float(out.total.detach())
    forget_loss, retain_loss, objective = _global_logs(session, forget, retain, out.forget, retain_loss, objective)
    if not all(math.isfinite(v) for v in (objective, forget_loss, retain_loss or 0.0)):
        return (
            f"the loss became NaN/inf at step {step} (objective {objective}, forget {forget_loss}, retain "
            f"{retain_loss}). Lower the learning rate (now {config.lr:g}) or the steps."
        )
    session.opt.zero_grad()
    (out.total * session.group.world if session.sharded else out.total).backward()  # FSDP averages; we sum
    _reduce_gradients(session)
    stats = session.opt.step(curvature if config.optimizer == "sophia" else None)
    return StepRecord(
        step=step, steps=config.steps, forget_loss=forget_loss, retain_loss=retain_loss, objective=objective,
        lr=session.opt.lr, grad_norm=stats.grad_norm, seconds=0.0, elapsed=0.0, eta=0.0,
        hessian_updated=stats.hessian_updated, unclipped_fraction=stats.unclipped_fraction,
    )  # fmt: skip


def _global_logs(session: _Session, forget, retain, forget_loss: float, retain_loss: float | None, objective: float):
    """The step's forget / retain losses and objective over the global batch (this process's on one)."""
    if session.group.world == 1:
        return forget_loss, retain_loss, objective
    values = [forget.token_weight * forget_loss, objective]
    if retain_loss is not None:
        values.append(retain.token_weight * retain_loss)
    parts = session.group.reduce_sum([torch.tensor(values, dtype=torch.float64, device=session.device)])[0].tolist()
    return parts[0], parts[2] if retain_loss is not None else None, parts[1]


def _reduce_gradients(session: _Session) -> None:
    """Sum the trainable gradients over the processes (compact: only the masked slices travel)."""
    if session.group.world == 1:
        return
    targets = [tp.target for tp in session.trainables]
    grads = [t.grad for t in targets]
    totals = _sum_replicated(session.group, grads) if session.sharded else session.group.reduce_sum(grads)
    for target, total in zip(targets, totals, strict=True):
        target.grad = total


def _sum_replicated(group: distributed.Group, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradients of a sharded run, complete: FSDP reduced the sharded ones (DTensors) in the backward;
    the others (compact leaves, whole on every process) are summed here. Each process's loss was
    multiplied by the process count for FSDP's average, so their sum is divided by it."""
    replicated = [None if g is None or distributed.is_sharded(g) else g for g in grads]
    sums = group.reduce_sum(replicated)
    return [g if total is None else total / group.world for g, total in zip(grads, sums, strict=True)]


def forget_rouge(loaded: LoadedModel, model: nn.Module, dataset: qa.QADataset) -> float:
    """Mean ROUGE-L recall of greedy answers (generation capped just past the longest answer)."""
    from simu_core.metrics import rouge_l_recall

    longest = max(len(loaded.tokenizer(loaded.fmt.separator + a)["input_ids"]) for a in dataset.answers())
    answers = greedy_answers(model, loaded.tokenizer, loaded.fmt, dataset.questions(), max_new_tokens=longest + 2)
    return sum(map(rouge_l_recall, answers, dataset.answers())) / len(dataset)


def _target_reached(session: _Session, record: StepRecord) -> bool:
    """Evaluate the forget targets on evaluation steps (filling the record); True once all are met."""
    config = session.config
    targets = (config.stop_forget_em, config.stop_forget_rouge, config.stop_forget_loss)
    if all(t is None for t in targets):
        return False
    if record.step % config.eval_every and record.step != config.steps:
        return False
    met = []
    pad = qa.pad_id_of(session.loaded.tokenizer)
    if config.stop_forget_em is not None:
        record.forget_em = forget_exact_match(session.loaded, session.model, session.forget, session.forget_examples)
        met.append(record.forget_em <= config.stop_forget_em)
    if config.stop_forget_rouge is not None:
        record.forget_rouge = forget_rouge(session.loaded, session.model, session.forget)
        met.append(record.forget_rouge <= config.stop_forget_rouge)
    if config.stop_forget_loss is not None:
        record.forget_nll = dataset_nll(session.model, session.forget_examples, pad)
        met.append(record.forget_nll >= config.stop_forget_loss)
    return all(met)


def unlearn(
    base: LoadedModel,
    forget: qa.QADataset,
    retain: qa.QADataset | None,
    config: UnlearnConfig,
    mask: NeuronMask | None = None,
    callback: Callback | None = None,
    cancel: threading.Event | None = None,
    curve_sets: dict[str, qa.QADataset] | None = None,
) -> UnlearnResult:
    """Unlearn `forget` from a deep copy of `base.model` (see the module docstring).

    `mask` (for simu / random_mask) overrides `config.mask_file` and the attribution settings.
    `curve_sets`: sets scored at curve points besides forget and retain (e.g. world facts).
    Raises SimuError for bad settings or input; a run stopped by a guard or cancelled returns a
    result whose `status` says so.
    """
    validate_config(config)
    if config.loss in ("graddiff", "npo", "kl_retain") and config.gamma > 0 and retain is None:
        raise SimuError(f"loss '{config.loss}' with gamma > 0 needs a retain set. Pass --retain.")
    found = _warn_overlap(forget, retain)
    start = time.perf_counter()
    if config.rho_share is not None:
        mask = resolve_mask(get_method(config.method), base, forget, retain, config, mask)  # once, for both runs
        config = dataclasses.replace(config, rho=calibrate_rho(base, forget, retain, config, mask).rho)
    session = _prepare(base, forget, retain, config, mask)
    curvature = _session_curvature(session)
    guard = _CollapseGuard(session)
    history: list[StepRecord] = []
    status, stop_reason, error = "ok", "steps", None
    try:
        for step in range(1, config.steps + 1):
            if session.group.any(cancel is not None and cancel.is_set()):
                status, stop_reason, error = "cancelled", "cancelled", f"cancelled by the user after {step - 1} steps"
                break
            t0 = time.perf_counter()
            record = _train_step(session, step, curvature)
            if isinstance(record, str):
                status, stop_reason, error = "failed", "nan", record
                break
            reason = guard.check(step, record.retain_loss)
            reached = reason is None and _target_reached(session, record)
            if config.curve_every and (step % config.curve_every == 0 or step == config.steps or reason or reached):
                record.curve = curve_point(session.loaded, session.model, config, forget, retain, curve_sets)
            record.seconds, record.elapsed = time.perf_counter() - t0, time.perf_counter() - start
            record.eta = record.elapsed / step * (config.steps - step)
            history.append(record)
            if callback is not None:
                callback(record)
            if reason is not None:
                status, stop_reason, error = "failed", "collapse", reason
                break
            if reached:
                stop_reason = "forget_target"
                break
    except torch.OutOfMemoryError as err:
        raise SimuError(
            f"out of memory on {session.device.type} during unlearning: this run needs about "
            f"{memory.size_text(session.needed_bytes)}. Lower --batch-size, use method 'simu', or use a machine with more memory."
        ) from err
    finally:
        session.leaves.remove()
    state_bytes = session.opt.state_bytes()  # on this process (its shards, when sharded)
    if session.sharded:
        del curvature  # it holds the sharded copy, which `_unshard` releases
        _unshard(session, base)
    return _result(session, base, status, stop_reason, error, history, time.perf_counter() - start, found, state_bytes)


def _unshard(session: _Session, base: LoadedModel) -> None:
    """Replace the sharded working copy by a plain one with its values, so that the result, its changes
    and the saved run are those of an ordinary model (a collective: every process must call it).

    Only the trained entries differ from the base, so they are written into a float32 copy of the base,
    after the optimiser state and gradients are released. Where they take less room than this process's
    shard (SIMU's slices), every process gathers them and releases the sharded copy first, so the two
    copies are never held together; otherwise (whole tensors) each weight is gathered as it is written.
    """
    session.opt.release()
    stream = ((dataclasses.replace(tp, param=None), tp.gather(distributed.full_tensor(tp.param.detach())))
              for tp in session.trainables)  # fmt: skip
    if sum(tp.numel() for tp in session.trainables) < count_parameters(session.model) // session.group.world:
        stream = list(stream)
        session.trainables, session.loaded = [], None
        gc.collect()  # FSDP's hooks keep the sharded modules in reference cycles
    plain = distributed.plain_copy(base.model, session.device)
    trainables = []
    for tp, value in stream:
        trainables.append(dataclasses.replace(tp, param=plain.get_parameter(tp.name)))
        trainables[-1].write(value)
    session.loaded = LoadedModel(plain, base.tokenizer, base.fmt, base.spec, base.source)
    session.trainables = trainables


def curve_point(
    loaded: LoadedModel, model: nn.Module, config: UnlearnConfig, forget, retain, extra: dict | None = None
) -> dict[str, float]:
    """One trade-off curve point of `model`: `metrics.curve.checkpoint_scores` on the forget, retain
    (if any) and `extra` sets, `config.curve_items` items each."""
    from simu_core.metrics.curve import checkpoint_scores

    sets = {"forget": forget, **({"retain": retain} if retain is not None else {}), **(extra or {})}
    return checkpoint_scores(loaded, model, sets, config.curve_items)


def _session_curvature(session: _Session):
    """The session's curvature closure: over every process's rows (sharded: one backward spans them; data
    parallel: each process's unbiased estimate, averaged; sqgrad reads the already summed gradient)."""
    config, group = session.config, session.group
    targets = [tp.target for tp in session.trainables]
    curvature = _curvature(config, session.model, targets, session.current, _generator(session), session.autocast,
                           group if session.sharded else None)  # fmt: skip
    if group.world > 1 and not session.sharded and config.estimator != "sqgrad":
        curvature = _averaged(group, curvature)
    return curvature


def _averaged(group: distributed.Group, curvature):
    """The curvature closure with its estimates averaged over the processes (each is unbiased, so is the mean)."""
    return lambda: group.reduce_mean(curvature())


def _generator(session: _Session) -> torch.Generator:
    return torch.Generator(device=session.device).manual_seed(session.config.seed)


def _result(
    session: _Session, base: LoadedModel, status, stop_reason, error, history, seconds, found, state_bytes: int
) -> UnlearnResult:
    for p in session.model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return UnlearnResult(
        model=session.loaded,
        base=base,
        config=session.config,
        status=status,
        stop_reason=stop_reason,
        error=error,
        history=history,
        mask=session.mask,
        changes=_changes(session.trainables, base.model) if status != "failed" else [],
        seconds=seconds,
        state_bytes=state_bytes,
        trainable_params=sum(tp.numel() for tp in session.trainables),
        total_params=count_parameters(session.model),
        device=str(session.device),
        warnings=found,
    )


# --------------------------------------------------------------------------------------------
# Sophia's rho, calibrated to a share of unclipped coordinates
# --------------------------------------------------------------------------------------------


@dataclass
class RhoCalibration:
    """`rho` makes `share` of the probe's coordinate updates unclipped; `probe_rho` is the rho the probe
    ran with, `quantiles` the |m|/h ratio at shares 0.1, 0.3, 0.5, 0.9 (what another target would pick)."""

    rho: float
    share: float
    probe_rho: float
    probe_steps: int
    quantiles: dict[str, float]


def rho_for_share(ratios: torch.Tensor, share: float) -> float:
    """The rho at which `share` of the coordinates with these |m|/h ratios are unclipped (|m| < rho h).

    Unclipped iff ratio < rho, so rho is the ratios' `share`-quantile (the next value up, so that the
    share is reached). `ratios`: 1-D, non-negative, inf allowed (h = 0).
    """
    finite = ratios[torch.isfinite(ratios)]
    if finite.numel() == 0:
        raise SimuError("no coordinate has curvature yet: the probe needs at least one curvature refresh.")
    ordered = ratios.sort().values
    k = min(int(math.ceil(share * ordered.numel())), ordered.numel() - 1)
    rho = float(ordered[k])
    return rho if math.isfinite(rho) else float(finite.max()) * (1 + 1e-6)


def calibrate_rho(
    base: LoadedModel,
    forget: qa.QADataset,
    retain: qa.QADataset | None,
    config: UnlearnConfig,
    mask: NeuronMask | None = None,
    probe_steps: int | None = None,
    rounds: int = 2,
) -> RhoCalibration:
    """Sophia's rho for `config.rho_share` unclipped coordinates, from probe runs of the run itself.

    Each round runs the first `probe_steps` steps (default: two curvature intervals) on a fresh copy
    with the current rho and records |m|/h of every trained coordinate after each step; the new rho is
    their `rho_share`-quantile (`rho_for_share`). The ratios depend a little on the trajectory, which
    depends on rho, so a second round starts from the first round's value. Without early stops or
    guards; the base model is not modified. Masked methods need `mask` (else it is computed again).
    """
    share = config.rho_share if config.rho_share is not None else 0.3
    steps = probe_steps or 2 * config.hessian_interval
    probe = dataclasses.replace(config, steps=steps, rho_share=None, stop_forget_em=None, stop_forget_rouge=None,
                                stop_forget_loss=None, probe_every=0)  # fmt: skip
    ratios = torch.empty(0)
    for _ in range(rounds):
        session = _prepare(base, forget, retain, probe, mask)
        curvature = _session_curvature(session)  # as the run's: averaged or spanning the processes
        shards = session.group.world if session.sharded else 1
        seen = []
        try:
            for step in range(1, steps + 1):
                if isinstance(_train_step(session, step, curvature), str):
                    break
                seen.append(session.opt.clip_ratios(sample=200_000 // shards, seed=step,
                                                    replicated=shards == 1 or session.group.is_main))  # fmt: skip
        finally:
            session.leaves.remove()
        if not seen:
            raise SimuError("the loss was not finite in the first step of the rho probe. Lower the learning rate.")
        # Sharded, each process holds its own coordinates (and the main process the masked slices that all hold
        # whole), so every process pools all of them and all get one rho; data-parallel processes hold the same
        # state, so their own samples already agree.
        ratios = torch.cat(session.group.gather_objects([torch.cat(seen)]) if session.sharded else seen)
        probe = dataclasses.replace(probe, rho=rho_for_share(ratios, share))
    quantiles = {f"{q:g}": rho_for_share(ratios, q) for q in (0.1, 0.3, 0.5, 0.9)}
    return RhoCalibration(probe.rho, share, config.rho, steps, quantiles)
