"""What a metric reads: the settings, one split's lazily computed inputs, the cross-split context.

- `EvalConfig`: the evaluation settings (saved in every report);
- `SplitInputs`: for one split and one model, the greedy answers and the teacher-forced statistics
  of the gold, paraphrased and perturbed answers, each computed once, when a metric first asks
  (`truth_ratio_base`: which answer the truth ratio treats as the true one, per role, as TOFU);
- `SummaryContext`: what a summary metric (one number across splits) reads of a running evaluation;
- `MetricSkipped`: raised when a metric cannot be computed on its input (the message says why);
- `Clock`: seconds per metric family.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np

from simu_core import data as qa
from simu_core import distributed
from simu_core.metrics.likelihood import TokenStats, concat_stats, token_stats


@dataclass
class EvalConfig:
    """Evaluation settings (saved in every report)."""

    max_new_tokens: int = 48  # greedy generation length (the built-in answers are <= ~25 tokens)
    batch_size: int = 64  # sequences per forward / generate call
    max_items: int | None = 400  # seeded sample per split (None or 0 = every item)
    seed: int = 0  # seed of the per-split sample
    min_k: float = 0.4  # fraction of lowest-scoring tokens for Min-K% and Min-K%++ (MUSE/TOFU configs)
    repetition_n: int = 2  # n-gram size of the repetition rate
    # ROUGE-L with the Porter stemmer, as TOFU and MUSE (rouge_score use_stemmer=True); False: without
    rouge_stemmer: bool = True
    # exact match rule: "first_answer" = the greedy answer's first sentence(s) equal the gold answer once
    # normalised (answers.answer_matches: free-form models go on after the answer); "whole" = the whole
    # greedy answer equals it, stripped and lower-cased (LUME)
    exact_match: str = "first_answer"
    max_length: int = 512  # tokens per prompt + answer (longer answers are truncated)
    # inputs not computed per split: holdout only serves membership inference (and costs time)
    skip_inputs: dict[str, list[str]] = field(default_factory=lambda: {"holdout": ["generation", "truth_ratio"]})
    privleak_attack: str = "min_k"  # MUSE: Min-40%
    mia_score_attack: str = "loss"  # LUME: loss-based attack
    metrics: list[str] | None = None  # names from EXAMPLE_METRICS / SUMMARY_METRICS; None = all


# Roles whose truth ratio uses the original answer as the true one (TOFU: real authors, world facts).
ORIGINAL_ANSWER_ROLES = ("real_authors", "world_facts")


class MetricSkipped(Exception):
    """A metric cannot be computed on this input; the message is the reason shown to the user."""


# --------------------------------------------------------------------------------------------
# One split, evaluated lazily (each input is computed once, when a metric first needs it)
# --------------------------------------------------------------------------------------------


class Clock:
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

    `items` are the (sampled) items; `role` is the split's role (forget/retain/holdout/real_authors/
    world_facts/other). Launched on several processes, each computes its contiguous part of the
    sequences and every process gets all of them back in order (so every process computes the same
    metrics; the caller lets the main one write).
    """

    def __init__(
        self,
        name: str,
        role: str,
        items: list[dict],
        loaded,
        cfg: EvalConfig,
        clock: Clock,
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
        tokenizer = self.loaded.tokenizer
        eos = tokenizer.eos_token_id if self.loaded.fmt.appends_eos else None
        group = distributed.current()
        part = group.split(examples)
        stats = token_stats(self.loaded.model, part, qa.pad_id_of(tokenizer), self.cfg.batch_size, full, eos)
        return stats if group.world == 1 else concat_stats(group.gather_objects([stats]))

    @cached_property
    def generations(self) -> list[str]:
        """Greedy answers to the questions."""
        self._check_wanted("generation")
        self._notify(f"{self.name}: greedy answers ({len(self.items)} questions)")
        with self._clock.time("generation"):
            from simu_core.models import greedy_answers

            group = distributed.current()
            questions = group.split([it["question"] for it in self.items])
            lm = self.loaded
            answers = greedy_answers(
                lm.model, lm.tokenizer, lm.fmt, questions, self.cfg.max_new_tokens, self.cfg.batch_size
            )
            return group.gather_objects(answers)

    @cached_property
    def paraphrase_generations(self) -> list[list[str]]:
        """Greedy answers to each item's `paraphrased_questions` (one list per item; the real-knowledge
        benchmark writes them). Raises MetricSkipped when an item has none."""
        if not all(it.get("paraphrased_questions") for it in self.items):
            raise MetricSkipped("needs paraphrased_questions on every item (the real-knowledge benchmark has them)")
        self._check_wanted("generation")
        prompts = [q for it in self.items for q in it["paraphrased_questions"]]
        self._notify(f"{self.name}: greedy answers to {len(prompts)} paraphrased questions")
        with self._clock.time("generation"):
            from simu_core.models import greedy_answers

            group = distributed.current()
            lm = self.loaded
            part = greedy_answers(lm.model, lm.tokenizer, lm.fmt, group.split(prompts), self.cfg.max_new_tokens,
                                  self.cfg.batch_size)  # fmt: skip
            answers = iter(group.gather_objects(part))
            return [[next(answers) for _ in it["paraphrased_questions"]] for it in self.items]

    @cached_property
    def answer(self) -> TokenStats:
        """Full teacher-forced statistics of the gold answers."""
        self._notify(f"{self.name}: teacher-forced answers")
        with self._clock.time("likelihood"):
            return self._stats([self._encode(it["question"], it["answer"]) for it in self.items], full=True)

    @property
    def truth_ratio_base(self) -> str:
        """The item field the truth ratio sets against the perturbed answers: TOFU's eval config uses the
        paraphrased answer on forget and retain, the original answer on real authors and world facts."""
        return "answer" if self.role in ORIGINAL_ANSWER_ROLES else "paraphrased_answer"

    @cached_property
    def variants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(base answer mean NLL [N], perturbed mean NLL per answer [M], owner item of each [M]), one pass.

        The base answer is `truth_ratio_base` (the paraphrase, or the gold answer already scored in `answer`).
        """
        self._check_wanted("truth_ratio")
        base = self.truth_ratio_base
        needed = ("perturbed_answers",) if base == "answer" else ("paraphrased_answer", "perturbed_answers")
        missing = [k for k in needed if not all(it.get(k) for it in self.items)]
        if missing:
            raise MetricSkipped(
                f"split '{self.name}' has no {' / '.join(missing)} on every item (needed for the truth ratio); "
                "add those fields to the data to get this metric"
            )
        reuse = base == "answer"  # the gold answer's NLL is already in `answer`
        base_nll = self.answer.mean_nll if reuse else None
        self._notify(f"{self.name}: {'perturbed' if reuse else 'paraphrased and perturbed'} answers")
        with self._clock.time("truth_ratio"):
            examples = [] if reuse else [self._encode(it["question"], it[base]) for it in self.items]
            n_base = len(examples)
            owner = np.array([i for i, it in enumerate(self.items) for _ in it["perturbed_answers"]])
            examples += [self._encode(it["question"], a) for it in self.items for a in it["perturbed_answers"]]
            nll = self._stats(examples, full=False).mean_nll
        return (base_nll if reuse else nll[:n_base]), nll[n_base:], owner

    def perturbed_mean_nll(self) -> np.ndarray:
        """[N] mean over each item's perturbed answers of their mean NLL per token."""
        _, pert, owner = self.variants
        return np.bincount(owner, pert, len(self.items)) / np.bincount(owner, minlength=len(self.items))


# --------------------------------------------------------------------------------------------
# Across splits
# --------------------------------------------------------------------------------------------


class EvaluationState(Protocol):
    """What `SummaryContext` reads of a running evaluation (`driver._Evaluation`)."""

    cfg: EvalConfig
    notes: dict[str, str]
    reference: object
    inputs: dict[str, SplitInputs]

    def values(self, split: str, metric: str) -> np.ndarray: ...

    def split_summary(self, split: str, metric: str) -> float: ...

    def reference_values(self, split: str, metric: str) -> np.ndarray: ...


class SummaryContext:
    """What summary metrics read: per-example values and split numbers of the model and of the reference."""

    def __init__(self, evaluation: EvaluationState):
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
