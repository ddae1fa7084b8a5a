"""Mode connectivity: forget/retain loss along a path between two models of the same base.

Curves between endpoints A and B (flat parameter vectors), with a bend C where the curve has one
(Garipov et al. 2018; see references.md section 4):

    linear   theta(t) = (1-t) A + t B
    bezier   theta(t) = (1-t)^2 A + 2t(1-t) C + t^2 B
    chain    theta(t) = (1-2t) A + 2t C            for t <= 1/2
             theta(t) = (2-2t) C + (2t-1) B        for t >  1/2

A `ModelPath` holds ONE working model (a copy of A) and carries only what differs between A and
B: for every parameter tensor with a difference it keeps A's and B's values (and the bend's) on
the smallest selection that covers the difference, chosen by bytes:
    whole    the whole tensor;
    slice    the indices along one axis that hold a difference (a SIMU delta touches a few
             neuron columns of down_proj / rows of gate_proj, so this is the usual choice);
    elements the flat indices of the differing elements (scattered differences).
`path.at(t)` writes theta(t) into just those entries of the working model, in place, and returns
it: no model copy per point. Parameters equal in A and B are never touched or duplicated.

Loss of a split: the mean answer-token negative log-likelihood (nats per answer token) over the
WHOLE split, i.e. the summed NLL of all answer tokens divided by their count (not a mean of
per-batch or per-example means, so it does not depend on batching). The barrier height of a split
is `max_t L(t) - max(L(0), L(1))` on the evaluated grid (>= 0).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from simu_core import data as qa
from simu_core.errors import SimuError
from simu_core.models import LoadedModel

DEFAULT_POINTS = 21
FitProgress = Callable[[int, float], None]  # (step done, 1-based; objective at that step in nats/token)
EvalProgress = Callable[[str, float], None]  # (message, fraction done in [0, 1])


# --------------------------------------------------------------------------------------------
# Curves (registry: a curve is one coefficient function + one line)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """A curve through A, (bend C), B: `coefficients(t)` = (w_A, w_C, w_B) with theta = sum w X."""

    name: str
    coefficients: Callable[[float], tuple[float, float, float]]
    has_bend: bool


def _linear(t: float) -> tuple[float, float, float]:
    return 1.0 - t, 0.0, t


def _bezier(t: float) -> tuple[float, float, float]:
    return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t


def _chain(t: float) -> tuple[float, float, float]:
    if t <= 0.5:
        return 1.0 - 2.0 * t, 2.0 * t, 0.0
    return 0.0, 2.0 - 2.0 * t, 2.0 * t - 1.0


CURVES: dict[str, Curve] = {
    "linear": Curve("linear", _linear, has_bend=False),
    "bezier": Curve("bezier", _bezier, has_bend=True),
    "chain": Curve("chain", _chain, has_bend=True),
}


def get_curve(name: str) -> Curve:
    if name not in CURVES:
        raise SimuError(f"unknown curve '{name}'. Choose one of: {', '.join(CURVES)}.")
    return CURVES[name]


# --------------------------------------------------------------------------------------------
# What is carried for one parameter tensor
# --------------------------------------------------------------------------------------------

INDEX_BYTES = 8  # int64 index per selected row / element


@dataclass
class Selection:
    """Which entries of one parameter tensor are carried.

    mode 'whole': all of it (index None); 'slice': `index` along axis `dim`; 'elements': `index`
    into the flattened (contiguous) tensor.
    """

    mode: str
    dim: int = 0
    index: torch.Tensor | None = None  # int64 [k]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of the selected entries: the whole shape, shape with `dim` of size k, or [k]."""
        if self.mode == "whole":
            return tensor.detach().clone()
        if self.mode == "slice":
            return tensor.detach().index_select(self.dim, self.index)
        return tensor.detach().reshape(-1).index_select(0, self.index)

    def put_(self, param: torch.Tensor, values: torch.Tensor) -> None:
        """Write `values` (the shape `take` returns) into the selected entries of `param`, in place."""
        target = param.data
        if self.mode == "whole":
            target.copy_(values)
        elif self.mode == "slice":
            target.index_copy_(self.dim, self.index, values)
        else:
            target.view(-1).index_copy_(0, self.index, values)

    def describe(self) -> str:
        if self.mode == "whole":
            return "whole"
        if self.mode == "slice":
            return f"{self.index.numel()} indices along axis {self.dim}"
        return f"{self.index.numel()} elements"


def choose_selection(a: torch.Tensor, b: torch.Tensor, bend: bool) -> Selection | None:
    """The cheapest selection (in carried bytes) covering every entry where `a != b`; None if equal.

    Per selected entry the path keeps A's and B's value (the tensor's dtype) and, with a bend,
    a bend value (in `compute_dtype`); plus one int64 per index. Ties go to the simpler mode.
    """
    diff = a != b
    n_diff = int(diff.sum())
    if n_diff == 0:
        return None
    bend_bytes = torch.empty((), dtype=compute_dtype(a.dtype)).element_size() if bend else 0
    per_entry = 2 * a.element_size() + bend_bytes
    options: list[tuple[int, Selection]] = [(a.numel() * per_entry, Selection("whole"))]
    if a.dim() >= 2:
        for dim in range(a.dim()):
            rows = diff.movedim(dim, 0).reshape(a.shape[dim], -1).any(dim=1).nonzero().squeeze(1)
            size = rows.numel() * (a.numel() // a.shape[dim])
            options.append((size * per_entry + rows.numel() * INDEX_BYTES, Selection("slice", dim, rows)))
    if a.is_contiguous():
        flat = diff.reshape(-1).nonzero().squeeze(1)
        options.append((n_diff * (per_entry + INDEX_BYTES), Selection("elements", 0, flat)))
    return min(options, key=lambda option: option[0])[1]  # min keeps the first of equal costs


@dataclass
class Carried:
    """One parameter of the working model that differs between A and B, with its selected values.

    `a`, `b`: the selected entries at A and B (parameter dtype); `bend`: the bend's entries
    (float32, a leaf tensor that `fit_bend` trains), None for curves without a bend.
    """

    name: str
    param: nn.Parameter
    selection: Selection
    a: torch.Tensor
    b: torch.Tensor
    bend: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.a.numel()

    def value(self, w_a: float, w_c: float, w_b: float) -> torch.Tensor:
        """theta = w_a A + w_c C + w_b B on the selection, computed in (at least) float32; terms with
        w = 0 are skipped, so t = 0 and t = 1 give A and B bit for bit."""
        dtype = compute_dtype(self.param.dtype)
        out = None
        for w, x in ((w_a, self.a), (w_c, self.bend), (w_b, self.b)):
            if w == 0.0 or x is None:
                continue
            term = x.to(dtype) * w if w != 1.0 else x.to(dtype)
            out = term if out is None else out + term
        return out.to(self.param.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision parameters, else their own dtype (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _storage_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (a view of a big tensor counts in full)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# The path
# --------------------------------------------------------------------------------------------


class ModelPath:
    """A curve between two models that produces the model at any t in [0, 1] in place.

    Build it with `make_path`. `model` is the one working model (a copy of A unless `copy_a=False`);
    `at(t)` writes theta(t) into the carried entries and returns it. Between calls the working
    model holds the last t set; `at(0.0)` restores A exactly.
    """

    def __init__(self, curve: Curve, model: nn.Module, tokenizer, fmt: qa.PromptFormat, carried: list[Carried]):
        self.curve = curve
        self.model = model
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.carried = carried
        self.t: float | None = None
        self.a_spec = ""
        self.b_spec = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def at(self, t: float) -> nn.Module:
        """Set the working model to theta(t) (t in [0, 1]) and return it (no copy)."""
        if not 0.0 <= t <= 1.0:
            raise SimuError(f"t = {t} is outside [0, 1]; a path is defined only between its endpoints.")
        w = self.curve.coefficients(float(t))
        for c in self.carried:
            c.selection.put_(c.param, c.value(*w))
        self.t = float(t)
        return self.model

    def as_curve(self, name: str) -> ModelPath:
        """The same endpoints, working model and carried values under another curve (e.g. the linear
        path for comparison with a fitted bezier); shares the working model, so use one at a time."""
        curve = get_curve(name)
        if curve.has_bend and not self.curve.has_bend:
            raise SimuError(f"a {self.curve.name} path has no bend, so it cannot act as a {name} path; build one.")
        other = ModelPath(curve, self.model, self.tokenizer, self.fmt, self.carried)
        other.a_spec, other.b_spec = self.a_spec, self.b_spec
        return other

    def loaded(self) -> LoadedModel:
        """The working model as a `LoadedModel` (tokenizer and prompt format of A)."""
        return LoadedModel(self.model, self.tokenizer, self.fmt, f"path:{self.curve.name}", self.a_spec)

    def bends(self) -> list[torch.Tensor]:
        """The bend's trainable tensors (one per carried parameter; empty for a linear path)."""
        return [c.bend for c in self.carried if c.bend is not None]

    def carried_elements(self) -> int:
        """Number of parameter entries the path carries (per endpoint)."""
        return sum(c.numel for c in self.carried)

    def carried_bytes(self) -> int:
        """Memory the path holds besides the working model: A, B and bend values and indices,
        counted by the storages actually held (so a hidden reference to a full tensor would show)."""
        tensors = []
        for c in self.carried:
            tensors += [c.a, c.b, c.bend, c.selection.index]
        return _storage_bytes(tensors)

    def summary(self) -> list[dict]:
        """One row per carried parameter: name, shape, selection, carried entries."""
        return [
            {"name": c.name, "shape": list(c.param.shape), "selection": c.selection.describe(), "entries": c.numel}
            for c in self.carried
        ]


def make_path(a: LoadedModel, b: LoadedModel | nn.Module, curve: str = "linear", copy_a: bool = True) -> ModelPath:
    """The path of `curve` from A to B; carries only the entries that differ (see module docstring).

    `a` is deep-copied into the working model unless `copy_a=False` (then `a.model` itself becomes
    the working model and is changed in place; use it when A was loaded just for this). The path keeps
    no reference to B: free it afterwards. The bend (bezier/chain) starts at the midpoint (A+B)/2,
    where both curves equal the linear path. Raises SimuError if A and B differ in architecture.
    """
    kind = get_curve(curve)
    model_b = b.model if isinstance(b, LoadedModel) else b
    working = copy.deepcopy(a.model) if copy_a else a.model
    working.eval()
    params_a = dict(working.named_parameters())
    params_b = dict(model_b.named_parameters())
    shapes_a = {n: tuple(p.shape) for n, p in params_a.items()}
    shapes_b = {n: tuple(p.shape) for n, p in params_b.items()}
    if shapes_a != shapes_b:
        different = sorted(set(shapes_a.items()) ^ set(shapes_b.items()))[:3]
        raise SimuError(
            f"models A and B have different parameters (e.g. {different}); a path connects two models of "
            "the same architecture, such as the original model and runs unlearned from it."
        )
    carried = []
    with torch.no_grad():
        for name, pa in params_a.items():
            pb = params_b[name].detach().to(device=pa.device, dtype=pa.dtype)
            selection = choose_selection(pa.detach(), pb, kind.has_bend)
            if selection is None:
                continue
            if selection.index is not None:
                selection.index = selection.index.to(pa.device)
            va, vb = selection.take(pa), selection.take(pb)
            bend = None
            if kind.has_bend:
                dtype = compute_dtype(pa.dtype)
                bend = ((va.to(dtype) + vb.to(dtype)) / 2).requires_grad_(True)
            carried.append(Carried(name, pa, selection, va, vb, bend))
    path = ModelPath(kind, working, a.tokenizer, a.fmt, carried)
    path.a_spec = a.spec
    path.b_spec = b.spec if isinstance(b, LoadedModel) else type(model_b).__name__
    return path


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def eval_batches(
    model: LoadedModel | ModelPath, dataset: qa.QADataset, batch_size: int = 64, device: torch.device | None = None
) -> list[dict[str, torch.Tensor]]:
    """`dataset` encoded and collated once (sorted by length, so little padding), on `device`."""
    examples = qa.encode_dataset(model.tokenizer, model.fmt, dataset)
    examples = sorted(examples, key=lambda e: len(e.ids))
    pad = qa.pad_id_of(model.tokenizer)
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = qa.collate(examples[start : start + batch_size], pad)
        batches.append({k: v.to(device) if device is not None else v for k, v in batch.items()})
    return batches


# Model classes whose forward takes a boolean `logits_to_keep` mask (transformers' slice_logits_to_keep).
_LOGITS_MASK_OK: dict[type, bool] = {}


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N]) at the N positions whose next token is an answer token.

    Asks the model for just those positions (`logits_to_keep` mask: no [B, T, V] tensor, which
    matters for large vocabularies); models that cannot do that give all logits, then selected.
    """
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kind = type(model)
    if _LOGITS_MASK_OK.get(kind, True):
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except torch.OutOfMemoryError:
            raise
        except (TypeError, IndexError, RuntimeError, ValueError):  # no such argument, or no mask form
            logits = None
        ok = logits is not None and logits.dim() == 2 and logits.shape[0] == targets.numel()
        _LOGITS_MASK_OK[kind] = ok
        if ok:
            return logits, targets
    return model(**inputs).logits[keep], targets


def answer_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed NLL in nats as a scalar tensor, number of answer tokens) of one `data.collate` batch.

    The NLL is the next-token cross-entropy of the model's logits at the answer positions
    (labels != -100), computed in (at least) float32; differentiable.
    """
    logits, targets = answer_logits(model, batch)
    logits = logits.to(compute_dtype(logits.dtype))
    return F.cross_entropy(logits, targets, reduction="sum"), targets.numel()


@torch.no_grad()
def nll_sum(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(summed NLL in nats, number of answer tokens) over `batches` (see `answer_nll`)."""
    total, count = 0.0, 0
    for batch in batches:
        batch_total, batch_count = answer_nll(model, batch)
        total += float(batch_total)
        count += batch_count
    return total, count


def split_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean answer-token NLL of a whole split (nats per answer token): sum over tokens / count."""
    total, count = nll_sum(model, batches)
    return total / max(count, 1)


def barrier_height(losses: Sequence[float]) -> float:
    """max_t L(t) - max(L(0), L(1)) for losses on a grid whose first/last points are t = 0 and t = 1
    (NaN if any loss is NaN, e.g. a diverged endpoint)."""
    if any(math.isnan(x) for x in losses):
        return math.nan
    return max(losses) - max(losses[0], losses[-1])


def trapezoid_mean(ts: Sequence[float], values: Sequence[float]) -> float:
    """(1 / (t_n - t_0)) * integral of `values` over `ts` by the trapezoid rule (the mean along the path)."""
    if len(ts) < 2:
        return float(values[0]) if values else math.nan
    area = sum((ts[i + 1] - ts[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(ts) - 1))
    return area / (ts[-1] - ts[0])


# --------------------------------------------------------------------------------------------
# Evaluation along the path
# --------------------------------------------------------------------------------------------


@dataclass
class PathResult:
    """Losses (nats per answer token) and optionally ROUGE-L recall at each t of a path.

    `losses[split][i]` is the loss of the whole split at `ts[i]`; `barrier[split]` and
    `mean_loss[split]` (trapezoid mean over t) summarise it. `linear` is the linear path between
    the same endpoints when it was evaluated for comparison; `fit` the bend fit's summary.
    `seconds` is this evaluation's time; `total_seconds` that of a whole `connect` call.
    """

    curve: str
    a: str
    b: str
    ts: list[float]
    losses: dict[str, list[float]]
    n_tokens: dict[str, int]
    barrier: dict[str, float | None]  # None when cancelled before the last point
    mean_loss: dict[str, float | None]
    seconds: float
    carried_bytes: int
    carried_elements: int
    rouge_l: dict[str, list[float]] | None = None
    fit: dict | None = None
    linear: PathResult | None = None
    complete: bool = True
    total_seconds: float | None = None  # `connect`: loading + fit + every evaluation

    def to_dict(self) -> dict:
        out = asdict(self)
        out["linear"] = self.linear.to_dict() if self.linear is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PathResult:
        data = dict(data)
        linear = data.pop("linear", None)
        result = cls(**data)
        result.linear = cls.from_dict(linear) if linear else None
        return result


def _rouge_fn() -> Callable[[str, str], float] | None:
    """`simu_core.metrics.rouge_l_recall(prediction, reference) -> float` when that module has it."""
    try:
        from simu_core import metrics
    except ImportError:
        return None
    return getattr(metrics, "rouge_l_recall", None)


def evaluate_path(
    path: ModelPath,
    splits: Mapping[str, qa.QADataset],
    points: int = DEFAULT_POINTS,
    batch_size: int = 64,
    rouge: bool = False,
    max_new_tokens: int = 48,
    progress: EvalProgress | None = None,
    cancel: threading.Event | None = None,
) -> PathResult:
    """The loss of each split at `points` evenly spaced t in [0, 1] (both ends included).

    With `rouge=True` also the mean ROUGE-L recall of greedy answers against the reference answers
    (one generation per question and point: much slower than the loss). On cancel, returns what was
    evaluated so far with `complete=False`. Leaves the working model at the last t evaluated.
    """
    if points < 2:
        raise SimuError(f"--points {points}: a path needs at least 2 points (t = 0 and t = 1).")
    rouge_fn = _rouge_fn() if rouge else None
    if rouge and rouge_fn is None:
        raise SimuError("ROUGE-L along the path needs simu_core.metrics.rouge_l_recall, which is not available.")
    start = time.perf_counter()
    batches = {name: eval_batches(path, ds, batch_size, path.device) for name, ds in splits.items()}
    ts = [i / (points - 1) for i in range(points)]
    done_ts: list[float] = []
    losses: dict[str, list[float]] = {name: [] for name in splits}
    rouge_l: dict[str, list[float]] | None = {name: [] for name in splits} if rouge else None
    n_tokens: dict[str, int] = {}
    for i, t in enumerate(ts):
        if cancel is not None and cancel.is_set():
            break
        model = path.at(t)
        for name, split_batches in batches.items():
            total, count = nll_sum(model, split_batches)
            losses[name].append(total / max(count, 1))
            n_tokens[name] = count
            if rouge_l is not None:
                from simu_core.models import greedy_answers

                ds = splits[name]
                answers = greedy_answers(model, path.tokenizer, path.fmt, ds.questions(), max_new_tokens, batch_size)
                scores = [rouge_fn(p, r) for p, r in zip(answers, ds.answers(), strict=True)]
                rouge_l[name].append(sum(scores) / len(scores))
        done_ts.append(t)
        if progress is not None:
            progress(f"t = {t:.2f} ({i + 1}/{points})", (i + 1) / points)
    complete = len(done_ts) == points
    return PathResult(
        curve=path.curve.name,
        a=path.a_spec,
        b=path.b_spec,
        ts=done_ts,
        losses=losses,
        n_tokens=n_tokens,
        barrier={k: barrier_height(v) if complete else None for k, v in losses.items()},
        mean_loss={k: trapezoid_mean(done_ts, v) if complete else None for k, v in losses.items()},
        seconds=round(time.perf_counter() - start, 3),
        carried_bytes=path.carried_bytes(),
        carried_elements=path.carried_elements(),
        rouge_l=rouge_l,
        complete=complete,
    )


# --------------------------------------------------------------------------------------------
# Fitting the bend
# --------------------------------------------------------------------------------------------


@dataclass
class FitConfig:
    """How the bend of a bezier/chain path is trained (Adam on the bend entries only).

    Each step draws t ~ U[0, 1] and one batch of each split; the objective is
    (forget_weight * L_forget + retain_weight * L_retain) / (forget_weight + retain_weight),
    L = the batch's mean answer-token NLL. The endpoints stay fixed.
    """

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 32
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    seed: int = 0


@dataclass
class FitHistory:
    """What `fit_bend` did: per step the t drawn and the objective (nats per answer token)."""

    config: dict
    ts: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False

    @property
    def steps(self) -> int:
        return len(self.losses)

    def summary(self) -> dict:
        k = max(1, min(20, self.steps // 5))
        first = sum(self.losses[:k]) / k if self.losses else math.nan
        last = sum(self.losses[-k:]) / k if self.losses else math.nan
        return {
            "config": self.config,
            "steps": self.steps,
            "first_loss": first,
            "last_loss": last,
            "seconds": round(self.seconds, 3),
            "cancelled": self.cancelled,
        }


def _endless_batches(path: ModelPath, dataset: qa.QADataset, batch_size: int, seed: int):
    """Endless passes over `dataset` in training batches, reshuffled each pass (seeded), on the path's device."""
    examples = qa.encode_dataset(path.tokenizer, path.fmt, dataset)
    pad = qa.pad_id_of(path.tokenizer)
    epoch = 0
    while True:
        for batch in qa.iter_batches(examples, batch_size, pad, shuffle=True, seed=seed * 1000 + epoch, bucket=4):
            yield {k: v.to(path.device) for k, v in batch.items()}
        epoch += 1


def fit_bend(
    path: ModelPath,
    forget: qa.QADataset,
    retain: qa.QADataset,
    config: FitConfig | None = None,
    progress: FitProgress | None = None,
    cancel: threading.Event | None = None,
) -> FitHistory:
    """Train the bend of a bezier/chain path to lower E_{t~U[0,1]} of the objective (see FitConfig).

    Only the carried entries get gradients: the working model's differing parameters get
    `requires_grad`, the chain rule d theta / d C = w_C(t) turns their gradient into the bend's.
    Seeded (t draws and batch order); stops early when `cancel` is set. Returns the history; the
    path's working model is left at t = 0 (= A).
    """
    config = config or FitConfig()
    if not path.curve.has_bend:
        raise SimuError(f"the {path.curve.name} path has no bend to fit; use --curve bezier or chain.")
    if not path.carried:
        raise SimuError("models A and B are identical: there is no path to fit. Pick two different endpoints.")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    forget_batches = _endless_batches(path, forget, config.batch_size, config.seed)
    retain_batches = _endless_batches(path, retain, config.batch_size, config.seed + 1)
    weights = (config.forget_weight, config.retain_weight)
    optimizer = torch.optim.Adam(path.bends(), lr=config.lr)
    history = FitHistory(config=asdict(config))
    try:
        with grad_on_carried(path):
            for step in range(config.steps):
                if cancel is not None and cancel.is_set():
                    history.cancelled = True
                    break
                t = float(torch.rand((), generator=gen))
                objective = bend_gradient(path, t, next(forget_batches), next(retain_batches), weights)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.ts.append(t)
                history.losses.append(objective)
                if progress is not None:
                    progress(step + 1, objective)
    finally:
        path.at(0.0)
    history.seconds = time.perf_counter() - start
    return history


@contextlib.contextmanager
def grad_on_carried(path: ModelPath):
    """Within: only the carried parameters of the working model require grad (restored after)."""
    flags = [(p, p.requires_grad) for p in path.model.parameters()]
    carried_ids = {id(c.param) for c in path.carried}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in carried_ids)
        yield
    finally:
        path.model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)


def path_objective(
    model: nn.Module, forget_batch: dict, retain_batch: dict, weights: tuple[float, float] = (1.0, 1.0)
) -> torch.Tensor:
    """The fit objective on one batch of each split (scalar, nats per answer token; see FitConfig)."""
    losses = [
        total / max(count, 1) for total, count in (answer_nll(model, forget_batch), answer_nll(model, retain_batch))
    ]
    return (weights[0] * losses[0] + weights[1] * losses[1]) / (weights[0] + weights[1])


def bend_gradient(
    path: ModelPath, t: float, forget_batch: dict, retain_batch: dict, weights: tuple[float, float] = (1.0, 1.0)
) -> float:
    """Set each bend tensor's `.grad` to d objective(theta(t)) / d C and return the objective.

    theta(t) is linear in C with coefficient w_C(t), so dL/dC = w_C(t) * dL/dtheta on the carried
    entries: one backward through the working model, no graph through the bend. Call it inside
    `grad_on_carried(path)` (as `fit_bend` does) so that the carried parameters get gradients.
    """
    model = path.at(t)
    objective = path_objective(model, forget_batch, retain_batch, weights)
    model.zero_grad(set_to_none=True)
    objective.backward()
    w_c = path.curve.coefficients(t)[1]
    for c in path.carried:
        c.bend.grad = c.selection.take(c.param.grad).to(c.bend.dtype) * w_c
    return float(objective.detach())


# --------------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------------


def is_run_folder(spec: str) -> bool:
    """A run folder (see runs.py) has config.json and delta.safetensors."""
    folder = Path(spec).expanduser()
    return folder.is_dir() and (folder / "config.json").is_file() and (folder / "delta.safetensors").is_file()


def check_endpoint(spec: str) -> None:
    """Fail fast (SimuError with the fix) on an endpoint that cannot load: a missing folder or a
    model folder without weights. Built-in specs and hub ids are checked when loaded."""
    if is_run_folder(spec) or spec.strip().startswith("builtin:"):
        return
    from simu_core.models import resolve_model_source

    resolve_model_source(spec)


def load_endpoint(spec: str, device: str | torch.device | None = None, root: str | Path | None = None) -> LoadedModel:
    """An endpoint: a run folder (base model + its weight delta) or any model spec of `models.load_model`."""
    if is_run_folder(spec):
        try:
            from simu_core.runs import load_run
        except ImportError as err:
            raise SimuError(
                f"'{spec}' is a run folder, but this installation cannot read runs (simu_core.runs: {err}). "
                "Pass a model spec instead, or update SIMU Studio."
            ) from err
        return load_run(spec, device=device)
    from simu_core.models import load_model

    return load_model(spec, device=device, root=root)


def sample_items(dataset: qa.QADataset, n: int, seed: int = 0) -> qa.QADataset:
    """A seeded random subset of `n` items (in their original order); the whole set when n <= 0 or n >= len."""
    if n <= 0 or n >= len(dataset):
        return dataset
    keep = sorted(random.Random(seed).sample(range(len(dataset)), n))
    return qa.QADataset(f"{dataset.name}[{n}]", [dataset.items[i] for i in keep])


# --------------------------------------------------------------------------------------------
# One call for the CLI and the app
# --------------------------------------------------------------------------------------------


@dataclass
class ConnectConfig:
    """Everything `connect` does (saved with its result). Specs: see `load_endpoint` and `data.load_data`."""

    a: str
    b: str
    curve: str = "linear"
    points: int = DEFAULT_POINTS
    fit: FitConfig = field(default_factory=FitConfig)
    forget: str = "builtin:forget10"
    retain: str = "builtin:retain10"
    retain_sample: int = 200  # seeded subset of the retain set (0 = all of it)
    eval_batch_size: int = 64
    rouge: bool = False
    compare_linear: bool = True  # for bezier/chain, also evaluate the linear path
    device: str | None = None


def connect(
    config: ConnectConfig,
    out: str | Path | None = None,
    progress: EvalProgress | None = None,
    cancel: threading.Event | None = None,
    root: str | Path | None = None,
) -> PathResult:
    """Load both endpoints, build the path, fit the bend (bezier/chain), evaluate; write JSON to `out`.

    The JSON holds {"config", "path" (carried parameters), "result"}. `root` is the built-in folder.
    """
    start = time.perf_counter()
    say = progress or (lambda message, fraction: None)
    get_curve(config.curve)
    if config.points < 2:
        raise SimuError(f"points = {config.points}: a path needs at least 2 points (t = 0 and t = 1).")
    if config.fit.steps < 0 or config.fit.lr <= 0:
        raise SimuError("the bend fit needs steps >= 0 and a learning rate > 0 (e.g. --fit-steps 200 --lr 1e-2).")
    say(f"loading A: {config.a}", 0.0)
    a = load_endpoint(config.a, config.device, root)
    say(f"loading B: {config.b}", 0.02)
    b = load_endpoint(config.b, a.device, root)
    path = make_path(a, b, config.curve, copy_a=False)
    del a, b  # the path carries what it needs from B
    forget = qa.load_data(config.forget, root)
    retain = sample_items(qa.load_data(config.retain, root), config.retain_sample, config.fit.seed)
    splits = {"forget": forget, "retain": retain}

    def stage(lo: float, hi: float) -> EvalProgress:
        return lambda message, fraction: say(message, lo + (hi - lo) * fraction)

    evaluate = {"points": config.points, "batch_size": config.eval_batch_size, "rouge": config.rouge, "cancel": cancel}
    linear = None
    fit = None
    if path.curve.has_bend:
        if config.compare_linear:
            linear = evaluate_path(path.as_curve("linear"), splits, progress=stage(0.05, 0.25), **evaluate)
        fit_say = stage(0.25, 0.8)
        steps = config.fit.steps

        def fit_progress(step: int, loss: float) -> None:
            if step == steps or step % max(1, steps // 50) == 0:
                fit_say(f"fitting the bend: step {step}/{steps}, loss {loss:.4f}", step / max(steps, 1))

        fit = fit_bend(path, forget, retain, config.fit, fit_progress, cancel).summary() if steps > 0 else None
    result = evaluate_path(path, splits, progress=stage(0.8 if path.curve.has_bend else 0.05, 1.0), **evaluate)
    result.linear, result.fit = linear, fit
    result.total_seconds = round(time.perf_counter() - start, 3)
    if out is not None:
        document = {"config": asdict(config), "path": path.summary(), "result": result.to_dict()}
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
        tmp.replace(out)
    return result
