"""The quality benchmark: every unlearning method at its preset on a benchmark (`BENCHMARKS`): the
built-in fictitious authors (below), or the real-knowledge benchmark on SmolLM2 (no retain reference;
forget Asia's capitals, keep Europe's; its presets are tuned on `other_capitals`, never reported).

A *cell* is one (split, method, seed): unlearn `builtin:<split>` (retain: the matching
`builtin:retainXX`) from `builtin:full` with the method's preset and the cell's seed, then evaluate
the result with the metrics suite (`metrics.evaluate`: forget, retain, holdout and world-facts
splits, the retain reference model as the gold standard). Per split there are two reference rows:
the original model (`original`) and the retain reference itself (`retain_reference`, forget
quality 1 by definition).

Resumable: each finished cell is written at once to `<out>/quality/cells/<split>__<method>__seed<N>.json`
(atomically) with a key that hashes everything that determines it (unlearning config, evaluation
config, fingerprints of the base and reference models); a later run skips cells whose file carries
the current key and recomputes the others (changed presets or a rebuilt model make old cells stale).

Outputs (`run_quality`): `<out>/quality.json` (settings, every cell record, mean/std per split x
method), `<out>/quality.md` (the table and a matched-efficacy verdict) and `<out>/quality.html`
(self-contained plotly figures from `figures.quality_figures`: forget quality vs model utility,
forget EM vs retain EM, one point per run, the two reference rows as reference points).

The presets were tuned with seed `TUNING_SEED` (0); the table uses other seeds (1, 2, 3 by default).

Three options make it issue 17's fair test (`QualityConfig`): `tuned`, every method at its pick from one
equal grid (`bench/tune_equal.py`, `read_tuned`) instead of its preset; `stop="muse"`, each run ends at
MUSE's matched-forgetting point (the forget set's greedy ROUGE-L at or below the retain reference's,
`unlearn.forget_rouge` on both) instead of the preset's forget-EM target; `relearn`, every cell (the
reference rows too) also takes the relearning attack (`relearn.relearning_attack`, the benchmark's
`relearn` settings): what comes back on the held-out half of the forget set after a few steps on the other.

Tables of one protocol on different base models (the two-stage built-ins' seeds) pool with `write_pooled`
(`bench pool`): paired differences per (base, split) block, with a t-interval over the blocks.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from simu_core import data as qa
from simu_core import figures
from simu_core.config import to_dict
from simu_core.errors import SimuError
from simu_core.evaluation import builtin_companions, default_reference
from simu_core.metrics import EvalConfig, Report, evaluate
from simu_core.relearn import RelearnConfig, relearning_attack

QUALITY_METHODS = ("simu", "so_graddiff", "fo_graddiff", "ga", "npo", "random_mask")
# the real-knowledge table's default: both SIMU variants with their controls, and the unmasked GradDiffs
KNOWLEDGE_METHODS = ("simu", "random_mask", "simu_paper", "random_mask_paper", "so_graddiff", "fo_graddiff")
QUALITY_SPLITS = ("forget01", "forget05", "forget10")
# (method, other) pairs the verdicts compare where both ran: each SIMU variant against SOUL and its random-mask
# control; the paired intervals add FO-GradDiff.
VERDICT_PAIRS = (
    ("simu", "so_graddiff"), ("simu", "random_mask"),
    ("simu_paper", "so_graddiff"), ("simu_paper", "random_mask_paper"),
)  # fmt: skip
PAIRED_COMPARISONS = (
    ("simu", "random_mask"), ("simu", "so_graddiff"), ("simu", "fo_graddiff"),
    ("simu_paper", "random_mask_paper"), ("simu_paper", "so_graddiff"), ("simu_paper", "fo_graddiff"),
)  # fmt: skip
REFERENCE_ROWS = ("original", "retain_reference")
STOPS = ("em", "muse")  # a method cell's early stop: its preset's forget-EM target, or MUSE's rule (see module doc)
# a random-mask control runs at its method's settings
CONTROL_OF = {"random_mask": "simu", "random_mask_paper": "simu_paper"}
TUNING_SEED = 0  # the seed the presets in simu_core/unlearn.py were tuned with
# Bump when a cell's meaning changes, so old cell files count as stale. 2: the metric fixes of issue 14
# (PrivLeak's denominator, EOS out of Min-K% / EM / ES, stemmed ROUGE-L, the world-facts truth ratio on
# the original answer, first-answer exact match in the metrics and in the early stop).
BENCH_FORMAT = 2

# (flat summary key, column title, digits) of the Markdown table; goals come from metrics.goal_of.
# Run facts, not quality: no goal, no paired interval.
RUN_COLUMNS = ("unclipped_mean", "reached_target", "steps_done", "unlearn_seconds")
TABLE_COLUMNS = (
    ("forget/exact_match", "forget EM ↓", 3),
    ("forget/answer_contained", "forget contained ↓", 3),
    ("forget/rouge_l", "forget ROUGE-L ↓", 3),
    ("forget/fact_probe", "forget fact probe ↓", 3),  # cells computed before the metric existed show "–"
    ("log10_forget_quality", "log10 forget quality ↑", 2),
    ("model_utility", "model utility ↑", 3),
    ("retain/exact_match", "retain EM ↑", 3),
    ("retain/rouge_l", "retain ROUGE-L ↑", 3),
    ("world_facts/exact_match", "world facts EM ↑", 3),
    ("privleak", "PrivLeak (→0)", 1),
    ("relearn/heldout_after", "relearned held-out ↓", 3),  # only with the relearning attack (`--relearn`)
    ("unclipped_mean", "Sophia unclipped", 4),
    ("reached_target", "stop reached", 2),  # share of the seeds whose run met its forget target (not the budget)
    ("steps_done", "steps", 0),
    ("unlearn_seconds", "unlearn s", 1),
)
# The real-knowledge benchmark's table: no retain reference (so no forget quality or PrivLeak) and no
# holdout; what is kept is read on the retain facts, the forget entities' other facts and everything else.
KNOWLEDGE_COLUMNS = (
    ("forget/knows", "forget known ↓", 3),
    ("forget/knows_paraphrased", "forget known, paraphrased ↓", 3),
    ("forget/exact_match", "forget EM ↓", 3),
    ("forget/prob", "forget prob ↓", 3),
    ("retain/knows", "retain known ↑", 3),
    ("model_utility", "utility (retain) ↑", 3),
    ("neighbour/knows", "neighbour known ↑", 3),
    ("general/knows", "general known ↑", 3),
    ("other_capitals/knows", "other capitals known ↑", 3),
    ("relearn/heldout_after", "relearned held-out ↓", 3),
    ("unclipped_mean", "Sophia unclipped", 4),
    ("reached_target", "stop reached", 2),
    ("steps_done", "steps", 0),
    ("unlearn_seconds", "unlearn s", 1),
)
MATCH_TOLERANCE = 0.05  # forget EM above the best method's by at most this counts as "matched efficacy"
KNOWLEDGE_FORMAT = 1  # bump when the real-knowledge cells change meaning (their stop and "knows" rule)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

Progress = Callable[[str, float], None]


def _no_progress(message: str, fraction: float) -> None:
    pass


@dataclass(frozen=True)
class Benchmark:
    """What a quality table runs on: a base model, its forget splits, and per split the data specs
    (`data(split)`: forget, retain, then the other evaluated splits) and the retain reference model
    (`reference(split)`, None where none can exist). `splits` are the ones run by default; `held_out_splits`
    are reported when asked for (`--splits`; forget sets no preset was tuned on); `tuning_splits` are valid
    too but only for tuning the presets (never reported)."""

    name: str
    base: str
    splits: tuple[str, ...]
    data: Callable[[str], dict[str, str]]
    reference: Callable[[str], str | None]
    columns: tuple = TABLE_COLUMNS
    tuning_splits: tuple[str, ...] = ()
    held_out_splits: tuple[str, ...] = ()
    title: str = ""
    forget_metric: str = "forget/exact_match"  # what "matched forgetting" compares
    retain_metric: str = "retain/exact_match"
    relearn: RelearnConfig = field(default_factory=lambda: RelearnConfig(steps=10, lr=1e-3))  # the attack's settings
    answer_tokens: int = 32  # the greedy answers' length in the table's evaluation (tokens)

    def check_split(self, split: str) -> None:
        if split not in (*self.splits, *self.held_out_splits, *self.tuning_splits):
            choices = ", ".join((*self.splits, *self.held_out_splits, *self.tuning_splits))
            raise SimuError(f"unknown split '{split}' for the {self.name} benchmark. Choose from: {choices}.")

    @property
    def reference_rows(self) -> tuple[str, ...]:
        """`original` always; `retain_reference` where the benchmark has retain references."""
        has_reference = any(self.reference(s) for s in self.splits)
        return REFERENCE_ROWS if has_reference else REFERENCE_ROWS[:1]


def _builtin_data(split: str) -> dict[str, str]:
    return builtin_companions(f"builtin:{split}")


def _knowledge_data(split: str) -> dict[str, str]:
    return builtin_companions(f"builtin:smollm2/{split}")


BENCHMARKS: dict[str, Benchmark] = {
    "builtin": Benchmark(
        "builtin", "builtin:full", QUALITY_SPLITS, _builtin_data,
        lambda split: default_reference("builtin:full", f"builtin:{split}"),
        held_out_splits=tuple(s for s in qa.DISJOINT_SPLITS if s.startswith("forget")),
        title="built-in benchmark (fictitious authors)",
    ),
    "smollm2": Benchmark(
        "smollm2", "builtin:smollm2", ("forget",), _knowledge_data, lambda split: None,
        columns=KNOWLEDGE_COLUMNS, tuning_splits=("other_capitals",),
        forget_metric="forget/knows", retain_metric="retain/knows",
        relearn=RelearnConfig(steps=10, lr=1e-5, max_new_tokens=12), answer_tokens=12,
        title="real-knowledge benchmark (SmolLM2-135M-Instruct: forget Asia's capitals, keep Europe's)",
    ),
}  # fmt: skip


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise SimuError(f"unknown benchmark '{name}'. Choose one of: {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name]


@dataclass
class QualityConfig:
    """What the quality table covers and how it is evaluated.

    `seeds`: unlearning seeds of the cells (never `TUNING_SEED` by default); `tuned`: {method: settings}
    applied on top of its preset (the equal grid's picks, `read_tuned`); `overrides`: settings applied on
    top of every method's (e.g. {"steps": 2} for a smoke test; both enter each cell's key); `stop`: "em"
    (each preset's forget-EM target) or "muse" (MUSE's matched-forgetting point); `relearn`: also run the
    relearning attack on every cell; `root`: the built-in cache folder (None: $SIMU_HOME/builtin); `out`: where the
    results go; `device`: unlearning and evaluation device (None: best available); `benchmark`: a
    name in `BENCHMARKS` (the built-in authors, or the real-knowledge one on SmolLM2).
    """

    splits: list[str] = field(default_factory=lambda: list(QUALITY_SPLITS))
    methods: list[str] = field(default_factory=lambda: list(QUALITY_METHODS))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_items=200, max_new_tokens=32))
    overrides: dict = field(default_factory=dict)
    root: str | None = None
    out: str = "results"
    device: str | None = None
    benchmark: str = "builtin"
    tuned: dict[str, dict] = field(default_factory=dict)
    stop: str = "em"
    relearn: bool = False

    def __post_init__(self) -> None:
        if self.stop not in STOPS:
            raise SimuError(f"unknown stop '{self.stop}'. Choose one of: {', '.join(STOPS)}.")
        if self.stop == "muse" and not all(self.bench.reference(split) for split in self.splits):
            raise SimuError(f"the {self.benchmark} benchmark has no retain reference, so MUSE's stop (the forget "
                            "set's ROUGE-L at the reference's) cannot be read there: use the default stop (em).")  # fmt: skip

    @property
    def bench(self) -> Benchmark:
        return get_benchmark(self.benchmark)


@dataclass(frozen=True)
class Cell:
    """One entry of the table: a split, a method (or a reference row) and a seed (None for references)."""

    split: str
    method: str
    seed: int | None = None

    @property
    def name(self) -> str:
        return f"{self.split}__{self.method}" + ("" if self.seed is None else f"__seed{self.seed}")


@dataclass
class QualityResult:
    """What `run_quality` did: the records (one per cell, references included), what it computed,
    skipped (stored before) and left out (not stored, with `stored_only`), the aggregate, the files written."""

    records: list[dict]
    computed: list[str]
    skipped: list[str]
    aggregate: dict
    files: dict[str, str]
    seconds: float
    left_out: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Cells: config, key, file
# --------------------------------------------------------------------------------------------


def cell_config(cell: Cell, qc: QualityConfig, stop_rouge: float | None = None):
    """The `UnlearnConfig` of a method cell: the method's preset (for the benchmark's model) with its tuned
    settings, the split's forget and retain data, the cell's seed; with `qc.stop == "muse"`, no forget-EM
    target but `stop_rouge` (the retain reference's forget ROUGE-L, `_Context.muse_target`) as the stop."""
    from simu_core.methods import preset_config

    bench = qc.bench
    bench.check_split(cell.split)
    data = bench.data(cell.split)
    config = preset_config(
        cell.method,
        **{
            **qc.tuned.get(cell.method, {}),
            **qc.overrides,
            "model": bench.base,
            "forget": data["forget"],
            "retain": data["retain"],
            "seed": cell.seed,
            "device": qc.device,
        },
    )
    if qc.stop == "muse":
        config.stop_forget_em, config.stop_forget_rouge = None, stop_rouge
    return config


def cell_key(cell: Cell, qc: QualityConfig, fingerprints: dict[str, str], stop_rouge: float | None = None) -> str:
    """sha256 over everything that determines a cell's numbers (config, eval settings, models, attack)."""
    # `later` settings at their defaults are left out of to_dict, so older keys stay valid
    unlearn = to_dict(cell_config(cell, qc, stop_rouge)) if cell.seed is not None else None
    payload = {"format": BENCH_FORMAT, "cell": cell.name, "unlearn": unlearn, "eval": to_dict(qc.eval),
               "models": fingerprints}  # fmt: skip
    if qc.benchmark != "builtin":  # the built-in's keys stay as they were before other benchmarks existed
        payload["benchmark"] = [qc.benchmark, KNOWLEDGE_FORMAT]
    if qc.relearn:  # likewise the keys of tables without the attack
        payload["relearn"] = to_dict(qc.bench.relearn)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_tuned(path: str | Path, methods: Sequence[str]) -> dict[str, dict]:
    """{method: its pick's settings, with the grid's step budget} from `bench/tune_equal.py`'s JSON; a
    random-mask control takes its method's pick. Raises SimuError when the file cannot be read or has no
    pick for one of `methods`."""
    try:
        tuning = json.loads(Path(path).read_text(encoding="utf-8"))
        picks, steps = tuning["picks"], tuning["settings"]["steps"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SimuError(f"cannot read the tuning picks in {path} ({error}): give the JSON that "
                        "bench/tune_equal.py writes.") from error  # fmt: skip
    missing = [m for m in methods if picks.get(CONTROL_OF.get(m, m)) is None]
    if missing:
        raise SimuError(f"{path} has no pick for {', '.join(missing)}: tune it first (bench/tune_equal.py --methods "
                        f"{','.join(dict.fromkeys(CONTROL_OF.get(m, m) for m in missing))}) or leave it out.")  # fmt: skip
    return {m: {**picks[CONTROL_OF.get(m, m)], "steps": steps} for m in methods}


def cells_dir(out: str | Path) -> Path:
    return Path(out) / "quality" / "cells"


def read_cell(out: str | Path, cell: Cell) -> dict | None:
    """The stored record of `cell`, or None when there is none (or it cannot be read)."""
    path = cells_dir(out) / f"{cell.name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_cell(out: str | Path, record: dict) -> Path:
    """Write one cell record atomically (an interrupted run never leaves a half-written cell)."""
    from simu_core.runs import write_json_atomic

    folder = cells_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['cell']}.json"
    write_json_atomic(path, record)
    return path


def plan_cells(qc: QualityConfig) -> list[Cell]:
    """Reference rows first, then every split x method x seed, split by split."""
    for split in qc.splits:
        qc.bench.check_split(split)
    from simu_core.methods import get_method

    for method in qc.methods:
        get_method(method)
    cells = []
    for split in qc.splits:
        cells += [Cell(split, row) for row in qc.bench.reference_rows]
        cells += [Cell(split, method, seed) for method in qc.methods for seed in qc.seeds]
    return cells


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Context:
    """Models, data and reference reports of one `run_quality` call, loaded lazily and shared by cells."""

    def __init__(self, qc: QualityConfig, progress: Progress):
        from simu_core.models import load_model
        from simu_core.runs import model_fingerprint

        self.qc, self.bench, self.progress = qc, qc.bench, progress
        self.base = load_model(self.bench.base, device=qc.device, dtype=torch.float32, root=qc.root)
        self.fingerprints = {self.bench.base: model_fingerprint(self.base.model)}
        self._refs: dict[str, object] = {}
        self._ref_reports: dict[str, Report] = {}
        self._data: dict[str, dict[str, qa.QADataset]] = {}
        self._masks: dict[tuple[str, str], object] = {}
        self._targets: dict[str, float] = {}

    def reference(self, split: str):
        """The retain reference model of `split` (builtin:retainXX), float32; None where there is none."""
        from simu_core.models import load_model
        from simu_core.runs import model_fingerprint

        spec = self.bench.reference(split)
        if spec is not None and spec not in self._refs:
            self._refs[spec] = load_model(spec, device=self.qc.device, dtype=torch.float32, root=self.qc.root)
            self.fingerprints[spec] = model_fingerprint(self._refs[spec].model)
        return self._refs.get(spec) if spec else None

    def fingerprints_for(self, split: str) -> dict[str, str]:
        self.reference(split)
        specs = [self.bench.base, self.bench.reference(split)]
        return {spec: self.fingerprints[spec] for spec in specs if spec}

    def datasets(self, split: str) -> dict[str, qa.QADataset]:
        """The split's evaluated data by role (forget, retain, then the benchmark's others)."""
        if split not in self._data:
            specs = self.bench.data(split)
            self._data[split] = {role: qa.load_data(spec, root=self.qc.root) for role, spec in specs.items()}
        return self._data[split]

    def reference_report(self, split: str) -> Report | None:
        """The retain reference evaluated against itself: its row, and the reference every cell is scored
        against (None where the benchmark has no reference)."""
        ref = self.reference(split)
        if ref is not None and split not in self._ref_reports:
            self._ref_reports[split] = evaluate(ref, self.datasets(split), ref, self.qc.eval)
        return self._ref_reports.get(split)

    def muse_target(self, split: str) -> float | None:
        """The retain reference's greedy ROUGE-L on `split`'s forget set (`unlearn.forget_rouge`, what the
        early stop measures): MUSE's matched-forgetting point. None unless the table stops there."""
        from simu_core.unlearn import forget_rouge

        if self.qc.stop != "muse":
            return None
        if split not in self._targets:
            ref = self.reference(split)  # there is one: QualityConfig checks it
            self._targets[split] = forget_rouge(ref, ref.model, self.datasets(split)["forget"])
        return self._targets[split]

    def relearned(self, loaded, model, split: str) -> dict:
        """The relearning attack's shares on `split`'s forget set as metrics ("relearn/heldout_after", ...);
        {} unless the table asks for it."""
        if not self.qc.relearn:
            return {}
        row = relearning_attack(loaded, model, self.datasets(split)["forget"], self.bench.relearn)
        return {f"relearn/{name}": row[name] for name in ("heldout_before", "heldout_after", "trained_after")}

    def mask(self, split: str, config):
        """SIMU's selected mask for `split` (attribution runs once per split and mask setting)."""
        from simu_core.unlearn import compute_mask

        key = (split, json.dumps(to_dict(config.mask), sort_keys=True))
        if key not in self._masks:
            data = self.datasets(split)
            self._masks[key] = compute_mask(self.base, data["forget"], data["retain"], config.mask)
        return self._masks[key]


def _record(cell: Cell, key: str, report: Report, extra: dict, relearned: dict) -> dict:
    summary = {**report.summary, **relearned}
    fq = summary.get("forget_quality")
    summary["log10_forget_quality"] = math.log10(max(fq, 1e-300)) if fq is not None else None
    return _json_safe({
        "cell": cell.name, "split": cell.split, "method": cell.method, "seed": cell.seed, "key": key,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": summary, "notes": report.notes, "skipped": report.skipped,
        "n_items": {name: len(split.indices) for name, split in report.splits.items()}, "eval_seconds": report.seconds.get("total"),
        "items": item_outcomes(report), **extra,
    })  # fmt: skip


ITEM_SHARES = ("knows", "exact_match")  # per-item 0/1 outcomes kept in each cell, for paired intervals


def item_outcomes(report: Report) -> dict[str, dict[str, list]]:
    """{role: {"indices": the evaluated items' positions, "<share>": one 0/1 per item}} for each share of
    `ITEM_SHARES` the report has: what pairing two methods' answers item by item needs."""
    out = {}
    for role, split in report.splits.items():
        shares = {name: [None if v is None else int(v) for v in split.values[name]]
                  for name in ITEM_SHARES if name in split.values}  # fmt: skip
        if shares:
            out[role] = {"indices": list(split.indices), **shares}
    return out


def run_reference_cell(cell: Cell, ctx: _Context, key: str) -> dict:
    """Evaluate the original model or the retain reference of `cell.split`."""
    ref_report = ctx.reference_report(cell.split)
    if cell.method == "retain_reference":
        report, loaded = ref_report, ctx.reference(cell.split)
    else:
        report, loaded = evaluate(ctx.base, ctx.datasets(cell.split), ref_report, ctx.qc.eval), ctx.base
    extra = {"status": "ok", "model": loaded.spec, "steps_done": 0, "unlearn_seconds": 0.0}
    return _record(cell, key, report, extra, ctx.relearned(loaded, loaded.model, cell.split))


def run_method_cell(cell: Cell, ctx: _Context, key: str) -> dict:
    """Unlearn at the preset (or the tuned pick) with the cell's seed, then evaluate against the retain
    reference (and attack, with `relearn`)."""
    from simu_core.methods import get_method
    from simu_core.unlearn import unlearn

    config = cell_config(cell, ctx.qc, ctx.muse_target(cell.split))
    data = ctx.datasets(cell.split)
    mask = ctx.mask(cell.split, config) if get_method(cell.method).mask is not None else None
    result = unlearn(ctx.base, data["forget"], data["retain"], config, mask=mask)
    summary = result.summary()
    report = evaluate(result.model, data, ctx.reference_report(cell.split), ctx.qc.eval)
    extra = {
        "status": result.status, "stop_reason": result.stop_reason, "error": result.error,
        "reached_target": float(result.stop_reason == "forget_target"),
        "steps_done": summary["steps_done"], "unlearn_seconds": summary["seconds"],
        "train_forget_em": summary["forget_em"], "mask_neurons": summary["mask_neurons"],
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "device": summary["device"], "config": to_dict(config),
        "unclipped_mean": summary["unclipped_mean"],  # Sophia's share of unclipped coordinates (None: AdamW)
    }  # fmt: skip
    relearned = ctx.relearned(result.model, result.model.model, cell.split)
    del result
    return _record(cell, key, report, extra, relearned)


def run_quality(
    qc: QualityConfig, progress: Progress = _no_progress, fresh: bool = False, stored_only: bool = False
) -> QualityResult:
    """Run (or resume) the quality table and write quality.json / quality.md / quality.html under `qc.out`.

    Cells whose stored record carries the current key are skipped unless `fresh`. With `stored_only`
    nothing is computed: the outputs are written from the stored cells, and the others are left out
    (listed in the result and on the Markdown page). `progress` receives one line per cell (with an
    ETA) and its fraction of the cells done.
    """
    start = time.perf_counter()
    cells = plan_cells(qc)
    progress(f"loading models and data ({len(cells)} cells)", 0.0)
    ctx = _Context(qc, progress)
    records, computed, skipped, left_out = [], [], [], []
    spent: list[float] = []
    for i, cell in enumerate(cells):
        key = cell_key(cell, qc, ctx.fingerprints_for(cell.split), ctx.muse_target(cell.split))
        stored = None if fresh else read_cell(qc.out, cell)
        if stored is not None and stored.get("key") == key:
            records.append(stored)
            skipped.append(cell.name)
            progress(f"[{i + 1}/{len(cells)}] {cell.name}: done before, skipped", (i + 1) / len(cells))
            continue
        if stored_only:
            left_out.append(cell.name)
            progress(f"[{i + 1}/{len(cells)}] {cell.name}: not stored (or stale), left out", (i + 1) / len(cells))
            continue
        t0 = time.perf_counter()
        run = run_reference_cell if cell.seed is None else run_method_cell
        record = run(cell, ctx, key)
        write_cell(qc.out, record)
        records.append(record)
        computed.append(cell.name)
        spent.append(time.perf_counter() - t0)
        left = sum(1 for c in cells[i + 1 :] if c.seed is not None)
        eta = left * float(np.mean(spent[-6:]))
        m = record["metrics"]
        progress(
            f"[{i + 1}/{len(cells)}] {cell.name}: {record['status']} ({record.get('stop_reason') or '-'}, "
            f"{record['steps_done']} steps, {spent[-1]:.0f} s); {qc.bench.forget_metric} {_fmt(m.get(qc.bench.forget_metric), 3)}, "
            f"utility {_fmt(m.get('model_utility'), 3)}; ETA {eta / 60:.1f} min",
            (i + 1) / len(cells),
        )
    aggregate = aggregate_records(records, [c[0] for c in qc.bench.columns])
    meta = {**describe_run(qc, time.perf_counter() - start), "left_out": left_out}
    files = write_outputs(qc.out, records, aggregate, meta, qc)
    return QualityResult(records, computed, skipped, aggregate, files, time.perf_counter() - start, left_out)


def describe_run(qc: QualityConfig, seconds: float) -> dict:
    """Settings, versions and machine of this run (saved in quality.json and printed in the Markdown)."""
    import transformers

    from simu_core.builtin import read_manifest
    from simu_core.models import resolve_model_source

    device = torch.device(qc.device) if qc.device else None
    if device is None:
        from simu_core.models import pick_device

        device = pick_device()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    manifest = {}
    if qc.benchmark == "builtin":
        manifest = read_manifest(Path(resolve_model_source("builtin:full", qc.root)).parents[1]) or {}
    return {
        "benchmark": qc.benchmark,
        "root": qc.root,
        "command": "python -m simu_core " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else None,
        "splits": qc.splits, "methods": qc.methods, "seeds": qc.seeds, "tuning_seed": TUNING_SEED,
        "eval": to_dict(qc.eval), "overrides": qc.overrides, "tuned": qc.tuned, "stop": qc.stop,
        "relearn": to_dict(qc.bench.relearn) if qc.relearn else None,
        "builtin": {"n_authors": manifest.get("config", {}).get("n_authors"),
                    "model": manifest.get("config", {}).get("model"), "exact_match": manifest.get("exact_match")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"device": str(device), "gpu": gpu, "cpu": platform.processor() or platform.machine(),
                    "cpu_count": _cpu_count(), "torch_threads": torch.get_num_threads(), "os": platform.platform()},
        "preset_notes": _preset_notes(),
        "seconds": round(seconds, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _preset_notes() -> str | None:
    from simu_core import unlearn

    return getattr(unlearn, "PRESET_NOTES", None)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _value(record: dict, metric: str) -> float | None:
    if metric in record.get("metrics", {}):
        return record["metrics"][metric]
    return record.get(metric)


def aggregate_records(records: Sequence[dict], metrics: Sequence[str] | None = None) -> dict:
    """Mean and sample std (ddof=1; 0 for one run) per split x method x metric.

    Returns {split: {method: {"n": runs, "failed": runs not ok, metric: {"mean", "std", "n"}}}};
    missing (None) values are left out of that metric's mean.
    """
    metrics = list(metrics or [c[0] for c in TABLE_COLUMNS])
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["split"], record["method"]), []).append(record)
    out: dict = {}
    for (split, method), group in groups.items():
        row: dict = {"n": len(group), "failed": sum(r.get("status") != "ok" for r in group)}
        for metric in metrics:
            values = np.array([v for r in group if (v := _value(r, metric)) is not None], dtype=float)
            if len(values) == 0:
                row[metric] = {"mean": None, "std": None, "n": 0}
                continue
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            row[metric] = {"mean": float(values.mean()), "std": std, "n": len(values)}
        out.setdefault(split, {})[method] = row
    return out


def matched_verdict(
    split_rows: dict,
    tolerance: float = MATCH_TOLERANCE,
    forget: str = "forget/exact_match",
    retain: str = "retain/exact_match",
) -> dict:
    """Which method keeps the most utility among those that forget about as well as the best one.

    Methods whose mean `forget` score (EM by default) is within `tolerance` of the lowest method mean are
    "matched"; among them the winners by model utility and by `retain`. Each pair of `VERDICT_PAIRS` that ran
    is compared (key "<method>_vs_<other>"): a difference counts as clear when it exceeds twice its standard
    error (sqrt(s_a^2/n_a + s_b^2/n_b)), else it is a tie.
    """
    methods = {
        m: r for m, r in split_rows.items() if m not in REFERENCE_ROWS and r.get(forget, {}).get("mean") is not None
    }
    if not methods:
        return {}
    best_forget = min(r[forget]["mean"] for r in methods.values())
    matched = sorted(m for m, r in methods.items() if r[forget]["mean"] <= best_forget + tolerance)
    verdict: dict = {"best_forget_em": best_forget, "matched": matched}
    for metric in ("model_utility", retain):
        scored = [(methods[m][metric]["mean"], m) for m in matched
                  if metric in methods[m] and methods[m][metric]["mean"] is not None]  # fmt: skip
        verdict[f"best_{metric}"] = max(scored)[1] if scored else None
    for method, other in VERDICT_PAIRS:
        if method in methods and other in methods:
            verdict[f"{method}_vs_{other}"] = {
                metric: compare_means(methods[method][metric], methods[other][metric])
                for metric in (forget, "model_utility", retain)
                if metric in methods[method] and metric in methods[other]
            }
    return verdict


def compare_means(a: dict, b: dict) -> dict:
    """a - b with its standard error and a word: 'higher', 'lower' or 'tie' (|d| <= 2 SE)."""
    if a["mean"] is None or b["mean"] is None:
        return {"diff": None, "se": None, "word": "n/a"}
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / max(1, a["n"]) + b["std"] ** 2 / max(1, b["n"]))
    word = "tie" if abs(diff) <= 2 * se or diff == 0 else ("higher" if diff > 0 else "lower")
    return {"diff": diff, "se": se, "word": word}


# --------------------------------------------------------------------------------------------
# Outputs: JSON, Markdown, figures
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _cell_text(stat: dict, digits: int, single: bool) -> str:
    if stat["mean"] is None:
        return "–"
    if single:
        return _fmt(stat["mean"], digits)
    return f"{_fmt(stat['mean'], digits)} ± {_fmt(stat['std'], digits)}"


def markdown_table(
    aggregate: dict, splits: Sequence[str], methods: Sequence[str], columns: Sequence = TABLE_COLUMNS
) -> str:
    """One Markdown table per split: reference rows, then each method as mean ± std over its seeds."""
    lines = []
    header = "| method | runs (failed) | " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "---|" * (len(columns) + 2)
    for split in splits:
        rows = aggregate.get(split, {})
        lines += [f"### {split}", "", header, rule]
        for method in [*REFERENCE_ROWS, *methods]:
            if method not in rows:
                continue
            row = rows[method]
            single = method in REFERENCE_ROWS
            cells = [_cell_text(row[key], digits, single) for key, _, digits in columns]
            name = f"*{method}*" if single else f"**{method}**"
            runs = "ref" if single else f"{row['n']} ({row['failed']})"
            lines.append(f"| {name} | {runs} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def verdict_text(aggregate: dict, splits: Sequence[str], bench: Benchmark | None = None) -> str:
    """Plain sentences from `matched_verdict` per split (what the numbers say, nothing more)."""
    bench = bench or BENCHMARKS["builtin"]
    lines = []
    for split in splits:
        v = matched_verdict(aggregate.get(split, {}), forget=bench.forget_metric, retain=bench.retain_metric)
        if not v:
            continue
        text = (
            f"- **{split}**: lowest mean {bench.forget_metric} {v['best_forget_em']:.3f}; matched efficacy (within "
            f"{MATCH_TOLERANCE}) : {', '.join(v['matched'])}. Most model utility among them: "
            f"**{v['best_model_utility']}**; most {bench.retain_metric}: **{v[f'best_{bench.retain_metric}']}**."
        )
        for method, other in VERDICT_PAIRS:
            cmp = v.get(f"{method}_vs_{other}")
            if cmp:
                parts = [f"{metric} {c['word']} ({c['diff']:+.3f} ± {c['se']:.3f})" for metric, c in cmp.items()
                         if c["diff"] is not None]  # fmt: skip
                name = "SIMU" if method == "simu" else method
                text += f" {name} vs {other}: " + "; ".join(parts) + "."
        lines.append(text)
    return "\n".join(lines)


def t_interval(diffs: Sequence[float]) -> dict:
    """The mean of `diffs` with a 95% t-interval: {"diff", "low", "high", "n", "word"}; word is "higher" or
    "lower" when the interval excludes 0, else "no difference" ("n/a" with fewer than 2 values, "no spread"
    when every value is the same)."""
    diffs = np.asarray(diffs, dtype=float)
    if len(diffs) < 2:
        mean = float(diffs[0]) if len(diffs) else None
        return {"diff": mean, "low": None, "high": None, "n": len(diffs), "word": "n/a"}
    mean = float(diffs.mean())
    if float(diffs.std(ddof=1)) < 1e-9:  # identical differences (deterministic runs; float noise): no interval
        return {"diff": mean, "low": None, "high": None, "n": len(diffs), "word": "no spread"}
    half = T_975.get(len(diffs) - 1, 1.96) * float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    word = "higher" if low > 0 else "lower" if high < 0 else "no difference"
    return {"diff": mean, "low": low, "high": high, "n": len(diffs), "word": word}


def paired_difference(records: Sequence[dict], split: str | Sequence[str], a: str, b: str, metric: str) -> dict:
    """Method `a` minus method `b` on `metric`, paired by split and seed (same base model, data and seed), with
    a 95% t-interval over the pairs both ran (`split`: one split, or several disjoint ones pooled): see
    `t_interval`."""
    splits = {split} if isinstance(split, str) else set(split)
    runs = {m: {(r["split"], r["seed"]): _value(r, metric) for r in records if r["split"] in splits and r["method"] == m}
            for m in (a, b)}  # fmt: skip
    return t_interval(
        [runs[a][s] - runs[b][s] for s in sorted(set(runs[a]) & set(runs[b]))
         if runs[a][s] is not None and runs[b][s] is not None]
    )  # fmt: skip


def pick_tuned(points: Sequence[dict], kept: Sequence[str], probe: str, reading: str = "muse") -> dict | None:
    """The tuning rule of the equal grid (issue 17): of the grid points (each {reading: the scores at matched
    forgetting, e.g. MUSE's checkpoint, or None, ...}), the one that keeps the most there (mean of the `kept`
    scores), ties to the lower `probe` (less of the forget facts left), then to the earlier step; None when no
    point reached it."""
    reached = [p for p in points if p[reading]]
    if not reached:
        return None
    # rounded so that equal shares of items tie exactly (0.94 + 1.00 and 0.98 + 0.96 in floating point)
    return max(reached, key=lambda p: (round(kept_mean(p[reading], kept), 9), -p[reading].get(probe, 0.0),
                                       -p[reading]["step"]))  # fmt: skip


def kept_mean(scores: dict, kept: Sequence[str]) -> float:
    """The mean of the `kept` scores (e.g. retain and world-facts exact match) of one checkpoint."""
    return sum(scores[k] for k in kept) / len(kept)


def _wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def proportion_difference(p1: float, n1: int, p2: float, n2: int) -> dict:
    """p1 - p2 for two proportions (shares of items, e.g. facts still known) with Newcombe's hybrid score
    95% interval (his method 10), from the Wilson intervals of each. Computed as if the samples were
    independent: for two models answering the same items it is conservative (wider than a paired one)."""
    (l1, u1), (l2, u2) = _wilson(p1 * n1, n1), _wilson(p2 * n2, n2)
    diff = p1 - p2
    low = diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    word = "higher" if low > 0 else "lower" if high < 0 else "no difference"
    return {"diff": diff, "low": low, "high": high, "n": (n1, n2), "word": word}


def paired_proportion_difference(x: Sequence[int], y: Sequence[int]) -> dict:
    """mean(x) - mean(y) for two 0/1 outcomes of the same items (x[i] and y[i] answer item i), with
    Newcombe's square-and-add 95% interval for paired data (his 1998 method 10): each share's Wilson interval,
    combined with the correlation of the pairs (phi, shrunk towards 0 by n/2 when positive, 0 when a margin
    is empty). Narrower than `proportion_difference` when the two agree on most items. Same keys."""
    if len(x) != len(y) or not len(x):
        raise SimuError(f"paired outcomes need the same items on both sides (got {len(x)} and {len(y)}).")
    n, k1, k2 = len(x), sum(x), sum(y)
    both = sum(1 for a, b in zip(x, y, strict=True) if a and b)
    only_x, only_y = k1 - both, k2 - both
    neither = n - both - only_x - only_y
    p1, p2 = k1 / n, k2 / n
    (l1, u1), (l2, u2) = _wilson(k1, n), _wilson(k2, n)
    margins = k1 * (n - k1) * k2 * (n - k2)
    cross = both * neither - only_x * only_y
    shrunk = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = shrunk / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    low = diff - math.sqrt(max((p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2), 0.0))
    high = diff + math.sqrt(max((p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1), 0.0))
    word = "higher" if low > 0 else "lower" if high < 0 else "no difference"
    return {"diff": diff, "low": low, "high": high, "n": n, "word": word}


def item_pairs(records: Sequence[dict], split: str, a: str, b: str) -> dict[str, tuple[list, list]] | None:
    """{"<role>/<share>": (a's 0/1 per item, b's)} for the items both methods answered, when each ran one
    seed, the same one, and their cells kept per-item outcomes (`item_outcomes`) of the same items; None
    otherwise (with several seeds the item shares are seed means, and the interval stays the independent one)."""
    runs = {m: [r for r in records if r["split"] == split and r["method"] == m] for m in (a, b)}
    if any(len(rs) != 1 for rs in runs.values()) or runs[a][0]["seed"] != runs[b][0]["seed"]:
        return None
    items_a, items_b = runs[a][0].get("items") or {}, runs[b][0].get("items") or {}
    pairs = {}
    for role in set(items_a) & set(items_b):
        if items_a[role]["indices"] != items_b[role]["indices"]:
            continue
        for share in ITEM_SHARES:
            x, y = items_a[role].get(share), items_b[role].get(share)
            kept = [(u, v) for u, v in zip(x or (), y or (), strict=True) if u is not None and v is not None]
            if kept:
                pairs[f"{role}/{share}"] = ([u for u, _ in kept], [v for _, v in kept])
    return pairs or None


def items_evaluated(records: Sequence[dict], qc: QualityConfig, split: str) -> dict[str, int]:
    """Items evaluated per data role of `split`: from the records, else the data sizes capped at max_items."""
    for record in records:
        if record["split"] == split and record.get("n_items"):
            return record["n_items"]
    cap = qc.eval.max_items or 10**9
    return {role: min(cap, len(qa.load_data(spec, root=qc.root))) for role, spec in qc.bench.data(split).items()}


PAIRED_LEGEND = (
    "Over seeds: the mean of the seed-by-seed differences with a t-interval (seeds change batch order, Sophia's "
    "sampled labels and the random mask; with whole-set batches some methods give identical runs, and no interval). "
    "Over the items: Newcombe's interval for the difference of two shares of the same evaluated items. Where each "
    "method ran one seed and its cell kept every item's outcome, the interval is his paired one (square-and-add with "
    "the pairs' correlation); otherwise it takes each method's mean over seeds as if independent, so conservative."
)


def pooled_splits(qc: QualityConfig) -> list[str]:
    """The table's splits whose pairs may be pooled: two or more, all with disjoint forget authors (the
    held-out sets and the split the presets were tuned on); [] otherwise (forget01/05/10 are nested)."""
    disjoint = ("forget10", *qc.bench.held_out_splits)
    return list(qc.splits) if len(qc.splits) > 1 and all(s in disjoint for s in qc.splits) else []


def _seed_intervals(records: Sequence[dict], splits, method: str, other: str, metrics) -> tuple[list[str], int]:
    """'title diff [low, high] word' for each metric with a t-interval over the pairs, and the pair count."""
    cells, n = [], 0
    for key, title in metrics:
        d = paired_difference(records, splits, method, other, key)
        n = max(n, d["n"])
        if d["low"] is not None:
            cells.append(f"{title} {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] {d['word']}")
    return cells, n


_MUSE_PAIRS_LEGEND = (
    " Under MUSE's stop, a run that did not reach it within its step budget (stop reached < 1 in the table) forgot "
    "less than the others, so it is left out of every pair (the table's means still include it)."
)


def matched_runs(records: Sequence[dict], stop: str | None) -> list[dict]:
    """The records that enter paired comparisons: under MUSE's stop, a run that never reached it forgot less
    than the others, so its forgetting is not matched and it leaves every pair."""
    return [r for r in records if stop != "muse" or r.get("reached_target") != 0.0]


def paired_text(records: Sequence[dict], qc: QualityConfig) -> str:
    """Method minus other for each pair of `PAIRED_COMPARISONS` that ran, per split and table metric (steps
    and time left out): a t-interval over seeds, and for shares of items (EM, known) also Newcombe's interval
    over the items; where the splits are disjoint (`pooled_splits`), also over every split's seeds pooled.
    Under MUSE's stop, runs that did not reach it within their budget are left out of every pair."""
    metrics = [(key, title) for key, title, _ in qc.bench.columns if key not in RUN_COLUMNS]
    records = matched_runs(records, qc.stop)
    lines = []
    for split in qc.splits:
        n_items = items_evaluated(records, qc, split) if any(r["split"] == split for r in records) else {}
        rows = aggregate_records(records, [key for key, _ in metrics]).get(split, {})
        for method, other in PAIRED_COMPARISONS:
            if method not in qc.methods or other not in rows or method not in rows:
                continue
            seeds, n = _seed_intervals(records, split, method, other, metrics)
            pairs = item_pairs(records, split, method, other)
            items = []
            for key, title in metrics:
                role, _, name = key.partition("/")
                a, b = rows[method].get(key, {}).get("mean"), rows[other].get(key, {}).get("mean")
                if name not in ITEM_SHARES or a is None or b is None:
                    continue
                if pairs is not None:  # every interval of the line paired, or none
                    if key not in pairs:
                        continue
                    p = paired_proportion_difference(*pairs[key])
                elif role in n_items:
                    p = proportion_difference(a, n_items[role], b, n_items[role])
                else:
                    continue
                items.append(f"{title} {p['diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] {p['word']}")
            pair = f"{split}, {method} − {other}"
            if seeds:
                lines.append(f"- **{pair}**, over {n} paired seeds: " + "; ".join(seeds) + ".")
            if items:
                how = "paired item by item" if pairs is not None else "seed means"
                lines.append(f"- **{pair}**, over the items ({how}): " + "; ".join(items) + ".")
    pooled = pooled_splits(qc)
    for method, other in PAIRED_COMPARISONS if pooled else ():
        seeds, n = _seed_intervals(records, pooled, method, other, metrics)
        if seeds:
            lines.append(f"- **{' + '.join(pooled)} pooled, {method} − {other}**, over {n} pairs (split x seed): "
                         + "; ".join(seeds) + ".")  # fmt: skip
    return "\n".join(lines)


def _utility_note(records: Sequence[dict]) -> str:
    """Which of TOFU's 9 model-utility components the cells used (from their evaluation notes)."""
    notes = {r.get("notes", {}).get("model_utility") for r in records} - {None}
    if not notes:
        return "all 9 of its components"  # a real_authors split was given
    return "; ".join(sorted(note.split(":")[0] for note in notes))


def _builtin_legend(records: Sequence[dict]) -> list[str]:
    """The built-in table's legend (reference rows, metrics; which utility components were used)."""
    return [
        "Each method row: mean ± sample std over the seeds. Reference rows: *original* = the model before "
        "unlearning, *retain_reference* = the model never trained on the forget authors (the target). "
        "Exact match: the greedy answer's first sentence equals the gold answer once normalised (case, "
        "punctuation, articles); contained: the gold answer occurs anywhere in the greedy answer. ROUGE-L: "
        "recall with the Porter stemmer (TOFU, MUSE). Forget quality is the KS-test p-value of forget truth "
        "ratios against the retain reference (log10; 0 is the best). Model utility: TOFU's harmonic mean of "
        f"{_utility_note(records)}. PrivLeak: MUSE's relative Min-40% AUC gap to the retain reference, "
        "100 (r - a) / (1 - r) with this project's AUC orientation: about -100 = the forget set is still "
        "recognised, 0 = like the retain reference, > 0 = over-unlearned. " + _RUN_LEGEND,
    ]


_RUN_LEGEND = (
    "Sophia unclipped: the mean share of Sophia's coordinates whose step was not clipped (|m| < rho h), i.e. "
    "that took a curvature-scaled step; near 0 the method runs as sign-momentum descent (Sophia's authors aim "
    "at 0.1-0.5; `rho_share` calibrates rho); – for AdamW and for cells stored before it was recorded. Stop "
    "reached: the share of the seeds whose run ended at its forget target rather than at the step budget (– for "
    "cells stored before it was recorded)."
)

_KNOWLEDGE_LEGEND = (
    "Each method row: mean ± sample std over the seeds; *original* = the model before unlearning. Known: the "
    "greedy answer begins with an accepted answer (the rule the benchmark kept its facts by, so 1.000 before "
    "unlearning); EM: its first sentence equals the answer; prob: the answer's length-normalised probability. "
    "Utility (retain): TOFU's harmonic mean on the retain split only. The forget set is Asia's capitals, retain "
    "Europe's (trained on as the retain set); neighbour = other facts about the forget countries, general = "
    "everything else, other capitals = the other continents' capitals (the presets were tuned with those as "
    "the forget set). " + _RUN_LEGEND
)


def _protocol_lines(meta: dict) -> list[str]:
    """The Markdown lines for the fair-test options of the run (tuned picks, MUSE's stop, relearning)."""
    lines = []
    if meta.get("tuned"):
        picks = "; ".join(f"{m} " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items())
                          for m, s in meta["tuned"].items())  # fmt: skip
        lines.append(f"- every method at its pick from one equal tuning grid (bench/tune_equal.py): {picks}")
    if meta.get("stop") == "muse":
        lines.append("- stop: MUSE's matched forgetting, the first check (every `eval_every` steps) where the forget "
                     "set's greedy ROUGE-L is at or below the retain reference's (no forget-EM target)")  # fmt: skip
    if meta.get("relearn"):
        r = meta["relearn"]
        lines.append(f"- relearning attack on every row: {r['steps']} AdamW steps at lr {r['lr']:g} on a seeded "
                     f"{r['share']:g} of the forget set; *relearned held-out* = share of the other part answered "
                     "again (the retain reference's value is what the attack teaches from nothing)")  # fmt: skip
    return lines


def quality_markdown(aggregate: dict, meta: dict, qc: QualityConfig, records: Sequence[dict] = ()) -> str:
    """The whole Markdown page: settings, table, verdict."""
    m = meta["machine"]
    where = m["gpu"] or f"CPU ({m['cpu_count']} cores, {m['torch_threads']} torch threads)"
    about = (
        [f"- built-in: {meta['builtin']['n_authors']} authors, model {meta['builtin']['model']}"]
        if qc.benchmark == "builtin"
        else [f"- model {qc.bench.base}; no retain reference exists for a pretrained model's own knowledge, "
              "so forget quality and PrivLeak are not available (the report of each cell says why)"]
    )  # fmt: skip
    head = [
        f"# SIMU quality table ({qc.bench.title})",
        "",
        f"- command: `{meta['command'] or 'python -m simu_core bench quality'}`",
        *about,
        f"- seeds {meta['seeds']}; "
        + (
            "every setting below comes from the tuning file, not the presets"
            if meta.get("tuned")
            else f"presets tuned with seed {meta['tuning_seed']}; preset notes: {meta['preset_notes']}"
        ),  # fmt: skip
        f"- evaluation: up to {qc.eval.max_items} items per split (seeded sample {qc.eval.seed}), "
        f"greedy answers of up to {qc.eval.max_new_tokens} tokens",
        *_protocol_lines(meta),
        f"- torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}; device {where}",
        f"- created {meta['created']}, {meta['seconds'] / 60:.1f} min for the cells computed in this call",
        *(
            [f"- **left out** (not computed yet; written with `--stored-only`): {', '.join(meta['left_out'])}"]
            if meta.get("left_out")
            else []
        ),
        "",
        *(_builtin_legend(records) if qc.benchmark == "builtin" else [_KNOWLEDGE_LEGEND]),
        "",
    ]
    verdict = ["## At matched forget efficacy", "", verdict_text(aggregate, qc.splits, qc.bench), ""]
    legend = PAIRED_LEGEND + (_MUSE_PAIRS_LEGEND if qc.stop == "muse" else "")
    paired = ["## Differences with 95% intervals", "", legend, "", paired_text(records, qc), ""]
    table = markdown_table(aggregate, qc.splits, qc.methods, qc.bench.columns)
    return "\n".join([*head, "## Table", "", table, *verdict, *paired])


def write_outputs(out: str | Path, records: list[dict], aggregate: dict, meta: dict, qc: QualityConfig) -> dict:
    """quality.json, quality.md and quality.html under `out`; returns their paths."""
    from simu_core.runs import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "aggregate": aggregate, "verdict": {s: matched_verdict(aggregate.get(s, {}), forget=qc.bench.forget_metric,
                                                retain=qc.bench.retain_metric) for s in qc.splits},
               "records": records}  # fmt: skip
    write_json_atomic(out / "quality.json", _json_safe(payload))
    md = out / "quality.md"
    md.write_text(quality_markdown(aggregate, meta, qc, records), encoding="utf-8")
    html = figures.write_figures(
        out / "quality.html", figures.quality_figures(records, qc.splits), "SIMU quality benchmark"
    )
    return {"json": str(out / "quality.json"), "markdown": str(md), "html": str(html)}


# --------------------------------------------------------------------------------------------
# Pooling tables over base models (issue 17's replicates)
# --------------------------------------------------------------------------------------------

# What tables must share to be pooled: the same protocol on different base models.
POOL_SETTINGS = ("benchmark", "splits", "stop", "tuned", "eval", "overrides", "relearn")
POOL_LEGEND = (
    "Pairs: two methods' runs on the same base model, forget split and seed. The seed-by-seed differences of each "
    "(base, split) block are averaged, and the interval is a 95% t-interval over the blocks: the base models (and "
    "the disjoint splits) are the replicates, seeds only optimiser noise within one. Better / worse follow the "
    "column's arrow (↑ higher is better, ↓ lower is better; PrivLeak's goal is 0, so it only says higher / lower)."
)


def read_tables(folders: Sequence[str | Path]) -> tuple[list[dict], dict]:
    """The records of several quality tables (folders holding `bench quality`'s quality.json) run with one
    protocol on different base models, each record tagged "base" = its folder's name, and the shared settings
    (`POOL_SETTINGS` from the first table's meta). Raises SimuError, naming the table and the fix, for a missing
    table, fewer than two, the same folder name or base model twice, or settings that differ."""
    if len(folders) < 2:
        raise SimuError("Pooling needs two or more quality tables (one per base model): give --tables A,B,...")
    records: list[dict] = []
    settings: dict | None = None
    roots: dict[str, str] = {}
    for folder in map(Path, folders):
        path = folder / "quality.json"
        if not path.is_file():
            raise SimuError(f"No quality table at {path}: run `bench quality --out {folder}` first "
                            "(or `--stored-only` to write it from stored cells).")  # fmt: skip
        table = json.loads(path.read_text(encoding="utf-8"))
        meta = table["meta"]
        if any(r["base"] == folder.name for r in records):
            raise SimuError(f"Two tables are named {folder.name!r}: give each base model's table its own folder name.")
        if meta.get("root") and meta["root"] in roots.values():
            raise SimuError(f"{folder} and another table ran on the same base model ({meta['root']}): its runs "
                            "are not independent replicates. Pool tables of different base models.")  # fmt: skip
        roots[folder.name] = meta.get("root") or ""
        shared = {key: meta.get(key) for key in POOL_SETTINGS}
        if settings is None:
            settings = shared
        differs = [key for key in POOL_SETTINGS if not _same_setting(key, shared[key], settings[key])]
        if differs:
            raise SimuError(f"{folder} was run with other settings ({', '.join(differs)}) than {folders[0]}: "
                            "pool only tables of one protocol (same splits, stop, tuning file and evaluation).")  # fmt: skip
        records += [{**r, "base": folder.name} for r in table["records"]]
    return records, {**settings, "tables": roots}


def _same_setting(key: str, a, b) -> bool:
    """Whether two tables' values of a `POOL_SETTINGS` key agree; tuning picks need only agree on the methods
    both tables ran (a table may run fewer methods)."""
    if key == "tuned" and a and b:
        return all(a[m] == b[m] for m in set(a) & set(b))
    return a == b


def replicate_difference(records: Sequence[dict], a: str, b: str, metric: str) -> dict:
    """Method `a` minus `b` on `metric` with base models as replicates (records tagged "base", `read_tables`):
    each (base, split) block's mean seed-paired difference (`paired_difference`), then `t_interval` over the
    blocks; "pairs" counts the seed pairs inside."""
    blocks = [paired_difference([r for r in records if r["base"] == base], split, a, b, metric)
              for base, split in sorted({(r["base"], r["split"]) for r in records})]  # fmt: skip
    return {**t_interval([d["diff"] for d in blocks if d["n"]]), "pairs": sum(d["n"] for d in blocks)}


def judged(word: str, title: str) -> str:
    """'better' / 'worse' for a 'higher' / 'lower' interval word on a column whose title carries its goal
    (↑ or ↓); other words, and columns without an arrow, unchanged."""
    goal = "higher" if "↑" in title else "lower" if "↓" in title else None
    if goal is None or word not in ("higher", "lower"):
        return word
    return "better" if word == goal else "worse"


def pooled_differences(records: Sequence[dict], settings: dict) -> dict:
    """{"<method> − <other>": {metric: replicate_difference + "judged"}} for every pair of `PAIRED_COMPARISONS`
    that ran, on the benchmark's table columns; under MUSE's stop, runs that did not reach it leave their pairs."""
    columns = get_benchmark(settings["benchmark"]).columns
    records = matched_runs(records, settings.get("stop"))
    ran = {r["method"] for r in records}
    out: dict = {}
    for method, other in PAIRED_COMPARISONS:
        if method in ran and other in ran:
            out[f"{method} − {other}"] = {
                key: {**(d := replicate_difference(records, method, other, key)), "judged": judged(d["word"], title)}
                for key, title, _ in columns if key not in RUN_COLUMNS
            }  # fmt: skip
    return out


def stop_counts(records: Sequence[dict]) -> dict[str, dict[str, str]]:
    """{method: {base: "reached/runs"}}: how many of each table's runs met their stop (MUSE's point or EM target)."""
    out: dict = {}
    for r in records:
        if r["method"] not in REFERENCE_ROWS and r.get("reached_target") is not None:
            out.setdefault(r["method"], {}).setdefault(r["base"], []).append(r["reached_target"])
    return {m: {base: f"{sum(v > 0 for v in vs)}/{len(vs)}" for base, vs in per.items()} for m, per in out.items()}


def pooled_markdown(records: Sequence[dict], pooled: dict) -> str:
    """The pooled page from `records` and `write_pooled`'s payload (settings, stop_reached, differences):
    tables and protocol, stop reached per table, the differences over blocks, the means."""
    settings, counts = pooled["settings"], pooled["stop_reached"]
    bases = list(settings["tables"])
    bench = get_benchmark(settings["benchmark"])
    titles = {key: title for key, title, _ in bench.columns}
    lines = [
        "# SIMU quality tables pooled over base models",
        "",
        *[f"- table `{base}`: base model {root or '(not recorded)'}" for base, root in settings["tables"].items()],
        f"- splits {', '.join(settings['splits'])}; each table's own page has its means and per-split intervals",
        *_protocol_lines(settings),
        "",
        "## Stop reached (runs that met their stop / runs)",
        "",
        "| method | " + " | ".join(bases) + " |",
        "|---|" + "---|" * len(bases),
        *[f"| {m} | " + " | ".join(per.get(b, "–") for b in bases) + " |" for m, per in counts.items()],
        "",
        "## Differences with 95% intervals over (base, split) blocks",
        "",
        POOL_LEGEND + (_MUSE_PAIRS_LEGEND if settings.get("stop") == "muse" else ""),
        "",
    ]
    methods = [m for m in dict.fromkeys(r["method"] for r in records) if m not in REFERENCE_ROWS]
    means = markdown_table(aggregate_records(records, [k for k, _, _ in bench.columns]), settings["splits"], methods,
                           bench.columns)  # fmt: skip
    for pair, stats in pooled["differences"].items():
        n = max(d["n"] for d in stats.values())
        pairs = max(d["pairs"] for d in stats.values())
        cells = [_pooled_cell(titles[k], d) for k, d in stats.items() if d["diff"] is not None]
        lines.append(f"- **{pair}**, over {n} blocks ({pairs} seed pairs): " + "; ".join(cells) + ".")
    lines += ["", "## Means over every base (mean ± std over bases x seeds; reference rows: the mean)", "", means]
    return "\n".join(lines) + "\n"


def _pooled_cell(title: str, d: dict) -> str:
    if d["low"] is None:  # one block, or the same difference in every block: no interval
        return f"{title} {d['diff']:+.3f} ({d['word']})"
    return f"{title} {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] **{d['judged']}**"


def write_pooled(folders: Sequence[str | Path], out: str | Path) -> dict:
    """Pool quality tables over base models (`read_tables`) into `out`/pooled.json and pooled.md; returns paths."""
    from simu_core.runs import write_json_atomic

    records, settings = read_tables(folders)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "stop_reached": stop_counts(records),
               "differences": pooled_differences(records, settings)}  # fmt: skip
    write_json_atomic(out / "pooled.json", _json_safe(payload))
    (out / "pooled.md").write_text(pooled_markdown(records, payload), encoding="utf-8")
    return {"json": str(out / "pooled.json"), "markdown": str(out / "pooled.md")}


# --------------------------------------------------------------------------------------------
# The built-in size for the CLI
# --------------------------------------------------------------------------------------------


def ensure_size(size: str | None, progress: Progress = _no_progress, specs: Sequence[str] = ()) -> Path:
    """The built-in cache of `size` (None: $SIMU_BUILTIN_SIZE / default), its missing parts built first:
    the app's, and the on-demand ones `specs` name (a disjoint forget set's reference, "builtin:retain10b")."""
    from simu_core.builtin import ensure_builtin, existing_config, parts_for_specs, with_app_parts
    from simu_core.config import builtin_config, builtin_root

    root = builtin_root(size)
    parts = with_app_parts(parts_for_specs(*specs))
    return ensure_builtin(root, existing_config(root) or builtin_config(size), progress, parts)
