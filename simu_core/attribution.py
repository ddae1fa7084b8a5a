"""Neuron attribution (SIMU stage 1): one score per MLP neuron of every decoder layer.

The objective is the answer log-likelihood `L = sum_i sum_{t in answer_i} log p(y_t | y_<t)`
(prompt and padding excluded), so a positive score means "supports the memorised answer".
Scores are summed over examples and token positions.

A neuron's activation is the input of its layer's MLP output projection (`arch.neuron_layers`:
`down_proj`, `c_proj`, `dense_4h_to_h`, `fc2`...), a tensor `a_l` of shape [B, T, d_ff].
Hooks replace that input; gradients are taken with `torch.autograd.grad` with respect to a zero
"probe" added to the activation (`a + z`, z requires grad), so the model's parameters are never
touched (no `.grad`, no `requires_grad` changes) and total derivatives through later layers are
kept (detaching `a` would cut the path from an earlier layer's neurons through this one).

Which positions are scaled (`positions=`):
- `all` (default): the whole layer at every real (non-padding) position is scaled together, from
  zero to its real value. The per-neuron score is the integrated gradient summed over all
  positions. This is exactly Captum's `IntegratedGradients` over the injected activation tensor
  (zero baseline, `riemann_right`) summed over batch and positions, and by completeness the
  scores of one layer sum to `L(real activations) - L(that layer's activations all zero)` as the
  grid gets finer. Prompt positions count: an answer token is predicted from the activations at
  every earlier position (through attention), and leaving them out would break completeness.
- `answer`: only the positions that predict an answer token (the last prompt token up to the
  token before the last answer token) are scaled; the rest keep their real activations. This is
  closest to the per-sample next-token reading of SIMU/DEPN; it equals Captum IG with baseline
  `a * (1 - answer_positions)`.
- `subject`: only the subject's tokens in the prompt (`targets.subject_positions`), where fact
  lookup happens; Captum IG with baseline `a * (1 - subject_positions)`.

Targets and baselines (`targets`): `target=` picks the objective (`answer` above, `fact`: the value
tokens only, `contrastive`: true minus mean perturbed answers, as signed rows `row_weight`);
`baseline="counterfactual"` starts the path at the activations `b` of a matched input (same
question, another subject) instead of zero: the injected value is `b + s (a - b)` and a score sums
`(a - b) * dL/da`, so completeness becomes `L(real) - L(layer l set to b)`. The `patching` method
computes each neuron's exact patching effect to check IG against (small models only).

Methods (registry `METHODS`, name -> function):
- `simu_ig`: `Att_l[k] = (1/m) sum_j sum_{i,t} beta * dL/da |_{a = (j/m) beta}`, Riemann right
  rule with m steps; layer l is scaled while the other layers run normally (per-layer IG, as in
  the SIMU formula). The m steps of a layer run as one batched forward/backward by replicating
  the examples (copy j scales the layer by j/m); `internal_batch_size` caps the rows per forward.
  Cost: m forward passes per layer, and backward passes that stop at the scaled layer.
- `simu_ig_joint`: the same sum, but step j scales every layer at once ((j/m) * beta_l injected
  into all layers, beta from a clean forward): m passes for all layers instead of m per layer.
  It equals Captum IG over the tuple of all layers' activations; completeness holds for all
  layers together, not per layer. A cheaper approximation of `simu_ig` for deep models.
- `grad_x_act`: `sum_{i,t} a * dL/da` for all layers in one forward/backward (m = 1).
- `captum_ig`: Captum `IntegratedGradients` over the injected activation, one layer at a time.
- `captum_gxa`: Captum `LayerGradientXActivation` on the output projections' inputs.
- `captum_layer_ig`: Captum `LayerIntegratedGradients`; its baseline is the activation produced by
  an all-padding input (not zero activations: not SIMU's path, see design section 12).
- `captum_conductance`: Captum `LayerConductance`, interpolating input embeddings from zero:
  `sum_j dL/da(alpha_j) * (a(alpha_{j+1}) - a(alpha_j))` over alpha = 0, 1/m, ..., 1 (Captum builds
  m + 1 points from the method's alphas; only `riemann_trapezoid` gives ones that start at 0).

Scores come back as `neurons.NeuronScores` (saved and loaded there); `masks` turns them into a
mask and `figures` draws them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from simu_core import data as qa
from simu_core import targets as tg
from simu_core.arch import NeuronLayer, neuron_layers
from simu_core.errors import SimuError
from simu_core.neurons import NeuronScores, param_counts

POSITIONS = ("all", "answer", "subject")
Progress = Callable[[str, float], None]


def _no_progress(message: str, fraction: float) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Batches, the objective, activation hooks
# --------------------------------------------------------------------------------------------


def make_batches(
    examples: Sequence[qa.Encoded | tg.Row], batch_size: int, pad_id: int, padding_side: str = "right"
) -> list[dict[str, torch.Tensor]]:
    """Collated batches (see `data.collate`) plus `position_ids` [B, T] that skip left padding.

    Examples are grouped by length (stable sort) so that little compute goes to padding; scores
    are sums over examples, so the order does not matter. `targets.Row`s (plain `Encoded` become
    rows of weight 1, item = their index) add `item` (long [B]), `subject` (float [B, T], 1 at the
    subject's prompt tokens), `row_weight` (float [B], only when some weight is not 1) and `cf_ids`
    (long [B, T], the counterfactual input, only when every row has one).
    """
    if batch_size < 1:
        raise SimuError(f"batch size {batch_size} must be at least 1.")
    if not examples:
        raise SimuError("the data set is empty; attribution needs at least one question/answer row.")
    rows = [e if isinstance(e, tg.Row) else tg.Row(e, i) for i, e in enumerate(examples)]
    weighted = any(r.weight != 1.0 for r in rows)
    by_length = sorted(rows, key=lambda r: len(r.enc.ids))
    batches = []
    for start in range(0, len(by_length), batch_size):
        chunk = by_length[start : start + batch_size]
        batch = qa.collate([r.enc for r in chunk], pad_id, padding_side)
        batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
        _row_fields(batch, chunk, pad_id, padding_side, weighted)
        batches.append(batch)
    return batches


def _row_fields(batch: dict, chunk: list[tg.Row], pad_id: int, padding_side: str, weighted: bool) -> None:
    width = batch["input_ids"].shape[1]
    batch["item"] = torch.tensor([r.item for r in chunk], dtype=torch.long)
    subject = torch.zeros(len(chunk), width)
    cf = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    for i, r in enumerate(chunk):
        shift = width - len(r.enc.ids) if padding_side == "left" else 0
        subject[i, [shift + p for p in r.subject]] = 1.0
        if r.counterfactual is not None:
            cf[i, shift : shift + len(r.counterfactual)] = torch.tensor(r.counterfactual)
    batch["subject"] = subject
    if weighted:
        batch["row_weight"] = torch.tensor([r.weight for r in chunk], dtype=torch.float32)
    if all(r.counterfactual is not None for r in chunk):
        batch["cf_ids"] = cf


def answer_loglik(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of answer-token log-probabilities per example: float32 [B].

    logits [B, T, V] (position t predicts token t+1); labels [B, T] (-100 = not scored). The
    softmax runs only at scored positions (a [B, T, V] float32 copy is large for big vocabularies).
    """
    targets = labels[:, 1:]
    scored = targets != -100
    rows = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)
    picked = rows.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
    per_example = torch.zeros(labels.shape[0], dtype=picked.dtype, device=picked.device)
    return per_example.index_add(0, torch.nonzero(scored)[:, 0], picked)


def position_mask(batch: dict[str, torch.Tensor], positions: str) -> torch.Tensor:
    """Float [B, T]: 1 at the positions whose activations are scaled (see module docstring)."""
    if positions == "all":
        return batch["attention_mask"].float()
    if positions == "subject":
        if "subject" not in batch or not bool(batch["subject"].sum(1).all()):
            raise SimuError("positions 'subject' need the subject's tokens of every item (see targets.prepare).")
        return batch["subject"].float()
    predicts = torch.zeros_like(batch["labels"], dtype=torch.float32)
    predicts[:, :-1] = (batch["labels"][:, 1:] != -100).float()
    return predicts


def batch_loglik(model: nn.Module, batch: dict[str, torch.Tensor], repeat: int = 1, **kwargs) -> torch.Tensor:
    """Answer log-likelihood [repeat * B] of the batch repeated `repeat` times along dim 0."""
    inputs = {k: batch[k].repeat(repeat, 1) for k in ("input_ids", "attention_mask", "position_ids")}
    inputs.update(kwargs)
    if "inputs_embeds" in kwargs:
        inputs.pop("input_ids")
    logits = model(**inputs, use_cache=False).logits
    loglik = answer_loglik(logits, batch["labels"].repeat(repeat, 1))
    if "row_weight" in batch:  # a target with signed rows (contrastive): the weighted row objective
        loglik = loglik * batch["row_weight"].to(loglik.device).repeat(repeat)
    return loglik


@contextmanager
def injected(
    layers: Sequence[NeuronLayer], fn: Callable[[int, torch.Tensor], torch.Tensor], seq_len: int | None = None
) -> Iterator[None]:
    """Within the block, the input x [N, T, d_ff] of layer l's output projection becomes fn(l, x).

    Families that flatten tokens before the MLP (OPT: [N * T, d_ff]) are viewed as [N, T, d_ff]
    for `fn` (this needs `seq_len` = T) and flattened back.
    """
    handles = []
    for layer in layers:

        def hook(module: nn.Module, args: tuple, index: int = layer.index) -> tuple:
            x = args[0]
            if x.dim() == 2:
                if seq_len is None:
                    raise SimuError("this model flattens tokens before its MLP; pass seq_len to injected().")
                return (fn(index, x.view(-1, seq_len, x.shape[-1])).reshape(-1, x.shape[-1]), *args[1:])
            return (fn(index, x), *args[1:])

        handles.append(layer.down.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def activations(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The real activations of every layer on a batch: list of [B, T, d_ff] (detached)."""
    layers = neuron_layers(model)
    seen: dict[int, torch.Tensor] = {}

    def keep(index: int, x: torch.Tensor) -> torch.Tensor:
        seen[index] = x.detach()
        return x

    with torch.no_grad(), injected(layers, keep, batch["input_ids"].shape[1]):
        batch_loglik(model, batch)
    return [seen[layer.index] for layer in layers]


def baseline_activations(model: nn.Module, batch: dict[str, torch.Tensor], baseline: str) -> list[torch.Tensor] | None:
    """The activations the path starts from: None for `zero`, the counterfactual input's for `counterfactual`."""
    if baseline == "zero":
        return None
    if "cf_ids" not in batch:
        raise SimuError("baseline 'counterfactual' needs matched inputs for every row (see targets.prepare).")
    return activations(model, {**batch, "input_ids": batch["cf_ids"]})


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What a method needs: the model, its neuron layers, batches on the model's device, settings."""

    model: nn.Module
    layers: list[NeuronLayer]
    batches: list[dict[str, torch.Tensor]]
    steps: int
    positions: str
    internal_batch_size: int
    pad_id: int
    progress: Progress = _no_progress
    baseline: str = "zero"
    items: list[torch.Tensor] | None = None  # per-item scores float64 [n_items, d_ff] per layer, when asked
    forward_passes: float = 0.0  # in units of "one pass over the data set"
    backward_passes: float = 0.0
    n_examples: int = 0

    def count(self, rows: int, backward: bool = True) -> None:
        self.forward_passes += rows / self.n_examples
        if backward:
            self.backward_passes += rows / self.n_examples

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(layer.d_ff, dtype=torch.float64) for layer in self.layers]

    def add_items(self, index: int, values: torch.Tensor, pmask: torch.Tensor, item: torch.Tensor) -> None:
        """Add values [B, T, d_ff] summed over the positions of pmask [B, T] to the per-item scores of rows `item`."""
        if self.items is None:
            return
        values = values.detach().reshape(*pmask.shape, -1)
        per_row = (values.float() * pmask.to(values.device).unsqueeze(-1)).sum(1).double().cpu()
        self.items[index].index_add_(0, item.cpu(), per_row)


Method = Callable[[Job], list[torch.Tensor]]
METHODS: dict[str, Method] = {}
ONE_STEP = {"grad_x_act", "captum_gxa"}  # methods where `steps` has no meaning (always 1)


def method(name: str) -> Callable[[Method], Method]:
    """Register an attribution method under `name`."""

    def register(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return register


def _neuron_sum(values: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
    """[B, T, d_ff] -> float64 [d_ff], summed over examples and the positions of pmask [B, T]."""
    values = values.detach().reshape(*pmask.shape, -1)  # [B * T, d_ff] for families that flatten tokens
    return (values.float() * pmask.to(values.device).unsqueeze(-1)).sum((0, 1)).double().cpu()


class _Probes:
    """Injection fn that scales layer activations and adds a zero probe requiring grad.

    `scale[l]`: float [N] per-row factor for layer l (layers not in `scale` pass unchanged); the
    factor applies at the positions of `pmask` [N, T] only. Keeps the incoming activation `acts[l]`
    and the probe `probes[l]` (dL/dprobe = dL/da at the injected value).
    """

    def __init__(
        self, scale: dict[int, torch.Tensor], pmask: torch.Tensor, fixed: dict[int, torch.Tensor] | None = None,
        base: dict[int, torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        self.scale, self.pmask, self.fixed, self.base = scale, pmask, fixed, base
        self.acts: dict[int, torch.Tensor] = {}
        self.probes: dict[int, torch.Tensor] = {}

    def __call__(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index not in self.scale:
            return x
        if self.fixed is not None:  # inject a given activation [B, T, d_ff] (tiled) instead of the computed one
            x = _tile(self.fixed[index], x.shape[0])
        self.acts[index] = x.detach()
        self.probes[index] = torch.zeros_like(x, requires_grad=True)
        factor = 1 + (self.scale[index].to(x.device, x.dtype)[:, None] - 1) * self.pmask.to(x.device, x.dtype)
        if self.base is None:
            return x * factor.unsqueeze(-1) + self.probes[index]
        base = _tile(self.base[index], x.shape[0]).to(x.dtype)  # path b + s (a - b) from the baseline b
        return base + (x - base) * factor.unsqueeze(-1) + self.probes[index]

    def delta(self, index: int) -> torch.Tensor:
        """a - b of layer `index` (the activation minus the baseline; b = 0 for the zero baseline)."""
        act = self.acts[index]
        return act if self.base is None else act - _tile(self.base[index], act.shape[0]).to(act.dtype)

    def grads(self, total: torch.Tensor) -> dict[int, torch.Tensor]:
        order = sorted(self.probes)
        return dict(zip(order, torch.autograd.grad(total, [self.probes[i] for i in order]), strict=True))


def _tile(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [B, ...] repeated along dim 0 to `rows` rows (a multiple of B)."""
    return x if x.shape[0] == rows else x.repeat(rows // x.shape[0], *([1] * (x.dim() - 1)))


def _base(job: Job, batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor] | None:
    acts = baseline_activations(job.model, batch, job.baseline)
    if acts is None:
        return None
    job.count(batch["input_ids"].shape[0], backward=False)
    return dict(enumerate(acts))


@method("grad_x_act")
def _grad_x_act(job: Job) -> list[torch.Tensor]:
    scores = job.zeros()
    for b, batch in enumerate(job.batches):
        rows = batch["input_ids"].shape[0]
        pmask = position_mask(batch, job.positions)
        probes = _Probes({layer.index: torch.ones(rows) for layer in job.layers}, pmask, base=_base(job, batch))
        with torch.enable_grad(), injected(job.layers, probes, batch["input_ids"].shape[1]):
            total = batch_loglik(job.model, batch).sum()
        for index, grad in probes.grads(total).items():
            scores[index] += _neuron_sum(probes.delta(index) * grad, pmask)
            job.add_items(index, probes.delta(index) * grad, pmask, batch["item"])
        job.count(rows)
        job.progress(f"batch {b + 1}/{len(job.batches)}", (b + 1) / len(job.batches))
    return scores


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@method("simu_ig")
def _simu_ig(job: Job) -> list[torch.Tensor]:
    scores = job.zeros()
    m = job.steps
    done, todo = 0, len(job.batches) * len(job.layers) * m
    for batch in job.batches:
        rows = batch["input_ids"].shape[0]
        pmask = position_mask(batch, job.positions)
        base = _base(job, batch)
        # One layer per forward: the backward then stops at that layer (autograd only runs the ops
        # between the loss and the requested probes), which saves the backward below it.
        groups = [
            group
            for layer in job.layers
            for group in _chunks([(layer.index, j) for j in range(1, m + 1)], max(1, job.internal_batch_size // rows))
        ]
        for group in groups:
            # copy c of the batch scales layer group[c][0] by j/m; all other layers of that copy run as is
            scale: dict[int, torch.Tensor] = {}
            for c, (index, j) in enumerate(group):
                scale.setdefault(index, torch.ones(len(group) * rows))[c * rows : (c + 1) * rows] = j / m
            probes = _Probes(scale, pmask.repeat(len(group), 1), base=base)
            with torch.enable_grad(), injected(job.layers, probes, batch["input_ids"].shape[1]):
                total = batch_loglik(job.model, batch, repeat=len(group)).sum()
            grads = probes.grads(total)
            for c, (index, _) in enumerate(group):
                rows_c = slice(c * rows, (c + 1) * rows)
                scores[index] += _neuron_sum(probes.delta(index)[rows_c] * grads[index][rows_c], pmask) / m
                job.add_items(index, probes.delta(index)[rows_c] * grads[index][rows_c] / m, pmask, batch["item"])
            job.count(rows * len(group))
            done += len(group)
            job.progress(f"{done}/{todo} scaled copies", done / todo)
    return scores


@method("simu_ig_joint")
def _simu_ig_joint(job: Job) -> list[torch.Tensor]:
    """All layers on one path: step j injects (j/m) * beta_l into every layer l at once (beta from
    a clean forward), so m passes serve all layers; equals Captum IG over the tuple of all
    layers' activations. The scores of all layers together sum to L(real) - L(all zero)."""
    scores = job.zeros()
    m = job.steps
    done, todo = 0, len(job.batches) * m
    for batch in job.batches:
        rows = batch["input_ids"].shape[0]
        pmask = position_mask(batch, job.positions)
        betas = dict(enumerate(activations(job.model, batch)))
        job.count(rows, backward=False)
        base = _base(job, batch)
        for group in _chunks(list(range(1, m + 1)), max(1, job.internal_batch_size // rows)):
            alphas = torch.cat([torch.full((rows,), j / m) for j in group])
            probes = _Probes({layer.index: alphas for layer in job.layers}, pmask.repeat(len(group), 1), betas, base)
            with torch.enable_grad(), injected(job.layers, probes, batch["input_ids"].shape[1]):
                total = batch_loglik(job.model, batch, repeat=len(group)).sum()
            for index, grad in probes.grads(total).items():
                values = probes.delta(index) * grad
                scores[index] += _neuron_sum(values, pmask.repeat(len(group), 1)) / m
                summed = values.reshape(len(group), rows, *values.shape[1:]).sum(0) / m
                job.add_items(index, summed, pmask, batch["item"])
            job.count(rows * len(group))
            done += len(group)
            job.progress(f"{done}/{todo} steps", done / todo)
    return scores


PATCHING_MAX_NEURONS = 50_000  # exact patching costs one forward per neuron: small models only


@method("patching")
def _patching(job: Job) -> list[torch.Tensor]:
    """Exact activation patching: `L(real) - L(neuron k of layer l set to its baseline value at the
    scaled positions, everything else real)`, one forward per neuron (copies of the batch, one neuron
    each). With the counterfactual baseline this is the effect of patching in the matched item's
    activation; IG's per-neuron scores approximate it (they are equal when L is linear in the neuron)."""
    total = sum(layer.d_ff for layer in job.layers)
    if total > PATCHING_MAX_NEURONS:
        raise SimuError(
            f"exact patching needs one forward per neuron ({total} here, limit {PATCHING_MAX_NEURONS}); it is meant "
            "for small models. Use simu_ig (with the same baseline) instead."
        )
    scores = job.zeros()
    done, todo = 0, len(job.batches) * total
    for batch in job.batches:
        rows, width = batch["input_ids"].shape
        pmask = position_mask(batch, job.positions)
        base = _base(job, batch)
        with torch.no_grad():
            clean = batch_loglik(job.model, batch)
        for layer in job.layers:
            for group in _chunks(list(range(layer.d_ff)), max(1, job.internal_batch_size // rows)):
                onehot = torch.zeros(len(group), layer.d_ff)
                onehot[torch.arange(len(group)), torch.tensor(group)] = 1.0
                cut = (onehot[:, None, None, :] * pmask[None, :, :, None].cpu()).reshape(len(group) * rows, width, -1)

                def patch(index: int, x: torch.Tensor, layer: NeuronLayer = layer, cut: torch.Tensor = cut,
                          base: dict | None = base) -> torch.Tensor:  # fmt: skip
                    if index != layer.index:
                        return x
                    b = torch.zeros_like(x) if base is None else _tile(base[index], x.shape[0]).to(x.dtype)
                    return x + (b - x) * cut.to(x.device, x.dtype)

                with torch.no_grad(), injected([layer], patch, width):
                    patched = batch_loglik(job.model, batch, repeat=len(group)).reshape(len(group), rows)
                effect = (clean[None, :] - patched).double().cpu()  # [neurons, rows]
                scores[layer.index][group] += effect.sum(1)
                if job.items is not None:
                    job.items[layer.index][:, group] += torch.zeros(job.items[layer.index].shape[0], len(group),
                        dtype=torch.float64).index_add_(0, batch["item"].cpu(), effect.T)  # fmt: skip
                job.count(rows * len(group), backward=False)
                done += len(group)
                job.progress(f"{done}/{todo} neurons patched", done / todo)
    return scores


# ---- Captum-backed methods ------------------------------------------------------------------


def _replace_input(layer: NeuronLayer, value: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Injection fn: layer's activation becomes `value` (the other layers are left alone)."""
    return lambda index, x: value if index == layer.index else x


def _layer_forward(model: nn.Module, layer: NeuronLayer) -> Callable[..., torch.Tensor]:
    """f(act, ids, attention, positions, labels) -> answer log-likelihood [N] with act injected."""

    def forward(act, input_ids, attention_mask, position_ids, labels):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        with injected([layer], _replace_input(layer, act), input_ids.shape[1]):
            return batch_loglik(model, {**batch, "labels": labels})

    return forward


def _ids_forward(model: nn.Module) -> Callable[..., torch.Tensor]:
    def forward(input_ids, attention_mask, position_ids, labels):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return batch_loglik(model, {**batch, "labels": labels})

    return forward


def _extra(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (batch["attention_mask"], batch["position_ids"], batch["labels"])


def _ig_baseline(act: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
    """Zero at the scaled positions, the real activation elsewhere."""
    return act * (1 - pmask.to(act.dtype)).unsqueeze(-1)


@method("captum_ig")
def _captum_ig(job: Job) -> list[torch.Tensor]:
    from captum.attr import IntegratedGradients

    scores = job.zeros()
    for b, batch in enumerate(job.batches):
        acts = activations(job.model, batch)
        pmask = position_mask(batch, job.positions).to(acts[0].device)
        for layer in job.layers:
            act = acts[layer.index]
            ig = IntegratedGradients(_layer_forward(job.model, layer))
            attr = ig.attribute(
                act,
                baselines=_ig_baseline(act, pmask),
                additional_forward_args=(batch["input_ids"], *_extra(batch)),
                n_steps=job.steps,
                method="riemann_right",
                internal_batch_size=max(act.shape[0], job.internal_batch_size),
            )
            scores[layer.index] += _neuron_sum(attr, pmask)
            job.count(act.shape[0] * job.steps)
        job.count(batch["input_ids"].shape[0], backward=False)
        job.progress(f"batch {b + 1}/{len(job.batches)}", (b + 1) / len(job.batches))
    return scores


@method("captum_gxa")
def _captum_gxa(job: Job) -> list[torch.Tensor]:
    from captum.attr import LayerGradientXActivation

    scores = job.zeros()
    gxa = LayerGradientXActivation(_ids_forward(job.model), [layer.down for layer in job.layers])
    for b, batch in enumerate(job.batches):
        attrs = gxa.attribute(batch["input_ids"], additional_forward_args=_extra(batch), attribute_to_layer_input=True)
        pmask = position_mask(batch, job.positions).to(batch["input_ids"].device)
        for layer, attr in zip(job.layers, attrs, strict=True):
            scores[layer.index] += _neuron_sum(attr[0] if isinstance(attr, tuple) else attr, pmask)
        job.count(batch["input_ids"].shape[0])
        job.progress(f"batch {b + 1}/{len(job.batches)}", (b + 1) / len(job.batches))
    return scores


@method("captum_layer_ig")
def _captum_layer_ig(job: Job) -> list[torch.Tensor]:
    from captum.attr import LayerIntegratedGradients

    scores = job.zeros()
    for b, batch in enumerate(job.batches):
        ids = batch["input_ids"]
        pmask = position_mask(batch, job.positions).to(ids.device)
        for layer in job.layers:
            lig = LayerIntegratedGradients(_ids_forward(job.model), layer.down)
            attr = lig.attribute(
                ids,
                baselines=torch.full_like(ids, job.pad_id),
                additional_forward_args=_extra(batch),
                n_steps=job.steps,
                method="riemann_right",
                internal_batch_size=max(ids.shape[0], job.internal_batch_size),
                attribute_to_layer_input=True,
            )
            scores[layer.index] += _neuron_sum(attr[0] if isinstance(attr, tuple) else attr, pmask)
            job.count(ids.shape[0] * job.steps)
            job.count(ids.shape[0] * 2, backward=False)  # the input and the baseline input
        job.progress(f"batch {b + 1}/{len(job.batches)}", (b + 1) / len(job.batches))
    return scores


@method("captum_conductance")
def _captum_conductance(job: Job) -> list[torch.Tensor]:
    from captum.attr import LayerConductance

    def forward(embeds, attention_mask, position_ids, labels):
        batch = {"input_ids": labels, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}
        return batch_loglik(job.model, batch, inputs_embeds=embeds)

    embed = job.model.get_input_embeddings()
    scores = job.zeros()
    for b, batch in enumerate(job.batches):
        with torch.no_grad():
            embeds = embed(batch["input_ids"])
        pmask = position_mask(batch, job.positions).to(embeds.device)
        for layer in job.layers:
            lc = LayerConductance(forward, layer.down)
            attr = lc.attribute(
                embeds,
                baselines=torch.zeros_like(embeds),
                additional_forward_args=_extra(batch),
                n_steps=job.steps,
                method="riemann_trapezoid",  # its alphas are 0, 1/m, ..., 1: the whole path (see docstring)
                internal_batch_size=max(embeds.shape[0], job.internal_batch_size),
                attribute_to_layer_input=True,
            )
            scores[layer.index] += _neuron_sum(attr[0] if isinstance(attr, tuple) else attr, pmask)
            job.count(embeds.shape[0] * (job.steps + 1))
        job.progress(f"batch {b + 1}/{len(job.batches)}", (b + 1) / len(job.batches))
    return scores


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


ONE_STEP.add("patching")
# Methods that support a baseline other than zero, per-item scores and weighted (contrastive) rows.
OWN_PATH = {"simu_ig", "simu_ig_joint", "grad_x_act", "patching"}


def _check_settings(
    method_name: str, steps: int, positions: str, target: str = "answer", baseline: str = "zero",
    per_item: bool = False,
) -> None:  # fmt: skip
    if method_name not in METHODS:
        raise SimuError(f"unknown attribution method '{method_name}'. Choose one of: {', '.join(sorted(METHODS))}.")
    if not isinstance(steps, int) or steps < 1:
        raise SimuError(f"steps m={steps} must be a whole number >= 1 (SIMU uses m = 3..5).")
    if positions not in POSITIONS:
        raise SimuError(f"unknown positions '{positions}'. Choose one of: {', '.join(POSITIONS)}.")
    tg.check(target, baseline)
    if method_name not in OWN_PATH and (baseline != "zero" or per_item or target == "contrastive"):
        raise SimuError(
            f"method '{method_name}' supports only the zero baseline, summed scores and the answer/fact targets. "
            f"Use one of {', '.join(sorted(OWN_PATH))} for baseline '{baseline}', target '{target}' or per-item scores."
        )


def attribute_examples(
    model: nn.Module,
    examples: Sequence[qa.Encoded | tg.Row],
    pad_id: int,
    method: str = "simu_ig",
    steps: int = 5,
    batch_size: int = 16,
    padding_side: str = "right",
    positions: str = "all",
    internal_batch_size: int = 64,
    progress: Progress = _no_progress,
    data_name: str = "",
    model_name: str = "",
    target: str = "answer",
    baseline: str = "zero",
    per_item: bool = False,
    notes: Sequence[str] = (),
) -> NeuronScores:
    """Scores of every MLP neuron of `model` on tokenised examples (see the module docstring).

    `examples`: `data.Encoded` (the answer target) or `targets.Row`s (any target; `target` only names
    it in the result). `baseline`: `zero` or `counterfactual` (rows need matched ids). `per_item`:
    also keep each item's scores (`NeuronScores.items`, float32 [n_items, d_ff] per layer).
    `internal_batch_size` caps the rows in one forward pass of the multi-step methods (memory
    grows with it). The model runs on its own device, in its own dtype, and is not modified.
    """
    _check_settings(method, steps, positions, target, baseline, per_item)
    if not examples:
        raise SimuError("the data set is empty; attribution needs at least one question/answer row.")
    encs = [e.enc if isinstance(e, tg.Row) else e for e in examples]
    if not any(len(e.ids) > e.n_prompt for e in encs):
        raise SimuError("no example has answer tokens to score. Check the data's answer column.")
    device = next(model.parameters()).device
    batches = [
        {k: v.to(device) for k, v in b.items()} for b in make_batches(examples, batch_size, pad_id, padding_side)
    ]
    steps = 1 if method in ONE_STEP else steps
    job = Job(model, neuron_layers(model), batches, steps, positions, internal_batch_size, pad_id, progress, baseline)
    n_items = 1 + max(e.item if isinstance(e, tg.Row) else i for i, e in enumerate(examples))
    if per_item:
        job.items = [torch.zeros(n_items, layer.d_ff, dtype=torch.float64) for layer in job.layers]
    job.n_examples = len(examples)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        layers = METHODS[method](job)
        with torch.no_grad():
            loglik = sum(float(batch_loglik(model, batch).sum()) for batch in batches)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if any(not torch.isfinite(s).all() for s in layers):
        raise SimuError(f"method '{method}' gave NaN/inf scores. Check the model (fp16 overflow?) or try float32.")
    return NeuronScores(
        layers=[s.float() for s in layers],
        method=method,
        steps=steps,
        data=data_name,
        model=model_name,
        seconds=seconds,
        forward_passes=math.ceil(job.forward_passes - 1e-9),
        backward_passes=math.ceil(job.backward_passes - 1e-9),
        positions=positions,
        n_examples=n_items,
        n_answer_tokens=sum(len(e.ids) - e.n_prompt for e in encs),
        loglik=loglik,
        param_counts=param_counts(model).to_dict(),
        extra={"batch_size": batch_size, "padding_side": padding_side, **({"notes": list(notes)} if notes else {})},
        target=target,
        baseline=baseline,
        items=None if job.items is None else [t.float() for t in job.items],
    )


def attribute(
    loaded,
    dataset: qa.QADataset,
    method: str = "simu_ig",
    steps: int = 5,
    batch_size: int = 16,
    positions: str = "all",
    padding_side: str = "right",
    internal_batch_size: int = 64,
    progress: Progress = _no_progress,
    target: str = "answer",
    baseline: str = "zero",
    per_item: bool = False,
) -> NeuronScores:
    """Scores of every MLP neuron of a `models.LoadedModel` on a `data.QADataset` under a target
    (`targets.TARGETS`) and baseline (`targets.BASELINES`); see `attribute_examples`."""
    _check_settings(method, steps, positions, target, baseline, per_item)
    prepared = tg.prepare(loaded.tokenizer, loaded.fmt, dataset, target, positions == "subject", baseline)
    return attribute_examples(
        loaded.model,
        prepared.rows,
        qa.pad_id_of(loaded.tokenizer),
        method=method,
        steps=steps,
        batch_size=batch_size,
        padding_side=padding_side,
        positions=positions,
        internal_batch_size=internal_batch_size,
        progress=progress,
        data_name=dataset.name,
        model_name=loaded.spec,
        target=target,
        baseline=baseline,
        per_item=per_item,
        notes=prepared.notes,
    )


def attribute_sharded(loaded, dataset: qa.QADataset, group, **kwargs) -> NeuronScores:
    """`attribute` on several processes (`distributed.Group`): each scores its part of the items and the
    scores, sums over items, are summed across processes, so they equal one process's up to the order of
    the float sums. Every process gets the whole result; `kwargs` go to `attribute`."""
    if group.world == 1:
        return attribute(loaded, dataset, **kwargs)
    if len(dataset.items) < group.world:
        raise SimuError(
            f"{len(dataset.items)} items cannot be split over {group.world} processes. Launch at most "
            f"{len(dataset.items)} processes."
        )
    scores = attribute(loaded, qa.QADataset(dataset.name, group.split(dataset.items)), **kwargs)
    layers = group.reduce_sum([s.to(group.device) for s in scores.layers])
    stats = torch.tensor([scores.loglik, scores.n_examples, scores.n_answer_tokens], dtype=torch.float64)
    loglik, n_examples, n_tokens = group.reduce_sum([stats.to(group.device)])[0].tolist()
    scores.layers = [s.cpu() for s in layers]
    scores.loglik, scores.n_examples, scores.n_answer_tokens = loglik, int(n_examples), int(n_tokens)
    scores.extra = {**scores.extra, "processes": group.world}
    return scores


# --------------------------------------------------------------------------------------------
# Token-level view of one example
# --------------------------------------------------------------------------------------------


@dataclass
class TokenAttribution:
    """Attribution of each answer token's log-probability to each prompt token.

    `matrix[a][p]`: answer token a (rows) vs prompt token p (columns); `per_prompt_token`: column sums.
    """

    prompt_tokens: list[str]
    answer_tokens: list[str]
    matrix: list[list[float]]
    per_prompt_token: list[float]


def token_attribution(loaded, question: str, answer: str, steps: int = 32) -> TokenAttribution:
    """Captum `LLMGradientAttribution` + `LayerIntegratedGradients` on the embedding layer.

    One example, unpadded: Captum's wrapper forwards only `input_ids` (no attention mask or
    position ids), which is exact for a single sequence without padding. The prompt is given as
    token ids made exactly like the training data (`data.encode`); the target is the answer ids.
    The baseline replaces every prompt token by the padding token; each row sums to the change in
    that answer token's log-probability (Gauss-Legendre steps; 16 were 3% off on the built-in model,
    64 exact to 1e-4).
    """
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution

    if steps < 1:
        raise SimuError(f"steps {steps} must be at least 1.")
    enc = qa.encode(loaded.tokenizer, loaded.fmt, question, answer, max_length=10_000)
    if len(enc.ids) <= enc.n_prompt:
        raise SimuError("the answer is empty; give an answer to attribute.")
    device = next(loaded.model.parameters()).device
    prompt_ids, answer_ids = enc.ids[: enc.n_prompt], torch.tensor(enc.ids[enc.n_prompt :], device=device)
    inp = _IdsInput(prompt_ids, loaded.tokenizer, qa.pad_id_of(loaded.tokenizer))
    lig = LayerIntegratedGradients(loaded.model, loaded.model.get_input_embeddings())
    llm = LLMGradientAttribution(lig, loaded.tokenizer)
    result = llm.attribute(inp, target=answer_ids, n_steps=steps)
    matrix = result.token_attr.detach().float().cpu()
    return TokenAttribution(
        prompt_tokens=[loaded.tokenizer.decode([i]) for i in prompt_ids],
        answer_tokens=[loaded.tokenizer.decode([int(i)]) for i in answer_ids],
        matrix=matrix.tolist(),
        per_prompt_token=matrix.sum(0).tolist(),
    )


def _ids_input_class():
    from captum.attr import TextTokenInput

    class IdsInput(TextTokenInput):
        """A Captum TextTokenInput built from exact token ids (no re-tokenisation of decoded text)."""

        def __init__(self, ids: list[int], tokenizer, baseline_id: int) -> None:
            self.inp_tensor = torch.tensor([ids])
            self.itp_tensor = self.inp_tensor
            self.itp_mask = None
            self.skip_tokens = None
            self.values = [tokenizer.decode([i]) for i in ids]
            self.tokenizer = tokenizer
            self.n_itp_features = len(ids)
            self.baselines = baseline_id

    return IdsInput


def _IdsInput(ids: list[int], tokenizer, baseline_id: int):  # noqa: N802 (a class made lazily)
    return _ids_input_class()(ids, tokenizer, baseline_id)
