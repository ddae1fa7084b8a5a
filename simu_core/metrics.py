"""Evaluation metrics (a registry) and the evaluation report, before and after unlearning.

`evaluate(loaded, datasets, reference)` scores one model on named question/answer splits
(`forget`, `retain`, `holdout`, `world_facts`; other names are allowed and treated like retain)
and returns a `Report` with every per-example value, the split summaries and the cross-split
numbers (forget quality, model utility, membership inference). `compare(before, after)` gives
the deltas; `simu_core.report` renders them as a self-contained HTML page, and
`simu_core.evaluation` loads models, data and runs by their specs and evaluates them.

Metric families (definitions: /work/shared/references.md section 5, TOFU / MUSE / Min-K% /
Min-K%++ / LUME):
- generation: greedy answers, ROUGE-L recall (own implementation, rouge_score's default
  tokenisation), exact match (stripped, lower-cased, as LUME);
- likelihood: length-normalised answer probability p(a|q)^(1/|a|), exact memorisation
  (teacher-forced token accuracy), extraction strength;
- truth_ratio: TOFU's R = P(perturbed) / P(paraphrased) (geometric mean over the perturbed
  answers, as TOFU's code), and p(true) / (p(true) + sum p(perturbed));
- membership: per-example LOSS, zlib, Min-K% and Min-K%++ scores, all oriented "higher = more
  likely a NON-member"; AUC of forget (label 0) vs holdout (label 1), so AUC -> 1 when the model
  still recognises the forget set and 0.5 when forget and holdout look alike (open-unlearning's
  convention); PrivLeak = 100 (AUC - AUC_ref) / AUC_ref with this AUC, so > 0 means the forget set
  is still more exposed than under the retain model and < 0 means over-unlearning (MUSE's tables
  use the opposite AUC orientation, hence the opposite sign); LUME's MIA score 1 - 2 |AUC - 0.5|;
- fluency: repetition rate of the generations and perplexity of the answers;
- summary: forget quality (KS p-value against the retain reference), model utility.

Teacher-forced statistics are computed in batches (one forward per batch gives every
per-token quantity the metrics need); generation goes through `models.greedy_answers`.

Adding a metric is one function plus its decorator line (`@example_metric` for per-example
values, `@summary_metric` for one number across splits).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import random
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simu_core import data as qa
from simu_core.config import from_dict, to_dict
from simu_core.errors import SimuError

REPORT_FORMAT = 1
ROLES = ("forget", "retain", "holdout", "world_facts")
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")

Progress = Callable[[str, float], None]


def _no_progress(message: str, fraction: float) -> None:
    pass


@dataclass
class EvalConfig:
    """Evaluation settings (saved in every report)."""

    max_new_tokens: int = 48  # greedy generation length (the built-in answers are <= ~25 tokens)
    batch_size: int = 64  # sequences per forward / generate call
    max_items: int | None = 400  # seeded sample per split (None or 0 = every item)
    seed: int = 0  # seed of the per-split sample
    min_k: float = 0.4  # fraction of lowest-scoring tokens for Min-K% and Min-K%++ (MUSE/TOFU configs)
    repetition_n: int = 2  # n-gram size of the repetition rate
    max_length: int = 512  # tokens per prompt + answer (longer answers are truncated)
    # inputs not computed per split: holdout only serves membership inference (and costs time)
    skip_inputs: dict[str, list[str]] = field(default_factory=lambda: {"holdout": ["generation", "truth_ratio"]})
    privleak_attack: str = "min_k"  # MUSE: Min-40%
    mia_score_attack: str = "loss"  # LUME: loss-based attack
    metrics: list[str] | None = None  # names from EXAMPLE_METRICS / SUMMARY_METRICS; None = all


class MetricSkipped(Exception):
    """A metric cannot be computed on this input; the message is the reason shown to the user."""


# --------------------------------------------------------------------------------------------
# Text metrics (pure functions)
# --------------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenisation: lower-case, non-alphanumerics to spaces, split (no stemming)."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(|a| |b|) dynamic programme)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS(prediction, reference) / |reference| in rouge tokens (0 if either is empty)."""
    ref, pred = rouge_tokens(reference), rouge_tokens(prediction)
    if not ref or not pred:
        return 0.0
    return lcs_length(ref, pred) / len(ref)


def repetition_rate(text: str, n: int = 2) -> float:
    """1 - distinct n-grams / n-grams over whitespace words (lower-cased); 0 for fewer than n+1 words.

    0 means no n-gram repeats; a degenerate "the the the the" gives 1 - 1/3 for n = 2.
    """
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


# --------------------------------------------------------------------------------------------
# Teacher-forced token statistics (batched)
# --------------------------------------------------------------------------------------------


@dataclass
class TokenStats:
    """Teacher-forced statistics over the answer tokens of N sequences (A = longest answer).

    nll_sum [N]: summed negative log-likelihood of the answer tokens (nats);
    n_tokens [N]: answer tokens counted (answer + EOS);
    With `full=True` also, left-aligned on the answer and padded to A:
    log_probs [N, A]: log p(x_t | x_<t) (NaN padding);
    correct [N, A]: argmax prediction equals the gold token (False padding);
    minkpp [N, A]: Min-K%++ token score (log p(x_t) - mu_t) / sigma_t (NaN padding).
    """

    nll_sum: np.ndarray
    n_tokens: np.ndarray
    log_probs: np.ndarray | None = None
    correct: np.ndarray | None = None
    minkpp: np.ndarray | None = None

    @property
    def mean_nll(self) -> np.ndarray:
        """[N] mean NLL per answer token (nats)."""
        return self.nll_sum / np.maximum(self.n_tokens, 1)


@torch.no_grad()
def token_stats(
    model: nn.Module, examples: Sequence[qa.Encoded], pad_id: int, batch_size: int = 64, full: bool = False
) -> TokenStats:
    """Teacher-forced answer-token statistics of `examples`, batched (sorted by length to cut padding)."""
    n = len(examples)
    n_answer = np.array([len(e.ids) - e.n_prompt for e in examples])
    width = int(n_answer.max()) if n else 0
    stats = TokenStats(np.zeros(n), n_answer.copy())
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


def min_k_score(token_scores: np.ndarray, k: float) -> np.ndarray:
    """[N] = -mean of the k-fraction lowest token scores of each row ([N, A], NaN = padding).

    The count is max(1, floor(k * n_tokens)), as in open-unlearning. With log-probs this is
    Min-K% Prob; with Min-K%++'s normalised scores it is Min-K%++. Higher = more likely a non-member.
    """
    present = ~np.isnan(token_scores)
    count = np.maximum(1, np.floor(present.sum(1) * k).astype(int))
    ranked = np.sort(np.where(present, token_scores, np.inf), axis=1)
    take = np.arange(token_scores.shape[1])[None] < count[:, None]
    return -np.where(take, ranked, 0.0).sum(1) / count


def extraction_strength(correct: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """[N] ES = 1 - k*/|y|, k* the smallest index whose suffix y[k*:] is predicted exactly.

    `correct` [N, A] marks teacher-forced argmax hits (False on padding). If the last token is
    missed, k* = |y| and ES = 0 (the definition; open-unlearning's loop gives 1/|y| there).
    """
    positions = np.arange(correct.shape[1])[None]
    wrong = ~correct & (positions < n_tokens[:, None])
    k_star = np.where(wrong, positions, -1).max(1, initial=-1) + 1
    return 1.0 - k_star / np.maximum(n_tokens, 1)


def truth_ratio_values(paraphrased_nll: np.ndarray, perturbed_nll: np.ndarray) -> np.ndarray:
    """[N] TOFU truth ratio R = P(perturbed) / P(paraphrased) with length-normalised probabilities.

    Both inputs are mean NLLs per token; `perturbed_nll` is already averaged over each item's
    perturbed answers (a geometric mean of their probabilities, as TOFU's code). R < 1: the
    model prefers the true (paraphrased) answer.
    """
    return np.exp(paraphrased_nll - perturbed_nll)


def truth_ratio_score(ratios: np.ndarray, role: str) -> float:
    """TOFU split score: forget mean(min(R, 1/R)) (1 = indifferent); other splits mean(max(0, 1 - R))."""
    r = ratios[~np.isnan(ratios)]
    if role == "forget":
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve = P(score(positive) > score(negative)) + P(tie) / 2 (Mann-Whitney)."""
    from scipy.stats import rankdata

    scores = np.concatenate([negatives, positives])
    ranks = rankdata(scores)  # average ranks handle ties
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers (0 if any is 0)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


# --------------------------------------------------------------------------------------------
# One split, evaluated lazily (each input is computed once, when a metric first needs it)
# --------------------------------------------------------------------------------------------


class _Clock:
    """Seconds per family; a nested timer pauses the outer one (no double counting)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self._mark = 0.0

    @contextmanager
    def time(self, family: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
            if self._stack[-1] == "reference":
                family = "reference"  # everything done for the reference model counts as reference
        self._stack.append(family)
        self._mark = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[self._stack.pop()] += now - self._mark
            self._mark = now


class SplitInputs:
    """What the metrics read for one split and one model, computed lazily and cached.

    `items` are the (sampled) items; `role` is the split's role (forget/retain/holdout/world_facts/other).
    """

    def __init__(
        self,
        name: str,
        role: str,
        items: list[dict],
        loaded,
        cfg: EvalConfig,
        clock: _Clock,
        notify: Callable[[str], None] | None = None,
    ):
        self.name, self.role, self.items, self.loaded, self.cfg = name, role, items, loaded, cfg
        self._clock, self._notify = clock, notify or (lambda message: None)

    def _check_wanted(self, family: str) -> None:
        if family in self.cfg.skip_inputs.get(self.name, []):
            raise MetricSkipped(f"no {family} inputs on '{self.name}' (EvalConfig.skip_inputs)")

    def _encode(self, question: str, answer: str) -> qa.Encoded:
        return qa.encode(self.loaded.tokenizer, self.loaded.fmt, question, answer, self.cfg.max_length)

    def _stats(self, examples: list[qa.Encoded], full: bool) -> TokenStats:
        pad = qa.pad_id_of(self.loaded.tokenizer)
        return token_stats(self.loaded.model, examples, pad, self.cfg.batch_size, full)

    @cached_property
    def generations(self) -> list[str]:
        """Greedy answers to the questions."""
        self._check_wanted("generation")
        self._notify(f"{self.name}: greedy answers ({len(self.items)} questions)")
        with self._clock.time("generation"):
            from simu_core.models import greedy_answers

            questions = [it["question"] for it in self.items]
            lm = self.loaded
            return greedy_answers(
                lm.model, lm.tokenizer, lm.fmt, questions, self.cfg.max_new_tokens, self.cfg.batch_size
            )

    @cached_property
    def answer(self) -> TokenStats:
        """Full teacher-forced statistics of the gold answers."""
        self._notify(f"{self.name}: teacher-forced answers")
        with self._clock.time("likelihood"):
            return self._stats([self._encode(it["question"], it["answer"]) for it in self.items], full=True)

    @cached_property
    def variants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(paraphrased mean NLL [N], perturbed mean NLL per answer [M], owner item of each [M]), one pass."""
        self._check_wanted("truth_ratio")
        missing = [k for k in ("paraphrased_answer", "perturbed_answers") if not all(it.get(k) for it in self.items)]
        if missing:
            raise MetricSkipped(
                f"split '{self.name}' has no {' / '.join(missing)} on every item (needed for the truth ratio); "
                "add those fields to the data to get this metric"
            )
        self._notify(f"{self.name}: paraphrased and perturbed answers")
        with self._clock.time("truth_ratio"):
            examples = [self._encode(it["question"], it["paraphrased_answer"]) for it in self.items]
            owner = np.array([i for i, it in enumerate(self.items) for _ in it["perturbed_answers"]])
            examples += [self._encode(it["question"], a) for it in self.items for a in it["perturbed_answers"]]
            nll = self._stats(examples, full=False).mean_nll
        return nll[: len(self.items)], nll[len(self.items) :], owner

    def perturbed_mean_nll(self) -> np.ndarray:
        """[N] mean over each item's perturbed answers of their mean NLL per token."""
        _, pert, owner = self.variants
        return np.bincount(owner, pert, len(self.items)) / np.bincount(owner, minlength=len(self.items))


# --------------------------------------------------------------------------------------------
# Registry of per-example metrics
# --------------------------------------------------------------------------------------------

ExampleFn = Callable[[SplitInputs], np.ndarray]
Aggregate = Callable[[np.ndarray, SplitInputs], float]


@dataclass(frozen=True)
class ExampleMetric:
    """A metric with one value per example; `aggregate` turns them into the split's number.

    goal_forget / goal_other: 'higher', 'lower' or '' (no direction) for the split summary.
    """

    name: str
    fn: ExampleFn
    family: str
    goal_forget: str
    goal_other: str
    aggregate: Aggregate
    doc: str


EXAMPLE_METRICS: dict[str, ExampleMetric] = {}


def example_metric(
    name: str, family: str, goal_forget: str = "", goal_other: str = "", aggregate: Aggregate | None = None
) -> Callable[[ExampleFn], ExampleFn]:
    """Register `fn(split_inputs) -> [N] values` as a per-example metric (default aggregate: mean)."""

    def register(fn: ExampleFn) -> ExampleFn:
        agg = aggregate or (lambda values, s: _nanmean(values))
        EXAMPLE_METRICS[name] = ExampleMetric(
            name, fn, family, goal_forget, goal_other, agg, (fn.__doc__ or "").strip()
        )
        return fn

    return register


@example_metric("rouge_l", "generation", "lower", "higher")
def _rouge_l(s: SplitInputs) -> np.ndarray:
    """ROUGE-L recall of the greedy answer against the gold answer."""
    return np.array([rouge_l_recall(g, it["answer"]) for g, it in zip(s.generations, s.items, strict=True)])


@example_metric("exact_match", "generation", "lower", "higher")
def _exact_match(s: SplitInputs) -> np.ndarray:
    """1 if the greedy answer equals the gold answer (stripped, lower-cased), else 0."""
    gold = [it["answer"].strip().lower() for it in s.items]
    return np.array([float(g.strip().lower() == a) for g, a in zip(s.generations, gold, strict=True)])


@example_metric("prob", "likelihood", "lower", "higher")
def _prob(s: SplitInputs) -> np.ndarray:
    """Length-normalised answer probability p(a|q)^(1/|a|) = exp(-mean token NLL)."""
    return np.exp(-s.answer.mean_nll)


@example_metric("exact_memorization", "likelihood", "lower", "higher")
def _exact_memorization(s: SplitInputs) -> np.ndarray:
    """Teacher-forced token accuracy: share of answer tokens (EOS included) the argmax predicts."""
    return s.answer.correct.sum(1) / s.answer.n_tokens


@example_metric("extraction_strength", "likelihood", "lower", "higher")
def _extraction_strength(s: SplitInputs) -> np.ndarray:
    """ES = 1 - k*/|y|: the share of the answer whose whole suffix the argmax predicts."""
    return extraction_strength(s.answer.correct, s.answer.n_tokens)


@example_metric(
    "truth_ratio", "truth_ratio", "higher", "higher", aggregate=lambda values, s: truth_ratio_score(values, s.role)
)
def _truth_ratio(s: SplitInputs) -> np.ndarray:
    """R = P(perturbed)/P(paraphrased); split score forget mean(min(R,1/R)), else mean(max(0,1-R))."""
    paraphrased, _, _ = s.variants
    return truth_ratio_values(paraphrased, s.perturbed_mean_nll())


@example_metric("prob_vs_perturbed", "truth_ratio", "lower", "higher")
def _prob_vs_perturbed(s: SplitInputs) -> np.ndarray:
    """p(true) / (p(true) + sum p(perturbed)), length-normalised (TOFU's Prob on world facts)."""
    _, pert, owner = s.variants
    p_true = np.exp(-s.answer.mean_nll)
    return p_true / (p_true + np.bincount(owner, np.exp(-pert), len(s.items)))


@example_metric("mia_loss", "membership")
def _mia_loss(s: SplitInputs) -> np.ndarray:
    """LOSS attack score: mean answer NLL (higher = more likely a non-member)."""
    return s.answer.mean_nll


@example_metric("mia_zlib", "membership")
def _mia_zlib(s: SplitInputs) -> np.ndarray:
    """zlib attack score: mean answer NLL / zlib-compressed length of the answer in bytes."""
    sizes = np.array([len(zlib.compress(it["answer"].encode("utf-8"))) for it in s.items])
    return s.answer.mean_nll / sizes


@example_metric("mia_min_k", "membership")
def _mia_min_k(s: SplitInputs) -> np.ndarray:
    """Min-K% Prob: -mean of the k lowest answer-token log-probs (k = EvalConfig.min_k)."""
    return min_k_score(s.answer.log_probs, s.cfg.min_k)


@example_metric("mia_min_k_pp", "membership")
def _mia_min_k_pp(s: SplitInputs) -> np.ndarray:
    """Min-K%++: -mean of the k lowest (log p(x_t) - mu_t) / sigma_t over the answer tokens."""
    return min_k_score(s.answer.minkpp, s.cfg.min_k)


@example_metric("repetition", "fluency", "", "lower")
def _repetition(s: SplitInputs) -> np.ndarray:
    """Repetition rate of the greedy answer: 1 - distinct n-grams / n-grams (n = EvalConfig.repetition_n)."""
    return np.array([repetition_rate(g, s.cfg.repetition_n) for g in s.generations])


def _token_weighted_perplexity(values: np.ndarray, s: SplitInputs) -> float:
    return float(np.exp(s.answer.nll_sum.sum() / s.answer.n_tokens.sum()))


@example_metric("perplexity", "fluency", "", "lower", aggregate=_token_weighted_perplexity)
def _perplexity(s: SplitInputs) -> np.ndarray:
    """Answer perplexity exp(mean NLL); the split number is token-weighted exp(sum NLL / tokens)."""
    return np.exp(s.answer.mean_nll)


# --------------------------------------------------------------------------------------------
# Registry of summary metrics (one number across splits)
# --------------------------------------------------------------------------------------------


class SummaryContext:
    """What summary metrics read: per-example values and split numbers of the model and of the reference."""

    def __init__(self, evaluation: _Evaluation):
        self._ev = evaluation
        self.cfg = evaluation.cfg
        self.notes = evaluation.notes

    def values(self, split: str, metric: str) -> np.ndarray:
        return self._ev.values(split, metric)

    def split_summary(self, split: str, metric: str) -> float:
        return self._ev.split_summary(split, metric)

    def reference_values(self, split: str, metric: str) -> np.ndarray:
        return self._ev.reference_values(split, metric)

    @property
    def has_reference(self) -> bool:
        return self._ev.reference is not None

    @property
    def splits(self) -> list[str]:
        return list(self._ev.inputs)


SummaryFn = Callable[[SummaryContext], float]


@dataclass(frozen=True)
class SummaryMetric:
    """A number across splits; goal is 'higher', 'lower', 'zero' (best at 0) or ''."""

    name: str
    fn: SummaryFn
    family: str
    goal: str
    doc: str


SUMMARY_METRICS: dict[str, SummaryMetric] = {}


def summary_metric(name: str, family: str, goal: str = "") -> Callable[[SummaryFn], SummaryFn]:
    """Register `fn(context) -> float` as a summary metric."""

    def register(fn: SummaryFn) -> SummaryFn:
        SUMMARY_METRICS[name] = SummaryMetric(name, fn, family, goal, (fn.__doc__ or "").strip())
        return fn

    return register


@summary_metric("forget_quality", "summary", "higher")
def _forget_quality(ctx: SummaryContext) -> float:
    """KS-test p-value between the forget truth ratios of the model and of the retain reference (TOFU)."""
    from scipy.stats import ks_2samp

    ours, ref = ctx.values("forget", "truth_ratio"), ctx.reference_values("forget", "truth_ratio")
    return float(ks_2samp(ours[~np.isnan(ours)], ref[~np.isnan(ref)]).pvalue)


# (split, metric) pairs whose harmonic mean is TOFU's model utility, for the splits present.
UTILITY_COMPONENTS = {
    "retain": ("prob", "rouge_l", "truth_ratio"),
    "world_facts": ("prob_vs_perturbed", "rouge_l", "truth_ratio"),
}


@summary_metric("model_utility", "summary", "higher")
def _model_utility(ctx: SummaryContext) -> float:
    """Harmonic mean of Prob, ROUGE-L recall and truth-ratio score on retain and world facts (TOFU)."""
    present = [split for split in UTILITY_COMPONENTS if split in ctx.splits]
    if not present:
        raise MetricSkipped("needs a 'retain' or 'world_facts' split")
    parts = {}
    for split in present:
        for metric in UTILITY_COMPONENTS[split]:
            try:
                parts[f"{split}/{metric}"] = ctx.split_summary(split, metric)
            except MetricSkipped as skip:
                raise MetricSkipped(f"component {split}/{metric} is missing: {skip}") from skip
    if len(present) < len(UTILITY_COMPONENTS):
        ctx.notes["model_utility"] = f"computed from {', '.join(parts)} only"
    return harmonic_mean(list(parts.values()))


def _mia_auc(ctx: SummaryContext, attack: str, reference: bool = False) -> float:
    """AUC of forget (label 0) vs holdout (label 1) on "higher = non-member" scores."""
    get = ctx.reference_values if reference else ctx.values
    forget, holdout = get("forget", f"mia_{attack}"), get("holdout", f"mia_{attack}")
    return roc_auc(forget, holdout)


def _register_auc(attack: str) -> None:
    def auc(ctx: SummaryContext) -> float:
        return _mia_auc(ctx, attack)

    auc.__doc__ = f"AUC of the {attack} attack, forget (0) vs holdout (1): 1 = forget set recognised, 0.5 = alike."
    summary_metric(f"mia_auc_{attack}", "membership")(auc)


for _attack in MIA_ATTACKS:
    _register_auc(_attack)


@summary_metric("privleak", "membership", "zero")
def _privleak(ctx: SummaryContext) -> float:
    """MUSE PrivLeak = 100 (AUC - AUC_ref) / AUC_ref; > 0: forget set still exposed, < 0: over-unlearned."""
    attack = ctx.cfg.privleak_attack
    auc = _mia_auc(ctx, attack)
    if ctx.has_reference:
        ref_auc = _mia_auc(ctx, attack, reference=True)
    else:
        ref_auc = 0.5
        ctx.notes["privleak"] = "no reference model: reference AUC taken as 0.5 (as open-unlearning does)"
    if ref_auc == 0:
        raise MetricSkipped("the reference model's AUC is 0, so the relative PrivLeak is undefined")
    return 100.0 * (auc - ref_auc) / ref_auc


@summary_metric("mia_score", "membership", "higher")
def _mia_score(ctx: SummaryContext) -> float:
    """LUME MIA score 1 - 2 |AUC - 0.5| (1 = forget and holdout indistinguishable)."""
    return 1.0 - 2.0 * abs(_mia_auc(ctx, ctx.cfg.mia_score_attack) - 0.5)


@summary_metric("perplexity", "fluency", "lower")
def _world_perplexity(ctx: SummaryContext) -> float:
    """Token-weighted perplexity of the world-facts answers (general text outside the authors)."""
    return ctx.split_summary("world_facts", "perplexity")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class SplitResult:
    """Per-example results of one split: `values[metric]` has one entry per evaluated item."""

    name: str
    role: str
    dataset: str
    n_total: int
    indices: list[int]  # positions of the evaluated items in the full dataset (seeded sample)
    questions: list[str]
    answers: list[str]
    generations: list[str] | None
    values: dict[str, list[float | None]]
    summary: dict[str, float | None]
    skipped: dict[str, str]


@dataclass
class Report:
    """Everything one evaluation produced; `summary` is flat: "forget_quality", "forget/rouge_l", ..."""

    model: str
    reference: str | None
    forget_quality: float | None
    model_utility: float | None
    privleak: float | None
    mia_score: float | None
    summary: dict[str, float | None]
    splits: dict[str, SplitResult]
    reference_values: dict[str, dict[str, list[float | None]]]
    skipped: dict[str, str]  # flat metric key -> reason
    notes: dict[str, str]
    settings: dict
    versions: dict[str, str]
    seconds: dict[str, float]  # per metric family, plus "total"
    created: str
    format: int = REPORT_FORMAT

    def to_dict(self) -> dict:
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(data) - {"format"}
        if missing:
            raise SimuError(f"not a metrics report: missing {sorted(missing)}. Pass a file written by `evaluate`.")
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["splits"] = {k: from_dict(SplitResult, v) for k, v in data["splits"].items()}
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (NaN/inf become null); atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Report:
        path = Path(path)
        if not path.is_file():
            raise SimuError(f"metrics file '{path}' not found. Run `python -m simu_core evaluate` first.")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise SimuError(f"'{path}' is not valid JSON ({err.msg}); re-run the evaluation.") from err

    def values(self, split: str, metric: str) -> np.ndarray:
        """Per-example values as a float array (NaN where missing)."""
        return np.array(self.splits[split].values[metric], dtype=float)


def _json_safe(obj):
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def goal_of(key: str) -> str:
    """'higher', 'lower', 'zero' or '' for a flat summary key ("forget_quality", "forget/rouge_l")."""
    if "/" in key:
        split, name = key.split("/", 1)
        metric = EXAMPLE_METRICS.get(name)
        if metric is None or split == "holdout":  # holdout is never trained on: no better or worse
            return ""
        return metric.goal_forget if split == "forget" else metric.goal_other
    metric = SUMMARY_METRICS.get(key)
    return metric.goal if metric else ""


@dataclass
class Delta:
    """One metric before and after; `improved` follows the metric's goal (None without a goal)."""

    before: float | None
    after: float | None
    delta: float | None
    goal: str
    improved: bool | None


def compare(before: Report, after: Report) -> dict[str, Delta]:
    """Per summary key present in either report: before, after, after - before, and whether it improved."""
    out: dict[str, Delta] = {}
    for key in dict.fromkeys([*before.summary, *after.summary]):
        b, a = before.summary.get(key), after.summary.get(key)
        delta = a - b if a is not None and b is not None else None
        goal = goal_of(key)
        improved = None
        if delta and goal:  # no verdict without a goal or without a change
            improved = {"higher": delta > 0, "lower": delta < 0, "zero": abs(a) < abs(b)}[goal]
        out[key] = Delta(b, a, delta, goal, improved)
    return out


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------


def sample_indices(n: int, max_items: int | None, seed: int, name: str) -> list[int]:
    """Sorted seeded sample of `max_items` positions out of `n` (all when `max_items` is None/0 or >= n)."""
    if not max_items or n <= max_items:
        return list(range(n))
    return sorted(random.Random(f"{seed}:{name}").sample(range(n), max_items))


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    if a is b:
        return True
    specials = ("eos_token_id", "bos_token_id", "pad_token_id")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, s, None) == getattr(b, s, None) for s in specials)


class _Evaluation:
    """State of one `evaluate` call: lazy inputs per split (model and reference), values, skip reasons."""

    def __init__(self, loaded, splits: dict[str, tuple[qa.QADataset, list[int]]], reference, cfg, progress):
        self.cfg, self.reference, self.clock = cfg, reference, _Clock()
        self.notes: dict[str, str] = {}
        self._progress = progress
        self.fraction = 0.0
        self.splits = splits
        self.inputs = {name: self._inputs(name, loaded) for name in splits}
        self.ref_inputs = (
            {name: self._inputs(name, reference) for name in splits}
            if reference is not None and not isinstance(reference, Report)
            else {}
        )
        self.computed: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        self.skipped: dict[str, dict[str, str]] = defaultdict(dict)
        self.ref_computed: dict[str, dict[str, np.ndarray]] = defaultdict(dict)

    def _inputs(self, name: str, loaded) -> SplitInputs:
        dataset, indices = self.splits[name]
        role = name if name in ROLES else "other"
        items = [dataset.items[i] for i in indices]
        return SplitInputs(name, role, items, loaded, self.cfg, self.clock, self.notify)

    def progress(self, message: str, fraction: float) -> None:
        self.fraction = fraction
        self._progress(message, fraction)

    def notify(self, message: str) -> None:
        """Progress message from inside a step (the fraction stays where it is)."""
        self._progress(message, self.fraction)

    def values(self, split: str, metric: str) -> np.ndarray:
        """Per-example values, computed on first use; raises MetricSkipped with the reason."""
        if split not in self.inputs:
            raise MetricSkipped(f"needs a '{split}' split")
        if metric in self.skipped[split]:
            raise MetricSkipped(self.skipped[split][metric])
        if metric not in self.computed[split]:
            spec = EXAMPLE_METRICS[metric]
            try:
                with self.clock.time(spec.family):
                    self.computed[split][metric] = np.asarray(spec.fn(self.inputs[split]), dtype=float)
            except MetricSkipped as skip:
                self.skipped[split][metric] = str(skip)
                raise
        return self.computed[split][metric]

    def split_summary(self, split: str, metric: str) -> float:
        values = self.values(split, metric)
        return EXAMPLE_METRICS[metric].aggregate(values, self.inputs[split])

    def reference_values(self, split: str, metric: str) -> np.ndarray:
        if self.reference is None:
            raise MetricSkipped("no reference model: pass the retain model (e.g. builtin:retain10 for forget10)")
        if split not in self.inputs:
            raise MetricSkipped(f"needs a '{split}' split")
        if isinstance(self.reference, Report):
            return self._values_from_report(split, metric)
        if metric not in self.ref_computed[split]:
            with self.clock.time("reference"):
                values = EXAMPLE_METRICS[metric].fn(self.ref_inputs[split])
            self.ref_computed[split][metric] = np.asarray(values, dtype=float)
        return self.ref_computed[split][metric]

    def _values_from_report(self, split: str, metric: str) -> np.ndarray:
        result = self.reference.splits.get(split)
        if result is None or metric not in result.values:
            raise MetricSkipped(f"the reference report has no '{split}/{metric}' values; re-evaluate the reference")
        if result.indices != self.splits[split][1]:
            raise SimuError(
                f"the reference report was computed on other '{split}' items; evaluate both with the same "
                "data, max_items and seed (or pass the reference model itself)"
            )
        return np.array(result.values[metric], dtype=float)


def _versions() -> dict[str, str]:
    import scipy
    import transformers

    import simu_core

    return {
        "simu_core": simu_core.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def _check_inputs(loaded, datasets: dict[str, qa.QADataset], reference, cfg: EvalConfig) -> None:
    if not datasets:
        raise SimuError("no data to evaluate on: pass at least a 'forget' split (e.g. builtin:forget10).")
    for name, dataset in datasets.items():
        if not len(dataset):
            raise SimuError(f"split '{name}' ({dataset.name}) is empty; give it at least one question/answer row.")
    unknown = [m for m in cfg.metrics or [] if m not in EXAMPLE_METRICS and m not in SUMMARY_METRICS]
    if unknown:
        raise SimuError(f"unknown metric(s) {unknown}. Choose from: {', '.join([*EXAMPLE_METRICS, *SUMMARY_METRICS])}.")
    for attack in (cfg.privleak_attack, cfg.mia_score_attack):
        if attack not in MIA_ATTACKS:
            raise SimuError(f"unknown membership attack '{attack}'. Choose one of: {', '.join(MIA_ATTACKS)}.")
    is_model = reference is not None and not isinstance(reference, Report)
    if is_model and not same_tokenizer(loaded.tokenizer, reference.tokenizer):
        raise SimuError(
            f"the reference model '{reference.spec}' uses another tokenizer than '{loaded.spec}', so their "
            "truth ratios and membership scores are not comparable. Use a retain model trained from the "
            "same base (for the built-in model: builtin:retain01|05|10)."
        )


def evaluate(
    loaded,
    datasets: dict[str, qa.QADataset],
    reference=None,
    config: EvalConfig | None = None,
    progress: Progress | None = None,
) -> Report:
    """Evaluate `loaded` (a `models.LoadedModel`) on named splits and return the `Report`.

    datasets: {"forget": ..., "retain": ..., "holdout": ..., "world_facts": ...} (any subset; other
    names are evaluated like retain). reference: the retain reference model (a LoadedModel with the
    same tokenizer) or a `Report` of it on the same data and settings; needed for forget quality and
    PrivLeak. Metrics that cannot run on the input are skipped and their reason is kept in `skipped`.
    progress(message, fraction) is called as the work advances.
    """
    cfg = config or EvalConfig()
    _check_inputs(loaded, datasets, reference, cfg)
    start = time.perf_counter()
    splits = {name: (ds, sample_indices(len(ds), cfg.max_items, cfg.seed, name)) for name, ds in datasets.items()}
    ev = _Evaluation(loaded, splits, reference, cfg, progress or _no_progress)
    wanted = set(cfg.metrics) if cfg.metrics else None
    example_names = [m for m in EXAMPLE_METRICS if wanted is None or m in wanted]
    summary_names = [m for m in SUMMARY_METRICS if wanted is None or m in wanted]
    total = len(splits) * len(example_names) + len(summary_names)
    step = 0
    split_summaries: dict[str, dict[str, float | None]] = {name: {} for name in splits}
    for split in splits:
        for metric in example_names:
            ev.progress(f"{split}: {metric}", step / total)
            step += 1
            with suppress(MetricSkipped):  # the reason is kept in ev.skipped
                split_summaries[split][metric] = ev.split_summary(split, metric)
    summary: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    for name in summary_names:
        ev.progress(name, step / total)
        step += 1
        try:
            with ev.clock.time(SUMMARY_METRICS[name].family):
                summary[name] = float(SUMMARY_METRICS[name].fn(SummaryContext(ev)))
        except MetricSkipped as skip:
            skipped[name] = str(skip)
    ev.progress("done", 1.0)
    return _build_report(loaded, reference, ev, split_summaries, summary, skipped, start)


def _build_report(loaded, reference, ev: _Evaluation, split_summaries, summary, skipped, start) -> Report:
    results = {}
    for name, s in ev.inputs.items():
        dataset, indices = ev.splits[name]
        generations = s.__dict__.get("generations")  # only if some metric asked for them
        values = {m: v.tolist() for m, v in ev.computed[name].items()}
        if "answer" in s.__dict__:  # answer tokens per item, the weights of token-weighted numbers
            values["n_tokens"] = s.answer.n_tokens.tolist()
        results[name] = SplitResult(
            name, s.role, dataset.name, len(dataset), indices, [it["question"] for it in s.items],
            [it["answer"] for it in s.items], generations, values, split_summaries[name], dict(ev.skipped[name]),
        )  # fmt: skip
        for metric, reason in ev.skipped[name].items():
            skipped[f"{name}/{metric}"] = reason
    flat = dict(summary)
    for name, values in split_summaries.items():
        flat.update({f"{name}/{m}": v for m, v in values.items()})
    seconds = {k: round(v, 3) for k, v in ev.clock.seconds.items()}
    seconds["total"] = round(time.perf_counter() - start, 3)
    return Report(
        model=loaded.spec,
        reference=None if reference is None else (reference.model if isinstance(reference, Report) else reference.spec),
        forget_quality=summary.get("forget_quality"),
        model_utility=summary.get("model_utility"),
        privleak=summary.get("privleak"),
        mia_score=summary.get("mia_score"),
        summary=flat,
        splits=results,
        reference_values={k: {m: v.tolist() for m, v in d.items()} for k, d in ev.ref_computed.items()},
        skipped=skipped,
        notes=ev.notes,
        settings=to_dict(ev.cfg),
        versions=_versions(),
        seconds=seconds,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
