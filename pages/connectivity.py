"""Step 5: loss along a path between two models (original, runs, retain reference), barrier marked."""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial

import streamlit as st

from pages.common import (
    TINY_BUILTINS,
    chart,
    finished_runs,
    follow_job,
    job_busy,
    launch_button,
    need_setup,
    require_builtin,
    require_entrypoint,
    result_store,
)
from simu_core.connectivity import CURVES, DEFAULT_POINTS, ConnectConfig, FitConfig, connect
from simu_core.figures import path_figure

CURVE_HELP = {
    "linear": "(1-t)·A + t·B: the straight line between the two models.",
    "bezier": "Quadratic Bezier through a bend C trained to keep the loss low along the whole path.",
    "chain": "Two straight segments A → C → B through a trained bend C.",
}

require_entrypoint()
st.header("5 · Mode connectivity")
st.caption(
    "Are two models in the same valley of the loss? Their weights are blended along a path (t = 0 is A, t = 1 "
    "is B) and the forget and retain losses are measured at each point. A bump in the middle (the *barrier*) "
    "means the models are separated by a ridge; a flat retain curve means the unlearned model stays close to "
    "the original where it matters."
)
loaded, forget, retain = need_setup()


def same_shape(spec: str) -> bool:
    """Whether a model (or a run's base model) `spec` has the weights of the model in use: the same model, or
    two of the tiny built-ins. A path between, say, builtin:smollm2 and builtin:full means nothing."""
    return spec == loaded.spec or (spec in TINY_BUILTINS and loaded.spec in TINY_BUILTINS)


endpoints = {f"original · {loaded.spec}": loaded.spec}
for run in finished_runs():
    if same_shape(run.model):
        endpoints[f"run · {run.name}"] = str(run.path)
for spec in TINY_BUILTINS:
    if spec != loaded.spec and same_shape(spec):
        endpoints[f"built-in · {spec}"] = spec
labels = list(endpoints)
if len(labels) < 2:
    st.info(
        f"Nothing to connect yet: the endpoints are `{loaded.spec}` and the finished runs made from it. "
        "Launch one on the **Unlearn** page."
    )
    st.page_link("pages/unlearn.py", label="Go to Unlearn", icon=":material/cleaning_services:")
    st.stop()
c = st.columns(2)
a = c[0].selectbox("Endpoint A (t = 0)", labels, index=0, key="conn_a")
b = c[1].selectbox("Endpoint B (t = 1)", labels, index=min(1, len(labels) - 1), key="conn_b")
c = st.columns([2, 1, 1, 1])
curve = c[0].radio(
    "Curve",
    list(CURVES),
    horizontal=True,
    key="conn_curve",
    help="\n\n".join(f"**{k}**: {v}" for k, v in CURVE_HELP.items()),
)
points = c[1].number_input(
    "Points along t", 3, 101, DEFAULT_POINTS, key="conn_points", help="Evenly spaced, ends included."
)
bend = CURVES[curve].has_bend
fit_steps = c[2].number_input(
    "Bend fit steps", 0, 10_000, FitConfig().steps, key="conn_fit", disabled=not bend,
    help="Adam steps that train the bend (bezier/chain only); the endpoints stay fixed.",
)  # fmt: skip
sample = c[3].number_input(
    "Retain items", 0, 100_000, ConnectConfig(a="", b="").retain_sample, key="conn_sample",
    help="A seeded sample of the retain set (0 = all of it).",
)  # fmt: skip
config = ConnectConfig(
    a=endpoints[a],
    b=endpoints[b],
    curve=curve,
    points=int(points),
    fit=FitConfig(steps=int(fit_steps)),
    forget=st.session_state["forget_spec"],
    retain=st.session_state["retain_spec"],
    retain_sample=int(sample),
    device=st.session_state["device"],
)
require_builtin(config.a, config.b)  # a retain reference may still be building
key = ("connect", json.dumps(asdict(config), sort_keys=True))
store = result_store()


def path_job(ctx, config: ConnectConfig, key: tuple, store: dict) -> tuple | None:
    """Job: fit (bend curves) and evaluate the path; keeps the result under `key` (worker thread)."""
    result = connect(config, progress=lambda message, fraction: ctx.report(fraction, message), cancel=ctx.cancel_event)
    if not result.complete:
        return None
    store[key] = result
    return key


if a == b:
    st.warning("Pick two different endpoints.")
    st.stop()
launch_button(
    "Compute the path",
    "connect",
    f"{curve} path",
    partial(path_job, config=config, key=key, store=store),
    type="primary",
    disabled=key in store,
    help="Runs in the background (one job at a time on this server).",
)
if key not in store:
    follow_job("connect", "compute the path")
    if key not in store:
        if not job_busy("connect"):
            st.info("Choose the endpoints and the curve, then press **Compute the path**.")
        st.stop()

result = store[key]
chart(path_figure(result), key="conn_figure")
c = st.columns(4)
for col, split in zip(c, ("forget", "retain"), strict=False):
    barrier = result.barrier.get(split)
    col.metric(
        f"{split.capitalize()} barrier",
        "–" if barrier is None else f"{barrier:.3f} nats",
        help="max over t of the loss − the larger of the two end losses (0 = no bump between the models).",
    )
c[2].metric("Parameters carried", f"{result.carried_elements:,}", help="Only entries that differ between A and B.")
c[3].metric("Time", f"{result.seconds:.1f} s")
if result.fit:
    st.caption(
        f"Bend fit: {result.fit['steps']} steps, objective {result.fit['first_loss']:.3f} → {result.fit['last_loss']:.3f} nats."
    )
st.download_button(
    "Download the result (JSON)",
    json.dumps({"config": asdict(config), "result": result.to_dict()}, indent=1),
    file_name=f"path-{curve}.json",
    mime="application/json",
)
