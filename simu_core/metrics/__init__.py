"""Evaluation metrics (a registry) and the evaluation report, before and after unlearning.

`evaluate(loaded, datasets, reference)` scores one model on named question/answer splits
(`forget`, `retain`, `holdout`, `real_authors`, `world_facts`; other names are allowed and treated
like retain) and returns a `Report` with every per-example value, the split summaries and the cross-split
numbers (forget quality, model utility, membership inference). `compare(before, after)` gives
the deltas; `simu_core.report` renders them as a self-contained HTML page, and
`simu_core.evaluation` loads models, data and runs by their specs and evaluates them.

Metric families (definitions: /work/shared/references.md section 5, TOFU / MUSE / Min-K% /
Min-K%++ / LUME):
- generation (`text`, `simu_core.answers`): greedy answers (stopping at a newline for completion-style
  prompt formats), ROUGE-L recall (rouge_score's tokens with its Porter stemmer, as TOFU / MUSE; LCS
  computed here), exact match (the answer's first sentence(s), normalised; or LUME's whole-answer
  rule) and the answer-contained rate;
- likelihood (`likelihood`): length-normalised answer probability p(a|q)^(1/|a|) (answer + EOS),
  exact memorisation (teacher-forced token accuracy) and extraction strength (answer tokens only);
- truth_ratio (`likelihood`): TOFU's R = P(perturbed) / P(true answer) (the paraphrase on forget /
  retain, the original answer on real authors / world facts; geometric mean over the perturbed
  answers, as TOFU's code), and p(true) / (p(true) + sum p(perturbed));
- membership (`mia`): per-example LOSS, zlib, Min-K% and Min-K%++ scores, their forget-vs-holdout
  AUC, PrivLeak and LUME's MIA score;
- fluency: repetition rate of the generations (`text`) and perplexity of the answers;
- summary (`likelihood`): forget quality (KS p-value against the retain reference), model utility
  (TOFU's 9 components on retain / real authors / world facts, those of the splits given).

Teacher-forced statistics are computed in batches (one forward per batch gives every
per-token quantity the metrics need); generation goes through `models.greedy_answers`.

The package, bottom (first) to top (last); each module imports only modules listed before it:

    text, mia          pure formulas on strings and arrays
    likelihood         teacher-forced token statistics (data) and the TOFU formulas
    inputs             EvalConfig, SplitInputs (lazy per-split inputs), SummaryContext, MetricSkipped
    registry           EXAMPLE_METRICS / SUMMARY_METRICS, @example_metric / @summary_metric, goal_of
    suite              the built-in metrics, registered in report order
    results            Report, SplitResult, Delta, compare
    driver             evaluate(), the driver: samples the splits, runs every metric, builds the Report

Adding a metric is one function plus its decorator line (`@example_metric` for per-example
values, `@summary_metric` for one number across splits); see `suite`.
"""

from __future__ import annotations

from simu_core.metrics import suite  # registers the built-in metrics (before anything reads the registries)
from simu_core.metrics.driver import ROLES, Progress, evaluate, same_tokenizer, sample_indices
from simu_core.metrics.inputs import EvalConfig, MetricSkipped, SplitInputs, SummaryContext
from simu_core.metrics.likelihood import (
    UTILITY_COMPONENTS,
    TokenStats,
    exact_memorization,
    extraction_strength,
    forget_quality,
    harmonic_mean,
    token_stats,
    truth_ratio_score,
    truth_ratio_values,
)
from simu_core.metrics.mia import MIA_ATTACKS, mia_score, min_k_score, privleak, roc_auc, zlib_score
from simu_core.metrics.registry import (
    EXAMPLE_METRICS,
    SUMMARY_METRICS,
    ExampleMetric,
    SummaryMetric,
    example_metric,
    goal_of,
    summary_metric,
)
from simu_core.metrics.results import REPORT_FORMAT, Delta, Report, SplitResult, compare
from simu_core.metrics.text import lcs_length, repetition_rate, rouge_l_recall, rouge_tokens, same_answer

__all__ = [
    "EXAMPLE_METRICS",
    "MIA_ATTACKS",
    "REPORT_FORMAT",
    "ROLES",
    "SUMMARY_METRICS",
    "UTILITY_COMPONENTS",
    "Delta",
    "EvalConfig",
    "ExampleMetric",
    "MetricSkipped",
    "Progress",
    "Report",
    "SplitInputs",
    "SplitResult",
    "SummaryContext",
    "SummaryMetric",
    "TokenStats",
    "compare",
    "evaluate",
    "exact_memorization",
    "example_metric",
    "extraction_strength",
    "forget_quality",
    "goal_of",
    "harmonic_mean",
    "lcs_length",
    "mia_score",
    "min_k_score",
    "privleak",
    "repetition_rate",
    "roc_auc",
    "rouge_l_recall",
    "rouge_tokens",
    "same_answer",
    "same_tokenizer",
    "sample_indices",
    "suite",
    "summary_metric",
    "token_stats",
    "truth_ratio_score",
    "truth_ratio_values",
    "zlib_score",
]
