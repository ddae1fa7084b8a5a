"""Shared UI plumbing for the pages: session defaults, cached resources, data pickers, errors.

Only glue lives here; every computation is a `simu_core` call.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path

import streamlit as st

from simu_core import data as qa
from simu_core.config import builtin_root, simu_home
from simu_core.errors import SimuError
from simu_core.jobs import JobRunner
from simu_core.models import LoadedModel, builtin_status, ensure_builtin, load_model

DEFAULTS = {
    "model_spec": "builtin:full",
    "forget_spec": "builtin:forget10",
    "retain_spec": "builtin:retain10",
    "device": "auto",
    "trust_remote_code": False,
}
ROLES = ("forget", "retain")


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


@st.cache_resource(show_spinner=False)
def _build_lock() -> threading.Lock:
    return threading.Lock()


def ensure_builtin_with_progress() -> bool:
    """Build the built-in default on first use, with a progress bar. False if it failed."""
    root = builtin_root()
    if builtin_status(root) == "ok":
        return True
    with _build_lock():  # another session may be building it right now: wait for that build
        if builtin_status(root) == "ok":
            return True
        st.info("First start: building the built-in benchmark and models (a few minutes on a laptop CPU, once).")
        bar = st.progress(0.0, text="Building the built-in default...")
        try:
            ensure_builtin(root, progress=lambda message, fraction: bar.progress(min(1.0, fraction), text=message))
        except Exception as err:
            show_error(err, "build the built-in default")
            return False
        bar.empty()
    return True


@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def cached_model(spec: str, device: str, trust_remote_code: bool) -> LoadedModel:
    """A loaded model shared read-only by all sessions: never modify it, copy it for a run."""
    return load_model(spec, device=device, trust_remote_code=trust_remote_code)


def current_model() -> LoadedModel | None:
    """The session's model (building the built-in default first if needed); None after an error."""
    spec = st.session_state["model_spec"]
    if spec.startswith("builtin:") and not ensure_builtin_with_progress():
        return None
    try:
        return cached_model(spec, st.session_state["device"], st.session_state["trust_remote_code"])
    except Exception as err:
        show_error(err, f"load the model '{spec}'")
        return None


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_data(spec: str) -> qa.QADataset:
    return qa.load_data(spec)


def current_data(role: str) -> qa.QADataset | None:
    """The session's forget or retain set: an upload if one was accepted, else its spec."""
    upload = st.session_state.get(f"{role}_upload")
    if upload is not None:
        return upload
    spec = st.session_state[f"{role}_spec"]
    if spec.startswith("builtin:") and not ensure_builtin_with_progress():
        return None
    try:
        return _cached_data(spec)
    except Exception as err:
        show_error(err, f"load the {role} set '{spec}'")
        return None


def data_label(role: str) -> str:
    upload = st.session_state.get(f"{role}_upload")
    return f"upload:{upload.name}" if upload is not None else st.session_state[f"{role}_spec"]


def parse_upload(name: str, content: bytes) -> qa.QADataset:
    """Validate an uploaded file's bytes (JSONL/JSON/CSV): text only, never unpickled."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SimuError(f"'{name}' is not UTF-8 text (bad byte at position {err.start}). Save it as UTF-8.") from err
    rows = qa.parse_records(text, Path(name).suffix.lower().lstrip("."), name)
    if not rows:
        raise SimuError(f"'{name}' has no rows. Add at least one question/answer row.")
    return qa.QADataset(Path(name).stem, rows)


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
