"""Optimisers for unlearning: Sophia (paper form) with neuron masks, and an AdamW with the same interface.

Sophia (Liu et al. 2023, arXiv 2305.14342), per step t = 1, 2, ...:

    m_t = b1 m_{t-1} + (1 - b1) g_t
    h_t = b2 h_{t-k} + (1 - b2) h_hat_t     when (t - 1) mod k == 0, else h_t = h_{t-1}
    theta <- theta - lr * wd * theta        (decoupled weight decay)
    theta <- theta - lr * clip(m_t / max(rho * h_t, eps), -1, 1)

`h_hat` comes from a curvature estimator (`gnb_diagonal`, `hutchinson_diagonal`, or the squared
gradient for `sqgrad`). This is the paper's update, not SOUL's released variant (no double momentum
update, no hidden batch-size constant in the denominator).

Neuron masks ("triple masking"): a `TrainableParam` may train only some slices of a tensor along
one axis (e.g. the columns of `down_proj.weight` that belong to the selected neurons). Momentum,
curvature and the parameter change only there; the optimiser keeps its state as compact tensors of
the selected slices (state memory scales with the mask), and entries outside the mask are never
written, so they stay bit-identical to the original however many steps run.

Whole tensors may be shards of a model sharded with FSDP (`distributed.shard_model`; parameters and
gradients are DTensors): the state is then sharded like its parameter, the element-wise updates run
on each process's shard, and the sums (gradient norm, unclipped count) are taken over all shards.
Masked slices of a sharded weight keep their compact state whole on every process; each process
writes the updated slices into the rows of the weight it holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simu_core.distributed import full_tensor, is_sharded, local, sum_over_shards, write_slices
from simu_core.errors import SimuError

Curvature = Callable[[], list[torch.Tensor]]  # diagonal estimates shaped like each TrainableParam.target


@dataclass
class TrainableParam:
    """One parameter tensor that trains, in full (`index is None`) or only in some slices.

    `index` (long [n], sorted, unique) lists the slices along axis `dim` that train, e.g. the neuron
    columns of a Linear `down_proj.weight` [d, d_ff] (`dim=1`). `decay` says whether decoupled weight
    decay applies (not to norms and biases).

    Gradients come either from the parameter itself (`param.grad`, full shape, gathered here) or,
    when `leaf` is set, from a compact leaf tensor holding just the selected slices (see
    `slice_leaves`): then autograd never builds the full-size weight gradient.
    """

    name: str
    param: nn.Parameter
    dim: int | None = None
    index: torch.Tensor | None = None
    decay: bool = True
    leaf: torch.Tensor | None = None

    @property
    def masked(self) -> bool:
        return self.index is not None

    @property
    def target(self) -> torch.Tensor:
        """The tensor autograd differentiates for this entry: the compact leaf, else the parameter."""
        return self.param if self.leaf is None else self.leaf

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """The trainable entries of a tensor shaped like the parameter (a copy when masked)."""
        return full if self.index is None else full.index_select(self.dim, self.index)

    def compact(self, like_target: torch.Tensor) -> torch.Tensor:
        """The trainable entries of a tensor shaped like `target` (a gradient or curvature estimate)."""
        return like_target if self.leaf is not None else self.gather(like_target)

    def grad(self) -> torch.Tensor | None:
        """The gradient of the trainable entries (compact), or None before any backward."""
        g = self.target.grad
        return None if g is None else self.compact(g)

    def current(self) -> torch.Tensor:
        """The trainable entries' present values (compact; a copy when masked). With a leaf they are read
        from it (`write` keeps the two equal): whole on every process, even for a sharded parameter."""
        if self.leaf is not None:
            return self.leaf.detach().clone()
        return self.gather(self.param.data)

    def compact_shape(self) -> torch.Size:
        if self.index is None:
            return self.param.shape
        shape = list(self.param.shape)
        shape[self.dim] = len(self.index)
        return torch.Size(shape)

    def numel(self) -> int:
        """Number of trainable entries."""
        return math.prod(self.compact_shape())

    @torch.no_grad()
    def write(self, values: torch.Tensor) -> None:
        """Store the new trainable entries (compact) into the parameter; other entries are untouched."""
        if self.index is None:
            if values is not self.param.data:
                self.param.data.copy_(values)
        else:
            write_slices(self.param, self.dim, self.index, values)
            if self.leaf is not None:
                self.leaf.data.copy_(values)


@dataclass
class StepStats:
    """What one optimiser step did: gradient norm (before clipping, over trainable entries only),
    whether the curvature was refreshed, and Sophia's fraction of unclipped coordinates (its
    'win rate'; 1.0 for AdamW)."""

    grad_norm: float
    hessian_updated: bool = False
    unclipped_fraction: float = 1.0


class SliceLeaves:
    """Compact leaves for the masked entries of `params`, wired in with forward hooks.

    For a masked weight W (neuron slices `index` on `dim`) a leaf S = W[slices] (compact copy) is made
    and W itself stops requiring grad. A forward hook adds a zero-valued term to the module's output,
    x[..., index] @ (S - S.detach()) for slices on the input side (output-projection columns) or
    y[..., index] += x @ (S - S.detach()) on the output side (gate/up rows, their bias). Its value is
    exactly 0, so outputs are bit-identical, while dL/dS is the gradient of the selected slices: the
    full-size weight gradient is never built (backward time and gradient memory scale with the mask).
    `TrainableParam.write` keeps W and S in sync. Call `remove()` to detach the hooks and leaves.
    W may be sharded (FSDP): S is then gathered whole once and lives outside FSDP on every process.
    """

    def __init__(self, model: nn.Module, params: Sequence[TrainableParam]) -> None:
        self.params = [tp for tp in params if tp.masked]
        groups: dict[str, list[tuple[TrainableParam, bool, bool]]] = {}
        for tp in self.params:
            module_name, kind = tp.name.rsplit(".", 1)
            conv1d = type(model.get_submodule(module_name)).__name__ == "Conv1D"  # GPT-2: weight [in, out]
            input_side = kind == "weight" and tp.dim == (0 if conv1d else 1)
            tp.leaf = tp.gather(full_tensor(tp.param.detach())).clone().requires_grad_(True)
            tp.param.requires_grad_(False)
            groups.setdefault(module_name, []).append((tp, input_side, conv1d))
        self.handles = [
            model.get_submodule(name).register_forward_hook(self._hook(entries)) for name, entries in groups.items()
        ]

    @staticmethod
    def _hook(entries):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return output
            x, y = args[0], output
            for tp, input_side, conv1d in entries:
                zero = tp.leaf - tp.leaf.detach()
                if tp.name.endswith(".bias"):
                    y = y.index_add(-1, tp.index, zero.to(y.dtype).expand(*y.shape[:-1], -1))
                    continue
                w = (zero if conv1d else zero.t()).to(x.dtype)  # [in_slice, out] or [in, out_slice]
                if input_side:
                    y = y + (x.index_select(-1, tp.index) @ w).to(y.dtype)
                else:
                    y = y.index_add(-1, tp.index, (x @ w).to(y.dtype))
            return y

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for tp in self.params:
            tp.leaf = None
        self.params = []


def trainable_grad_norm(params: Sequence[TrainableParam]) -> float:
    """L2 norm of the gradient over trainable entries only (missing grads count as zero)."""
    squares = 0.0
    for tp in params:
        g = tp.grad()
        if g is not None:
            squares += sum_over_shards(g.float().square())
    return math.sqrt(squares)


@torch.no_grad()
def clip_gradients(params: Sequence[TrainableParam], max_norm: float | None) -> float:
    """Scale the gradients in place so their trainable-entry norm is at most `max_norm`.

    Returns the norm before clipping. `None` or a non-positive `max_norm` only measures.
    """
    norm = trainable_grad_norm(params)
    if max_norm and max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-12)
        for tp in params:
            if tp.target.grad is not None:
                tp.target.grad.mul_(scale)
    return norm


def _check_common(params: Sequence[TrainableParam], lr: float) -> None:
    if not params:
        raise SimuError("nothing to train: the trainable set is empty. Select some neurons or enable attention.")
    if not lr > 0:
        raise SimuError(f"learning rate must be > 0 (got {lr}). Pass a positive --lr such as 1e-3.")


class Sophia:
    """Sophia with optional neuron masks; state is kept only for trainable entries (float32).

    Call `step(curvature)` after `backward()`: `curvature()` is evaluated only on steps where the
    curvature EMA is refreshed (every `update_interval` steps, starting with the first) and returns one
    diagonal estimate per parameter, shaped like its `target`. Gradients are clipped first when `max_grad_norm` is set.
    """

    def __init__(
        self,
        params: Sequence[TrainableParam],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-12,
        update_interval: int = 10,
        max_grad_norm: float | None = None,
    ) -> None:
        _check_common(params, lr)
        if update_interval < 1:
            raise SimuError(f"Hessian update interval must be >= 1 (got {update_interval}).")
        if not rho > 0:
            raise SimuError(f"Sophia's rho must be > 0 (got {rho}); 0.04 is the usual value.")
        self.params = list(params)
        self.lr, self.betas, self.rho = lr, betas, rho
        self.weight_decay, self.eps, self.update_interval = weight_decay, eps, update_interval
        self.max_grad_norm = max_grad_norm
        self.t = 0
        self.m = [_zero_state(tp) for tp in self.params]
        self.h = [_zero_state(tp) for tp in self.params]

    def release(self) -> None:
        """Drop the state, the gradients and the parameters (the run is over; the memory goes back)."""
        self.zero_grad()
        self.params, self.m, self.h = [], [], []

    def hessian_due(self) -> bool:
        """Whether the next `step` refreshes the curvature EMA."""
        return self.t % self.update_interval == 0

    def state_bytes(self) -> int:
        """Bytes of optimiser state on this process (its shards, when the model is sharded)."""
        return sum(local(t).numel() * t.element_size() for t in self.m + self.h)

    @torch.no_grad()
    def clip_ratios(self, sample: int = 1_000_000, seed: int = 0, replicated: bool = True) -> torch.Tensor:
        """|m| / h of every trained coordinate (a seeded sample of `sample` when there are more), 1-D, CPU;
        this process's shards only when the model is sharded. `replicated=False` leaves out the state
        every process holds whole (masked slices), so that pooling processes counts it once.

        A coordinate's update is unclipped iff |m| < rho * h, i.e. iff its ratio < rho (inf where h = 0).
        """
        pairs = [(m, h) for m, h in zip(self.m, self.h, strict=True) if replicated or is_sharded(m)]
        ratios = torch.cat([torch.empty(0), *(local(m.abs() / h).flatten().cpu() for m, h in pairs)])
        if ratios.numel() > sample:
            ratios = ratios[torch.randperm(ratios.numel(), generator=torch.Generator().manual_seed(seed))[:sample]]
        return ratios.nan_to_num(nan=0.0)  # 0 / 0: no gradient and no curvature, never clipped

    def zero_grad(self) -> None:
        for tp in self.params:
            tp.target.grad = None

    @torch.no_grad()
    def step(self, curvature: Curvature | None = None) -> StepStats:
        norm = clip_gradients(self.params, self.max_grad_norm)
        refresh = curvature is not None and self.hessian_due()
        self.t += 1
        b1, b2 = self.betas
        if refresh:
            with torch.enable_grad():
                estimates = curvature()
            for tp, h, est in zip(self.params, self.h, estimates, strict=True):
                h.mul_(b2).add_(tp.compact(est).float(), alpha=1 - b2)
        unclipped = 0
        for tp, m, h in zip(self.params, self.m, self.h, strict=True):
            grad = tp.grad()
            g = torch.zeros_like(m) if grad is None else grad.float()
            m.mul_(b1).add_(g, alpha=1 - b1)
            theta = tp.current().float()
            if tp.decay and self.weight_decay:
                theta.mul_(1 - self.lr * self.weight_decay)
            ratio = m / torch.clamp(self.rho * h, min=self.eps)
            unclipped += int(sum_over_shards(ratio.abs() < 1))
            theta.add_(ratio.clamp_(-1.0, 1.0), alpha=-self.lr)
            tp.write(theta if theta.dtype == tp.param.dtype else theta.to(tp.param.dtype))
        total = sum(tp.numel() for tp in self.params)
        return StepStats(norm, refresh, unclipped / max(1, total))


def _zero_state(tp: TrainableParam) -> torch.Tensor:
    """A float32 zero tensor for one state moment of `tp`: compact for masked slices, else shaped (and,
    for a sharded model, sharded) like the parameter."""
    if tp.masked:
        return torch.zeros(tp.compact_shape(), dtype=torch.float32, device=tp.param.device)
    return torch.zeros_like(tp.param, dtype=torch.float32)


class AdamW:
    """torch's AdamW over whole tensors, with the `Sophia` interface (for the first-order baselines)."""

    def __init__(
        self,
        params: Sequence[TrainableParam],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        eps: float = 1e-8,
        max_grad_norm: float | None = None,
    ) -> None:
        _check_common(params, lr)
        if any(tp.masked for tp in params):
            raise SimuError("AdamW here trains whole tensors only; use Sophia (method 'simu') for neuron masks.")
        self.params = list(params)
        self.max_grad_norm = max_grad_norm
        groups = [
            {"params": [tp.param for tp in self.params if tp.decay], "weight_decay": weight_decay},
            {"params": [tp.param for tp in self.params if not tp.decay], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = value

    def release(self) -> None:
        """Drop the state, the gradients and the parameters (the run is over; the memory goes back)."""
        self.zero_grad()
        self.params = []
        self.opt.state.clear()
        for group in self.opt.param_groups:
            group["params"] = []

    def hessian_due(self) -> bool:
        return False

    def state_bytes(self) -> int:
        """Bytes of optimiser state on this process (its shards, when the model is sharded)."""
        moments = ("exp_avg", "exp_avg_sq")
        return sum(
            local(s[k]).numel() * s[k].element_size() for s in self.opt.state.values() for k in moments if k in s
        )

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, curvature: Curvature | None = None) -> StepStats:
        norm = clip_gradients(self.params, self.max_grad_norm)
        self.opt.step()
        return StepStats(norm)


# --------------------------------------------------------------------------------------------
# Curvature estimators (diagonal)
# --------------------------------------------------------------------------------------------


def gnb_diagonal(
    logits: torch.Tensor, params: Sequence[torch.Tensor], generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Gauss-Newton-Bartlett estimate of the Gauss-Newton diagonal of the mean cross-entropy.

    `logits` [B, V] are the B loss positions (with their graph to `params`). Labels are sampled from
    the model's own distribution softmax(logits); with L_hat the mean cross-entropy on the sampled
    labels, the estimate is B * (dL_hat/dtheta)^2 (its expectation is the GN diagonal).
    """
    logits = logits.float()
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
    loss = F.cross_entropy(logits, sampled)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    n = logits.shape[0]
    return [torch.zeros_like(p) if g is None else n * g.square() for p, g in zip(params, grads, strict=True)]


def gnb_diagonal_sharded(
    logits: torch.Tensor,
    params: Sequence[torch.Tensor],
    positions: int,
    generator: torch.Generator | None = None,
    weight: float = 1.0,
    reduce: Callable[[list[torch.Tensor | None]], list[torch.Tensor | None]] | None = None,
) -> list[torch.Tensor]:
    """`gnb_diagonal` for a model sharded with FSDP, whose gradients are reduced over the processes in
    `backward()` only (so `autograd.grad` cannot be used).

    Each process passes its `logits` [B_p, V] and `positions`, the sum of B_p over all processes. Its
    sampled-label cross-entropy is summed and divided by `positions`, so the reduced (summed) gradient
    is that of the mean over all positions and the estimate, `positions` * grad^2, is the one-process
    estimator. `weight` multiplies the loss: the process count where the backward averages gradients
    over processes (FSDP), 0 for a process without rows that passes a stand-in row (the backward's
    collectives need every process). `reduce` completes the gradients that FSDP does not reduce
    (compact leaves outside it; see `unlearn`), as the run's own step does. The step's own gradients
    (`.grad`) are kept.
    """
    logits = logits.float()
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
    loss = F.cross_entropy(logits, sampled, reduction="sum") * (weight / max(1, positions))
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    loss.backward()
    grads = [p.grad for p in params] if reduce is None else reduce([p.grad for p in params])
    estimates = [
        torch.zeros_like(p) if g is None else positions * g.square() for p, g in zip(params, grads, strict=True)
    ]
    for p, g in zip(params, kept, strict=True):
        p.grad = g
    return estimates


def hutchinson_diagonal(
    loss: torch.Tensor, params: Sequence[torch.Tensor], generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Hutchinson's estimate u * (H u) of the Hessian diagonal of `loss` (unbiased).

    `u` is Rademacher (+-1), which has the lowest variance of the valid choices (Sophia's paper uses
    Gaussian u; both are unbiased). Needs a double backward: load models with
    `attn_implementation="eager"` (SDPA attention has no double backward on CPU).
    """
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None and g.requires_grad]
    us = [
        torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(g.dtype).mul_(2).sub_(1) for p, g in pairs
    ]
    try:
        hvs = torch.autograd.grad([g for _, g in pairs], [p for p, _ in pairs], grad_outputs=us, allow_unused=True)
    except RuntimeError as err:
        raise SimuError(
            f"Hutchinson's estimator needs a double backward, which this model does not support ({err}). "
            "Load the model with attn_implementation='eager', or use the 'gnb' estimator."
        ) from err
    result = {
        id(p): u * (torch.zeros_like(p) if hv is None else hv) for (p, _), u, hv in zip(pairs, us, hvs, strict=True)
    }
    return [result.get(id(p), torch.zeros_like(p)).detach() for p in params]


def squared_gradient(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """SOUL's curvature proxy: the squared (already clipped) gradient of the step's own loss."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.square() for p in params]


ESTIMATORS = ("gnb", "hutchinson", "sqgrad")
