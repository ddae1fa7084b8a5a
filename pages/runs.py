"""Step 6: the history of runs: open one (settings, losses, metrics, downloads), compare, delete."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from pages.common import HEADLINE_KEYS, chart, compare_runs, require_entrypoint, run_reports, runs_dir, show_error
from simu_core.figures import history_figure
from simu_core.knowledge_check import load_check
from simu_core.metrics import compare, goal_of
from simu_core.runs import delete_run, list_runs, read_history

require_entrypoint()
st.header("6 · Runs")
st.caption(
    f"Every unlearning run is a folder under `{runs_dir()}`: its settings, per-step losses, neuron mask, the "
    "changed weights only (a delta), and, once evaluated, its metrics and report."
)
records = list_runs(runs_dir())
if not records:
    st.info("No runs yet. Launch one on the **Unlearn** page.")
    st.page_link("pages/unlearn.py", label="Go to Unlearn", icon=":material/cleaning_services:")
    st.stop()

st.dataframe(
    pd.DataFrame(
        {
            "run": r.name,
            "method": r.method,
            "status": r.status,
            "created": r.created,
            "steps": r.steps_done,
            "seconds": r.seconds,
            "forget loss": r.forget_loss,
            "retain loss": r.retain_loss,
            "forget EM": r.forget_em,
            "neurons": r.mask_neurons,
            "trainable params": r.trainable_params,
            "evaluated": r.has_metrics,
            "model": r.model,
            "forget / retain": f"{r.forget} / {r.retain}",
        }
        for r in records
    ),
    hide_index=True,
    width="stretch",
    column_config={"seconds": st.column_config.NumberColumn(format="%.1f")},
)
by_name = {r.name: r for r in records}
names = list(by_name)
opened, compared = st.tabs(["Open a run", "Compare runs"])

with opened:
    last = st.session_state.get("last_run")
    name = st.selectbox("Run", names, index=names.index(last) if last in names else 0, key="runs_open")
    run = by_name[name]
    note = f"**{run.method}** · {run.status} ({run.stop_reason}) · {run.steps_done} steps"
    show = st.success if run.status == "ok" else st.warning if run.status == "cancelled" else st.error
    show(note + (f" · {run.error}" if run.error else ""))
    knowledge = load_check(run.path)
    if knowledge is not None and not knowledge.knows:
        st.warning(f"**Before this run:** {knowledge.reason}")
    elif knowledge is not None:
        st.caption(f"Before this run: {knowledge.reason}")
    history = read_history(run.path)
    if history:
        chart(history_figure({name: history}), key="runs_history")
    after, before = run_reports(run.path)
    if after is not None:
        deltas = compare(before, after) if before is not None else {}
        rows = [
            {
                "metric": k,
                "goal": goal_of(k),
                "before": deltas[k].before if k in deltas else None,
                "after": after.summary.get(k),
                "delta": deltas[k].delta if k in deltas else None,
            }  # fmt: skip
            for k in HEADLINE_KEYS
        ]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    else:
        st.page_link(
            "pages/evaluate.py",
            label="Not evaluated yet: evaluate it on the Evaluate page",
            icon=":material/fact_check:",
        )
    with st.expander("Settings (config.json)"):
        st.json(json.loads((run.path / "config.json").read_text(encoding="utf-8")))
    c = st.columns(4)
    report = run.path / "report.html"
    c[0].download_button(
        "Download the report (HTML)",
        report.read_bytes() if report.is_file() else b"",
        file_name=f"{name}-report.html",
        mime="text/html",
        disabled=not report.is_file(),
        help="A self-contained page with every metric and chart (written by the evaluation).",
    )
    c[1].download_button(
        "Download config.json",
        (run.path / "config.json").read_bytes(),
        file_name=f"{name}-config.json",
        mime="application/json",
    )
    sure = c[2].checkbox("Yes, delete this run", key=f"runs_sure_{name}")
    if c[3].button("Delete run", disabled=not sure, key="runs_delete", type="primary" if sure else "secondary"):
        try:
            delete_run(run.path)
        except Exception as err:
            show_error(err, f"delete run '{name}'")
        else:
            for key in ("last_run", "runs_compare", "ev_compare"):  # choices that named the deleted run
                st.session_state.pop(key, None)
            st.toast(f"Deleted run {name}")
            st.rerun()

with compared:
    chosen = st.multiselect("Runs to compare", names, default=names[: min(2, len(names))], key="runs_compare")
    if len(chosen) >= 2:
        compare_runs([by_name[n] for n in chosen])
    else:
        st.info(
            f"Pick two or more of the {len(names)} runs to compare them."
            if len(names) >= 2
            else "Compare needs two runs."
        )
