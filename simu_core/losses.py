"""Unlearning objectives (registry): GA, GradDiff, NPO, KL-retain.

Every loss takes a `LossInputs` (the model, a forget batch, a retain batch, the frozen reference and
the weights) and returns a `LossOutput`: the scalar to minimise plus the plain forget / retain
language-model losses for logging. Batches are `data.collate` dicts: input_ids [B, T],
attention_mask [B, T], labels [B, T] (-100 outside answers). L_f and L_r are mean NLLs per answer
token (nats), as a Hugging Face model computes them. Which forget tokens carry a label is the
batch's business: with `UnlearnConfig.forget_tokens = "fact"` only the fact's value tokens do
(`targets.forget_examples`), so every forget term below ascends on those tokens alone.

Adding a loss is one function and one line in `LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simu_core.errors import SimuError

Batch = dict[str, torch.Tensor]


@dataclass
class LossInputs:
    """What a loss may use. `reference` is a frozen model (the original) for NPO / KL losses."""

    model: nn.Module
    forget: Batch
    retain: Batch | None = None
    reference: nn.Module | None = None
    gamma: float = 1.0  # retain weight
    beta: float = 0.1  # NPO inverse temperature
    # This process's share of the global batch when several processes split it (`distributed.Share`):
    # the forget / retain terms are scaled by it, so the processes' gradients sum to the one-process
    # gradient. The forget share is in rows for losses in PER_SEQUENCE_FORGET, else in answer tokens.
    forget_weight: float = 1.0
    retain_weight: float = 1.0


@dataclass
class LossOutput:
    """`total` (scalar with graph) is minimised; `forget` / `retain` are the detached LM losses (nats/token)."""

    total: torch.Tensor
    forget: float
    retain: float | None = None


def answer_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict the answer tokens, and those tokens.

    Returns (logits [B, T-1, V] float32, targets [B, T-1] long with -100 where there is no answer token).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].float(), batch["labels"][:, 1:]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, T] (0 where targets are -100)."""
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")


def mean_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (a scalar)."""
    logits, targets = answer_logits(model, batch)
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)


def sequence_logprob(model: nn.Module, batch: Batch) -> torch.Tensor:
    """log pi(answer | question) per sample [B]: the sum of answer-token log-probabilities."""
    logits, targets = answer_logits(model, batch)
    return -token_nll(logits, targets).sum(dim=1)


def _retain_term(inputs: LossInputs) -> tuple[torch.Tensor | float, float | None]:
    if inputs.retain is None or inputs.gamma == 0:
        return 0.0, None
    retain = mean_nll(inputs.model, inputs.retain)
    return inputs.gamma * inputs.retain_weight * retain, float(retain.detach())


def ga(inputs: LossInputs) -> LossOutput:
    """Gradient ascent: -L_f."""
    forget = mean_nll(inputs.model, inputs.forget)
    return LossOutput(-inputs.forget_weight * forget, float(forget.detach()))


def graddiff(inputs: LossInputs) -> LossOutput:
    """Gradient difference: -L_f + gamma L_r."""
    forget = mean_nll(inputs.model, inputs.forget)
    term, retain = _retain_term(inputs)
    return LossOutput(-inputs.forget_weight * forget + term, float(forget.detach()), retain)


def npo_forget(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO's forget term per sample [B]: -(2/beta) log sigmoid(-beta (log pi - log pi_ref))."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref))


def npo(inputs: LossInputs) -> LossOutput:
    """Negative preference optimisation (Zhang et al. 2024) on forget (sequence log-ratios) + gamma L_r."""
    if inputs.reference is None:
        raise SimuError("the NPO loss needs a frozen reference model (the original); none was given.")
    logits, targets = answer_logits(inputs.model, inputs.forget)
    nll = token_nll(logits, targets)
    with torch.no_grad():
        ref_logp = sequence_logprob(inputs.reference, inputs.forget)
    forget_term = npo_forget(-nll.sum(dim=1), ref_logp, inputs.beta).mean()
    forget = float(nll.detach().sum() / (targets != -100).sum().clamp(min=1))
    term, retain = _retain_term(inputs)
    return LossOutput(inputs.forget_weight * forget_term + term, forget, retain)


def kl_retain(inputs: LossInputs) -> LossOutput:
    """-L_f + gamma KL(p_ref || p_theta) on the retain answer tokens (mean per token)."""
    if inputs.reference is None or inputs.retain is None:
        raise SimuError("the kl_retain loss needs a retain set and a frozen reference model.")
    forget = mean_nll(inputs.model, inputs.forget)
    logits, targets = answer_logits(inputs.model, inputs.retain)
    with torch.no_grad():
        ref_logits, _ = answer_logits(inputs.reference, inputs.retain)
    keep = targets != -100
    logq = torch.log_softmax(logits[keep], dim=-1)
    logp_ref = torch.log_softmax(ref_logits[keep], dim=-1)
    kl = F.kl_div(logq, logp_ref, log_target=True, reduction="batchmean")
    with torch.no_grad():
        retain = float(F.cross_entropy(logits[keep], targets[keep]))
    total = -inputs.forget_weight * forget + inputs.gamma * inputs.retain_weight * kl
    return LossOutput(total, float(forget.detach()), retain)


LossFn = Callable[[LossInputs], LossOutput]
LOSSES: dict[str, LossFn] = {
    "ga": ga,
    "graddiff": graddiff,
    "npo": npo,
    "kl_retain": kl_retain,
}
NEEDS_REFERENCE = {"npo", "kl_retain"}
PER_SEQUENCE_FORGET = {"npo"}  # forget term averaged over sequences (the others: over answer tokens)


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise SimuError(f"unknown loss '{name}'. Choose one of: {', '.join(LOSSES)}.")
    return LOSSES[name]
