"""The metric registries: per-example metrics and summary metrics, by name, in registration order.

A per-example metric is `fn(SplitInputs) -> [N] values` registered with `@example_metric` (with its
family, its goal on the forget split and on the others, and how the values become the split's
number); a summary metric is `fn(SummaryContext) -> float` registered with `@summary_metric`. The
order of registration is the order of the report's keys. The built-in metrics register themselves
in `metrics.suite`; `goal_of` reads a report key's goal back from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simu_core.metrics.inputs import SplitInputs, SummaryContext

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


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


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
