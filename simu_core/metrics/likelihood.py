"""Likelihood metrics: teacher-forced answer-token statistics and the TOFU numbers built on them.

- `token_stats`: one batched forward per batch gives every per-token quantity the metrics need
  (summed NLL, log-probabilities, argmax hits, Min-K%++ token scores), left-aligned on the answer;
- answer probability p(a|q)^(1/|a|) = exp(-mean NLL) over the answer tokens and the closing EOS (as
  TOFU), `exact_memorization` (teacher-forced token accuracy) and `extraction_strength` over the
  answer tokens only (EOS left out, as open-unlearning);
- TOFU's truth ratio R = P(perturbed) / P(true) (`truth_ratio_values`; true = the paraphrased
  answer on forget / retain, the original one on real authors / world facts) and its split score
  (`truth_ratio_score`);
- TOFU's forget quality (`forget_quality`: KS-test p-value of forget truth ratios against the
  retain reference) and model utility (`harmonic_mean` of `UTILITY_COMPONENTS`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from simu_core import data as qa

# --------------------------------------------------------------------------------------------
# Teacher-forced token statistics (batched)
# --------------------------------------------------------------------------------------------


@dataclass
class TokenStats:
    """Teacher-forced statistics over the answer tokens of N sequences (A = longest answer, EOS included).

    nll_sum [N]: summed negative log-likelihood of the answer tokens, EOS included (nats);
    n_tokens [N]: answer tokens counted there (answer + EOS when the format appends one);
    n_eos [N]: 1 where the last of those tokens is the closing EOS, else 0;
    With `full=True` also, left-aligned on the answer and padded to A (the EOS position included;
    `answer_only` masks it):
    log_probs [N, A]: log p(x_t | x_<t) (NaN padding);
    correct [N, A]: argmax prediction equals the gold token (False padding);
    minkpp [N, A]: Min-K%++ token score (log p(x_t) - mu_t) / sigma_t (NaN padding).
    """

    nll_sum: np.ndarray
    n_tokens: np.ndarray
    n_eos: np.ndarray
    log_probs: np.ndarray | None = None
    correct: np.ndarray | None = None
    minkpp: np.ndarray | None = None

    @property
    def mean_nll(self) -> np.ndarray:
        """[N] mean NLL per answer token, EOS included (nats): TOFU's and open-unlearning's loss."""
        return self.nll_sum / np.maximum(self.n_tokens, 1)

    @property
    def n_answer(self) -> np.ndarray:
        """[N] answer tokens without the closing EOS (what Min-K%, Min-K%++, EM and ES score)."""
        return self.n_tokens - self.n_eos

    def answer_only(self, values: np.ndarray) -> np.ndarray:
        """A copy of a [N, A] array with the EOS position (and padding) set to NaN (floats) or False (bools)."""
        keep = np.arange(values.shape[1])[None] < self.n_answer[:, None]
        fill = False if values.dtype == bool else np.nan
        return np.where(keep, values, fill)


def concat_stats(parts: Sequence[TokenStats]) -> TokenStats:
    """The statistics of several consecutive groups of sequences as one (e.g. each process's part):
    [N] arrays are concatenated, [N, A] arrays padded to the longest A first (NaN, or False for `correct`)."""

    def stack(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        if any(a is None for a in arrays):
            return None
        width = max(a.shape[1] for a in arrays)
        fill = False if arrays[0].dtype == bool else np.nan
        return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays])

    return TokenStats(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("nll_sum", "n_tokens", "n_eos")),
                      stack("log_probs"), stack("correct"), stack("minkpp"))  # fmt: skip


@torch.no_grad()
def token_stats(
    model: nn.Module,
    examples: Sequence[qa.Encoded],
    pad_id: int,
    batch_size: int = 64,
    full: bool = False,
    eos_id: int | None = None,
) -> TokenStats:
    """Teacher-forced answer-token statistics of `examples`, batched (sorted by length to cut padding).

    `eos_id`: the id that closes answers when the prompt format appends EOS (None: it does not); an
    answer whose last token is `eos_id` counts it in `n_eos`.
    """
    n = len(examples)
    n_answer = np.array([len(e.ids) - e.n_prompt for e in examples], dtype=int)
    ends_eos = [eos_id is not None and len(e.ids) > e.n_prompt and e.ids[-1] == eos_id for e in examples]
    width = int(n_answer.max()) if n else 0
    stats = TokenStats(np.zeros(n), n_answer.copy(), np.array(ends_eos, dtype=int))
    if full:
        stats.log_probs = np.full((n, width), np.nan)
        stats.correct = np.zeros((n, width), dtype=bool)
        stats.minkpp = np.full((n, width), np.nan)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else 1
    for idx in _length_batches(examples, batch_size, vocab):
        _fill_batch(model, [examples[i] for i in idx], idx, pad_id, device, stats, full)
    model.train(was_training)
    return stats


# Most logits held at once per batch (B x T x vocab): 2^27 floats = 512 MiB in float32. Only large
# vocabularies with long answers hit it (Llama-3: ~5 x 200 tokens), then batches shrink.
MAX_LOGITS = 2**27


def _length_batches(examples: Sequence[qa.Encoded], batch_size: int, vocab: int) -> Iterator[np.ndarray]:
    """Index batches of up to `batch_size` examples sorted by length, each within MAX_LOGITS logits."""
    order = np.argsort([len(e.ids) for e in examples], kind="stable")
    start = 0
    while start < len(order):
        longest = len(examples[order[min(start + batch_size, len(order)) - 1]].ids)
        rows = max(1, min(batch_size, MAX_LOGITS // max(1, longest * vocab)))
        yield order[start : start + rows]
        start += rows


def _fill_batch(
    model: nn.Module,
    batch_examples: list[qa.Encoded],
    idx: np.ndarray,
    pad_id: int,
    device: torch.device,
    stats: TokenStats,
    full: bool,
) -> None:
    """One forward over a batch; writes rows `idx` of `stats`."""
    batch = qa.collate(batch_examples, pad_id)
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits  # [B, T, V]
    n_prompt = torch.tensor([e.n_prompt for e in batch_examples], device=device)
    n_answer = torch.tensor([len(e.ids) - e.n_prompt for e in batch_examples], device=device)
    j = torch.arange(int(n_answer.max()), device=device)
    valid = j[None] < n_answer[:, None]  # [B, A]
    # the logits at position p predict token p + 1: answer token j is predicted at n_prompt - 1 + j
    pos = (n_prompt[:, None] - 1 + j[None]).clamp(max=ids.shape[1] - 2)
    answer_logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float()  # [B, A, V]
    logp = answer_logits.log_softmax(-1)
    target = ids.gather(1, pos + 1)
    token_lp = logp.gather(-1, target[..., None])[..., 0].masked_fill(~valid, 0.0)  # [B, A]
    stats.nll_sum[idx] = (-token_lp.sum(1)).double().cpu().numpy()
    if not full:
        return
    width = token_lp.shape[1]
    p = logp.exp()
    mu = (p * logp).nan_to_num(0.0).sum(-1)  # E_z[log p(z)]
    sigma = (p * (logp - mu[..., None]) ** 2).nan_to_num(0.0).sum(-1).sqrt().clamp_min(1e-12)
    z = (token_lp - mu) / sigma
    nan = torch.tensor(float("nan"), device=device)
    stats.log_probs[idx, :width] = torch.where(valid, token_lp, nan).double().cpu().numpy()
    stats.correct[idx, :width] = ((answer_logits.argmax(-1) == target) & valid).cpu().numpy()
    stats.minkpp[idx, :width] = torch.where(valid, z, nan).double().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Formulas on arrays (pure functions)
# --------------------------------------------------------------------------------------------


def exact_memorization(correct: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """[N] EM = share of the first `n_tokens` positions of `correct` [N, A] that are argmax hits (NaN if 0)."""
    positions = np.arange(correct.shape[1])[None]
    hits = (correct & (positions < n_tokens[:, None])).sum(1)
    return np.where(n_tokens > 0, hits / np.maximum(n_tokens, 1), np.nan)


def extraction_strength(correct: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """[N] ES = 1 - k*/|y|, k* the smallest index whose suffix y[k*:] is predicted exactly (NaN if |y| = 0).

    `correct` [N, A] marks teacher-forced argmax hits (False on padding), `n_tokens` [N] = |y|. If the
    last token is missed, k* = |y| and ES = 0 (the definition; open-unlearning's loop gives 1/|y| there).
    """
    positions = np.arange(correct.shape[1])[None]
    wrong = ~correct & (positions < n_tokens[:, None])
    k_star = np.where(wrong, positions, -1).max(1, initial=-1) + 1
    return np.where(n_tokens > 0, 1.0 - k_star / np.maximum(n_tokens, 1), np.nan)


def truth_ratio_values(base_nll: np.ndarray, perturbed_nll: np.ndarray) -> np.ndarray:
    """[N] TOFU truth ratio R = P(perturbed) / P(base) with length-normalised probabilities.

    Both inputs are mean NLLs per token. The base answer is the paraphrased one on forget / retain
    and the original one on real authors / world facts (TOFU's eval config); `perturbed_nll` is
    already averaged over each item's perturbed answers (a geometric mean of their probabilities,
    as TOFU's code). R < 1: the model prefers the true answer.
    """
    return np.exp(base_nll - perturbed_nll)


def truth_ratio_score(ratios: np.ndarray, role: str) -> float:
    """TOFU split score: forget mean(min(R, 1/R)) (1 = indifferent); other splits mean(max(0, 1 - R))."""
    r = ratios[~np.isnan(ratios)]
    if role == "forget":
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers (0 if any is 0)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def forget_quality(truth_ratios: np.ndarray, reference_truth_ratios: np.ndarray) -> float:
    """TOFU forget quality: KS-test p-value between the forget truth ratios of the model and of the
    retain reference ([N] and [M], NaN left out); 1 = indistinguishable from the retain model."""
    from scipy.stats import ks_2samp

    ours, ref = truth_ratios, reference_truth_ratios
    return float(ks_2samp(ours[~np.isnan(ours)], ref[~np.isnan(ref)]).pvalue)


# TOFU's model utility: the harmonic mean of these 9 (split, metric) numbers (aggregate_eval_stat.py).
# Splits the data lacks are left out and the report notes it (the built-in has no real_authors split: 6).
UTILITY_COMPONENTS = {
    "retain": ("prob", "rouge_l", "truth_ratio"),
    "real_authors": ("prob_vs_perturbed", "rouge_l", "truth_ratio"),
    "world_facts": ("prob_vs_perturbed", "rouge_l", "truth_ratio"),
}
