"""Trade-off curves: quick scores at checkpoints along an unlearning run, and MUSE's checkpoint rule.

- `checkpoint_scores(loaded, model, sets)`: greedy exact match (`answers.answer_matches`, as the
  metrics' `exact_match`), ROUGE-L recall (stemmed, as `rouge_l`) and, where the facts' values are known,
  the teacher-forced fact probe (`fact_probe`) on a seeded sample of each named set: one point of the
  curve, keyed like the report's flat summary ("forget/rouge_l", ...).
- `first_reaching(points, target)`: MUSE's rule (Shi et al. 2024, arXiv 2407.06460): the first
  checkpoint whose forget score is at or below the retrained model's. MUSE reads KnowMem-forget
  (ROUGE on forget QA); here the forget ROUGE-L recall against the retain reference's, so methods are
  compared where they forget as much as a model that never saw the forget set, not more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from simu_core import data as qa
from simu_core.answers import answer_matches
from simu_core.metrics.driver import sample_indices
from simu_core.metrics.inputs import Clock, EvalConfig, MetricSkipped, SplitInputs
from simu_core.metrics.registry import EXAMPLE_METRICS
from simu_core.metrics.text import rouge_l_recall

CURVE_SCORES = ("exact_match", "rouge_l")


def checkpoint_scores(
    loaded, model, sets: dict[str, qa.QADataset], max_items: int = 50, max_new_tokens: int = 32, seed: int = 0
) -> dict[str, float]:
    """{"<set>/exact_match": share, "<set>/rouge_l": mean recall} of `model`'s greedy answers on at most
    `max_items` items per set (the seeded sample `sample_indices` draws, so every checkpoint and every
    run reads the same items), and "<set>/fact_probe" where the items' fact values are known (the metrics'
    `fact_probe`: is the value still the teacher-forced argmax). `loaded` gives the tokenizer and prompt format."""
    from simu_core.models import greedy_answers

    scores = {}
    for name, dataset in sets.items():
        items = [dataset.items[i] for i in sample_indices(len(dataset), max_items, seed, name)]
        golds = [it["answer"] for it in items]
        answers = greedy_answers(model, loaded.tokenizer, loaded.fmt, [it["question"] for it in items], max_new_tokens)
        scores[f"{name}/exact_match"] = sum(map(answer_matches, answers, golds)) / len(items)
        scores[f"{name}/rouge_l"] = sum(map(rouge_l_recall, answers, golds)) / len(items)
        probe = fact_probe(dataclasses.replace(loaded, model=model), name, items)
        if probe is not None:
            scores[f"{name}/fact_probe"] = probe
    return scores


def fact_probe(loaded, name: str, items: list[dict]) -> float | None:
    """The share of `items` whose fact value `loaded.model` still predicts teacher-forced (the registered
    `fact_probe` metric); None when the items' value spans are unknown."""
    inputs = SplitInputs(name, name, items, loaded, EvalConfig(), Clock())
    try:
        return float(EXAMPLE_METRICS["fact_probe"].fn(inputs).mean())
    except MetricSkipped:
        return None


def first_reaching(points: Sequence[dict], target: float, key: str = "forget/rouge_l") -> dict | None:
    """The first point (in order) whose `key` is at or below `target` (MUSE's rule); None if none is."""
    return next((p for p in points if p.get(key) is not None and p[key] <= target), None)
