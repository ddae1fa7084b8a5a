"""The evaluation driver: `evaluate(loaded, datasets, reference)` scores one model on named splits.

Splits are named `forget`, `retain`, `holdout`, `real_authors`, `world_facts` (`ROLES`; other names
are allowed and treated like retain). Each split is sampled (seeded, `EvalConfig.max_items`), every registered
per-example metric is computed on it (inputs lazily, once), then every summary metric across splits;
a metric that cannot run on the input is skipped with its reason. The result is a `Report`.
"""

from __future__ import annotations

import datetime
import random
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import suppress

import numpy as np

from simu_core import data as qa
from simu_core import versions
from simu_core.config import to_dict
from simu_core.errors import SimuError
from simu_core.metrics.inputs import Clock, EvalConfig, MetricSkipped, SplitInputs, SummaryContext
from simu_core.metrics.mia import MIA_ATTACKS
from simu_core.metrics.registry import EXAMPLE_METRICS, SUMMARY_METRICS
from simu_core.metrics.results import REPORT_FORMAT, Report, SplitResult

ROLES = ("forget", "retain", "holdout", "real_authors", "world_facts")
EXACT_MATCH_RULES = ("first_answer", "whole")  # EvalConfig.exact_match

Progress = Callable[[str, float], None]


def _no_progress(message: str, fraction: float) -> None:
    pass


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
        self.cfg, self.reference, self.clock = cfg, reference, Clock()
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
            raise MetricSkipped(
                "no reference model: pass the retain model (e.g. builtin:retain10 for forget10); a pretrained "
                "model's own knowledge (builtin:smollm2/...) has none, as no copy pretrained without it exists"
            )
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


def _check_inputs(loaded, datasets: dict[str, qa.QADataset], reference, cfg: EvalConfig) -> None:
    if not datasets:
        raise SimuError("no data to evaluate on: pass at least a 'forget' split (e.g. builtin:forget10).")
    for name, dataset in datasets.items():
        if not len(dataset):
            raise SimuError(f"split '{name}' ({dataset.name}) is empty; give it at least one question/answer row.")
    unknown = [m for m in cfg.metrics or [] if m not in EXAMPLE_METRICS and m not in SUMMARY_METRICS]
    if unknown:
        raise SimuError(f"unknown metric(s) {unknown}. Choose from: {', '.join([*EXAMPLE_METRICS, *SUMMARY_METRICS])}.")
    if cfg.exact_match not in EXACT_MATCH_RULES:
        raise SimuError(f"unknown exact match rule '{cfg.exact_match}'. Choose one of: {', '.join(EXACT_MATCH_RULES)}.")
    for attack in (cfg.privleak_attack, cfg.mia_score_attack):
        if attack not in MIA_ATTACKS:
            raise SimuError(f"unknown membership attack '{attack}'. Choose one of: {', '.join(MIA_ATTACKS)}.")
    if isinstance(reference, Report) and reference.format != REPORT_FORMAT:
        raise SimuError(
            f"the reference report was written with metrics format {reference.format} (now {REPORT_FORMAT}: "
            "the definitions changed since), so its values do not compare; re-evaluate the reference model"
        )
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

    datasets: {"forget": ..., "retain": ..., "holdout": ..., "real_authors": ..., "world_facts": ...}
    (any subset; other names are evaluated like retain). reference: the retain reference model (a LoadedModel with the
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
        versions=versions("torch", "transformers", "numpy", "scipy"),
        seconds=seconds,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
