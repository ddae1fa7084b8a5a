"""The evaluation report's data model: `Report` (one model evaluated), `SplitResult` (one split's
per-example values), and `compare(before, after)` giving a `Delta` per summary key.

A report is saved as JSON (NaN/inf as null) and read back with `Report.load`; `simu_core.report`
renders one or two of them as an HTML page.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simu_core.config import from_dict
from simu_core.errors import SimuError
from simu_core.metrics.registry import goal_of

# 2: PrivLeak with MUSE's 1 - AUC_ref denominator, Min-K% / Min-K%++ / EM / ES without the EOS, stemmed
# ROUGE-L, the original answer in the world-facts truth ratio, first-answer exact match (issue 14).
REPORT_FORMAT = 2


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
