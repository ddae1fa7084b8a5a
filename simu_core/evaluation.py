"""Evaluating what specs name: load the model (or an unlearning run and its base), the data and the
retain reference, evaluate with `metrics.evaluate`, and write the metrics JSON and `report.html`.

Sits above both `runs` (a run folder is loaded with `runs.load_run`) and `metrics` (which knows
nothing of runs), and above `report` (the HTML page). Also the defaults the CLI, the app and the
benchmark share: which built-in splits go with a forget set (`builtin_companions`) and which
retain model is its reference (`default_reference`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from simu_core import data as qa
from simu_core import distributed
from simu_core.errors import SimuError
from simu_core.metrics import EvalConfig, Progress, Report, evaluate
from simu_core.models import load_model
from simu_core.report import write_html
from simu_core.runs import load_run


def _no_progress(message: str, fraction: float) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Data and reference defaults for the CLI and the app
# --------------------------------------------------------------------------------------------


def knowledge_split_of(spec: str) -> tuple[str, str] | None:
    """'builtin:smollm2/forget' -> ('smollm2', 'forget'); None for any other spec."""
    name, slash, split = spec.removeprefix("builtin:").partition("/")
    if spec.startswith("builtin:") and slash and name in qa.KNOWLEDGE_BENCHMARKS:
        return name, split
    return None


def builtin_companions(forget_spec: str) -> dict[str, str]:
    """Data specs evaluated with a forget set: the matching retain, holdout and world-facts splits.

    builtin:forgetXX -> builtin:retainXX; a real-knowledge split (builtin:smollm2/forget) -> the other
    splits of its benchmark (retain, neighbour, general, and other_capitals unless it is the forget
    set); any other forget data -> builtin:retain10.
    """
    knowledge = knowledge_split_of(forget_spec)
    if knowledge is not None:
        name, forget = knowledge
        others = [s for s in qa.KNOWLEDGE_SPLITS if s not in ("forget", forget)]
        return {"forget": forget_spec, **{s: f"builtin:{name}/{s}" for s in others}}
    percent = "10"
    if forget_spec.startswith("builtin:forget"):
        percent = forget_spec.removeprefix("builtin:forget")
    return {
        "forget": forget_spec,
        "retain": f"builtin:retain{percent}",
        "holdout": "builtin:holdout",
        "world_facts": "builtin:world_facts",
    }


def curve_companions(forget_spec: str) -> dict[str, str]:
    """The sets a trade-off curve scores besides forget and retain: for a built-in forget split, what
    else the benchmark keeps (world facts; a real-knowledge benchmark's neighbour and general facts);
    nothing for other data."""
    if not forget_spec.startswith("builtin:"):
        return {}
    skip = ("forget", "retain", "holdout", "other_capitals")
    return {name: spec for name, spec in builtin_companions(forget_spec).items() if name not in skip}


def curve_sets(forget_spec: str, root: str | Path | None = None) -> dict[str, qa.QADataset]:
    """`curve_companions` loaded: the extra sets `unlearn.unlearn(..., curve_sets=...)` scores."""
    return {name: qa.load_data(spec, root=root) for name, spec in curve_companions(forget_spec).items()}


def default_reference(model_spec: str, forget_spec: str) -> str | None:
    """The retain reference for a model on a built-in forget split builtin:forgetXX: builtin:retainXX for a
    built-in model; for a model folder in a folder laid out like the built-in cache (a two-stage build or a
    fine-tune of the authors: `<build>/models/full`), its sibling `<build>/models/retainXX` where that was
    built; else None.

    A real-knowledge benchmark has none: its facts come from pretraining, and no model pretrained
    without them exists (the skipped metrics say so in the report)."""
    if not forget_spec.startswith("builtin:forget"):
        return None
    part = "retain" + forget_spec.removeprefix("builtin:forget")
    if model_spec.startswith("builtin:"):
        return f"builtin:{part}"
    folder = Path(model_spec).expanduser()
    sibling = folder.parent / part
    if folder.parent.name == "models" and (sibling / "config.json").is_file():
        return str(sibling)
    return None


@dataclass
class EvaluationFiles:
    """What `evaluate_specs` wrote: the evaluated model's report, the base model's (if any), the page."""

    after: Report
    before: Report | None
    metrics_path: Path
    before_path: Path | None
    html_path: Path


def _run_config(run: str | Path) -> dict:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise SimuError(f"'{run}' is not a run folder (no config.json). Pick a folder under runs/.")
    return json.loads(path.read_text(encoding="utf-8"))


def evaluate_specs(
    model: str | None = None,
    run: str | Path | None = None,
    data: str | None = None,
    reference: str | None = None,
    out: str | Path | None = None,
    config: EvalConfig | None = None,
    device: str | None = None,
    companions: dict[str, str | None] | None = None,
    before: bool = True,
    root: str | Path | None = None,
    progress: Progress = _no_progress,
) -> EvaluationFiles:
    """Load what the specs name, evaluate, and write `out` (metrics JSON) and `report.html` beside it.

    With `run`, the run's model is evaluated (after) and, unless `before=False`, its base model
    (`model`, default the run's base) too (before, saved as `<out stem>_before.json`). `data` is
    the forget set (default: the run's, else builtin:forget10); retain / holdout / world facts
    default to the matching built-in splits (`companions` overrides them; None drops one; a
    `real_authors` split, which the built-in does not have, is added only through `companions`).
    `reference` defaults to builtin:retainXX for a built-in model on builtin:forgetXX. Launched on
    several processes, each evaluates its part of every split on its own device and only the main
    process writes the files.
    """
    group = distributed.current(device)
    device = str(group.device) if group.world > 1 else device
    run_config = _run_config(run) if run else {}
    base_spec = model or (run_config.get("base") or {}).get("spec")
    if base_spec is None and run is None:
        raise SimuError("name a model to evaluate: --model SPEC (or --run DIR for an unlearning run).")
    data = data or (run_config.get("unlearn") or {}).get("forget") or "builtin:forget10"
    specs = {**builtin_companions(data), **(companions or {})}
    datasets = {k: qa.load_data(v, root=root) for k, v in specs.items() if v}
    reference = reference or default_reference(base_spec or "", data)
    if out is None:
        if run is None:
            raise SimuError("say where to write the metrics: --out FILE (e.g. metrics.json).")
        out = Path(run) / "metrics.json"
    out = Path(out)
    ref_model = load_model(reference, device=device, root=root) if reference else None
    before_report = None
    if run is not None:
        after_model = load_run(run, device=device)
        if before and base_spec:
            progress(f"evaluating the base model {base_spec}", 0.0)
            base = load_model(base_spec, device=device, root=root)
            before_report = evaluate(base, datasets, ref_model, config, progress)
            del base
    else:
        after_model = load_model(base_spec, device=device, root=root)
    progress(f"evaluating {after_model.spec}", 0.0)
    after_report = evaluate(after_model, datasets, ref_model, config, progress)
    before_path = None if before_report is None else out.with_name(f"{out.stem}_before.json")
    html_path = out.with_name("report.html")
    if group.is_main:
        after_report.save(out)
        if before_report is not None:
            before_report.save(before_path)
        write_html(html_path, after_report, before_report)
    group.barrier()
    return EvaluationFiles(after_report, before_report, out, before_path, html_path)
