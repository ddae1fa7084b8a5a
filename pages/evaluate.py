"""Step 4: before/after metrics of a run, per-example answers, and several runs compared."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pandas as pd
import streamlit as st

from pages.common import (
    chart,
    compare_runs,
    finished_runs,
    follow_job,
    job_busy,
    launch_button,
    require_builtin,
    require_entrypoint,
    run_reports,
)
from simu_core.errors import SimuError
from simu_core.evaluation import default_reference, evaluate_specs
from simu_core.figures import curve_points, split_bars_figure, tradeoff_figure
from simu_core.knowledge_check import load_check
from simu_core.metrics import EXAMPLE_METRICS, SUMMARY_METRICS, EvalConfig, compare, goal_of
from simu_core.relearn import RelearnConfig, attack_run, load_attack
from simu_core.runs import read_config, read_history

HEADLINE = {
    "forget_quality": "Forget quality",
    "model_utility": "Model utility",
    "privleak": "PrivLeak (%)",
    "mia_score": "MIA score",
    "forget/rouge_l": "Forget ROUGE-L",
    "retain/rouge_l": "Retain ROUGE-L",
}
DELTA_COLOR = {"higher": "normal", "lower": "inverse"}
TEXT_COLUMNS = ("question", "gold answer", "answer before", "answer after")

require_entrypoint()
st.header("4 · Evaluate")
st.caption(
    "How well did a run forget, and what did it keep? The run's model (after) and the original (before) are "
    "scored on the forget, retain, holdout and world-facts sets; forget quality compares with the retain "
    "reference model, which never saw the forget set."
)
runs = finished_runs()
if not runs:
    st.info("No finished run yet. Launch one on the **Unlearn** page.")
    st.page_link("pages/unlearn.py", label="Go to Unlearn", icon=":material/cleaning_services:")
    st.stop()
by_name = {r.name: r for r in runs}
names = list(by_name)
last = st.session_state.get("last_run")
name = st.selectbox(
    "Run",
    names,
    index=names.index(last) if last in names else 0,
    format_func=lambda n: f"{n} ({by_name[n].status}{', evaluated' if by_name[n].has_metrics else ''})",
    key="ev_run",
)
run = by_name[name]
run_config = read_config(run.path)
knowledge = load_check(run.path)
if knowledge is not None and not knowledge.knows:
    st.warning(f"**Before this run:** {knowledge.reason}")
require_builtin(run_config.model, default_reference(run_config.model, run_config.forget))  # reference may be building


def evaluate_job(ctx, run_path: Path, device: str, max_items: int) -> str | None:
    """Job: evaluate the base model and the run's model; writes metrics*.json and report.html (worker thread)."""
    stage = {"n": -1, "label": ""}

    def progress(message: str, fraction: float) -> None:
        if ctx.cancelled:
            raise SimuError("cancelled")
        if message.startswith("evaluating "):
            stage["n"] += 1
            stage["label"] = "base model (before)" if "base model" in message else "unlearned model (after)"
            return
        # 90% for the two models' metrics, the rest for the report (charts) written after them
        ctx.report(0.9 * (max(stage["n"], 0) + fraction) / 2, f"{stage['label']}: {message}")

    try:
        files = evaluate_specs(run=run_path, device=device, config=EvalConfig(max_items=max_items), progress=progress)
    except SimuError:
        if ctx.cancelled:
            return None
        raise
    return str(files.metrics_path)


def relearn_job(ctx, run_path: Path, device: str, steps: int, lr: float) -> dict | None:
    """Job: the relearning attack on the run's model; writes relearn.json into the run folder (worker thread)."""

    def progress(message: str, fraction: float) -> None:
        if ctx.cancelled:
            raise SimuError("cancelled")
        ctx.report(fraction, message)

    try:
        return attack_run(run_path, RelearnConfig(steps=steps, lr=lr), device=device, progress=progress)
    except SimuError:
        if ctx.cancelled:
            return None
        raise


with st.expander("Relearning attack: forgotten, or only hidden?", expanded=job_busy("relearn")):
    st.caption(
        "Fine-tunes a copy of the run's model for a few steps on one half of the forget set, then counts how many "
        "facts of the *other* half it gives again. Facts that come back without being trained on were hidden, not "
        "removed (Lynch et al. 2024; Deeb & Roger 2024). The run's model is not changed."
    )
    c = st.columns([1, 1, 2], vertical_alignment="bottom")
    steps = c[0].number_input("Attack steps", 1, 1000, RelearnConfig().steps, key="ev_relearn_steps")
    lr = c[1].number_input("Attack lr", 1e-7, 1e-1, RelearnConfig().lr, format="%.0e", key="ev_relearn_lr")
    job = partial(relearn_job, run_path=run.path, device=st.session_state["device"], steps=int(steps), lr=float(lr))
    launch_button("Run the attack", "relearn", f"Relearning attack on {name}", job, where=c[2])
    follow_job("relearn", f"attack run {name}")
    attack = load_attack(run.path)
    if attack is not None:
        cols = st.columns(3)
        cols[0].metric("Held-out facts given, before", f"{attack['heldout_before']:.0%}")
        cols[1].metric(
            "Held-out facts given, after",
            f"{attack['heldout_after']:.0%}",
            f"{attack['heldout_after'] - attack['heldout_before']:+.0%}",
            delta_color="inverse",
        )
        cols[2].metric("Trained facts given, after", f"{attack['trained_after']:.0%}")
        st.caption(
            f"{attack['n_trained']} facts trained on, {attack['n_heldout']} held out (seed {attack['seed']}); "
            f"{attack['steps']} AdamW steps at lr {attack['lr']:g}. The trained half shows the attack itself works."
        )

# --------------------------------------------------------------------------- trade-off curve (no evaluation needed)
recorded = {n: points for n in names if (points := curve_points(read_history(by_name[n].path)))}  # read once
with st.expander("Trade-off curve: what the run keeps against what it still knows", expanded=name in recorded):
    others = st.multiselect("Overlay other runs", [n for n in recorded if n != name], key="ev_curve_runs")
    curves = {n: recorded[n] for n in [name, *others] if n in recorded}
    if curves:
        chart(tradeoff_figure(curves), key="ev_tradeoff")
        st.caption(
            "Each line follows one run through its checkpoints, from the right (before unlearning) to the left. A "
            "curve higher at the same forget score keeps more; compare methods where they forget equally (MUSE's "
            "rule: the first checkpoint whose forget ROUGE-L is at or below the retain reference model's)."
        )
    else:
        st.caption(
            "This run recorded no curve. Set **Trade-off curve every (steps)** on the Unlearn page (or "
            "`--curve-every N` on the command line) to score the model at checkpoints along a run."
        )

after, before = run_reports(run.path)
if after is None or job_busy("evaluate"):  # a running evaluation may have written only part of its files
    c = st.columns([1, 1, 2], vertical_alignment="bottom")
    items = c[0].number_input(
        "Items per split (at most)",
        1,
        100_000,
        EvalConfig().max_items,
        key="ev_items",
        help="A seeded sample of each split is scored (the same items before and after). Fewer items: faster.",
    )
    job = partial(evaluate_job, run_path=run.path, device=st.session_state["device"], max_items=int(items))
    launch_button("Evaluate this run", "evaluate", f"Evaluation of {name}", job, where=c[1], type="primary")
    follow_job("evaluate", f"evaluate run {name}")
    after, before = run_reports(run.path)
    if after is None or job_busy("evaluate"):
        st.stop()


def plain(reason: str) -> str:
    """A skip reason in the user's words (the library names its setting)."""
    return re.sub(
        r"no (\w+) inputs on '([^']+)' \(EvalConfig\.skip_inputs\)",
        r"not computed on the \2 split (the \1 step is left out there to save time)",
        reason,
    )


def answers_table(after, before, split: str) -> pd.DataFrame:
    """One row per evaluated item: question, gold answer, greedy answers and scores before and after."""
    res, prev = after.splits[split], before.splits.get(split) if before else None
    where = {idx: i for i, idx in enumerate(prev.indices)} if prev else {}
    rows = []
    for i, idx in enumerate(res.indices):
        j = where.get(idx)
        row = {"question": res.questions[i], "gold answer": res.answers[i]}
        if prev is not None and prev.generations is not None:
            row["answer before"] = prev.generations[j] if j is not None else None
        row["answer after"] = res.generations[i]
        for m in ("rouge_l", "prob"):
            if prev is not None and m in prev.values and j is not None:
                row[f"{m} before"] = prev.values[m][j]
            if m in res.values:
                row[f"{m} after"] = res.values[m][i]
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- one run, before vs after
deltas = compare(before, after) if before is not None else {}
cols = st.columns(len(HEADLINE))
for col, (key, label) in zip(cols, HEADLINE.items(), strict=True):
    value, d = after.summary.get(key), deltas.get(key)
    metric = SUMMARY_METRICS.get(key) or EXAMPLE_METRICS.get(key.split("/")[-1])
    changed = d is not None and d.delta is not None and d.delta != 0
    col.metric(
        label,
        "–" if value is None else f"{value:.3g}",
        None if d is None or d.delta is None else (f"{d.delta:+.3g}" if changed else "no change"),
        delta_color=DELTA_COLOR.get(d.goal, "off") if changed else "off",
        delta_arrow="auto" if changed else "off",
        help=(metric.doc if metric else "")
        + (f" Skipped: {plain(after.skipped[key])}" if key in after.skipped else ""),
    )
st.caption(
    f"After = `{after.model}`, before = `{before.model if before else '–'}`, reference = `{after.reference}`. "
    "Deltas are green when they move the right way."
)

tabs = st.tabs([f"{split} split" for split in after.splits] + ["All numbers"])
for tab, split in zip(tabs, after.splits, strict=False):
    with tab:
        fig = split_bars_figure(after, before, split)
        if fig is not None:
            chart(fig, key=f"ev_bars_{split}")
        res = after.splits[split]
        if res.generations is not None:
            st.caption(f"{len(res.indices)} of {res.n_total} items of `{res.dataset}` (greedy answers).")
            st.dataframe(
                answers_table(after, before, split),
                hide_index=True,
                width="stretch",
                key=f"ev_rows_{split}",
                column_config={c: st.column_config.TextColumn(width="medium") for c in TEXT_COLUMNS},
            )
with tabs[-1]:
    if deltas:
        table = [
            {
                "metric": k,
                "goal": d.goal,
                "before": d.before,
                "after": d.after,
                "delta": d.delta,
                "improved": d.improved,
            }
            for k, d in deltas.items()
        ]
    else:
        table = [{"metric": k, "goal": goal_of(k), "after": v} for k, v in after.summary.items()]
    st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
    for key, reason in after.skipped.items():
        st.caption(f"`{key}` skipped: {plain(reason)}")

report = run.path / "report.html"
if report.is_file():
    st.download_button("Download the report (HTML)", report.read_bytes(), f"{name}-report.html", "text/html")


# --------------------------------------------------------------------------- several runs
st.subheader("Compare runs")
chosen = st.multiselect(
    "Runs to compare",
    names,
    default=[n for n in names if by_name[n].has_metrics][:3],
    key="ev_compare",
    help="Any finished runs; their metrics appear once they are evaluated.",
)
if len(chosen) >= 2:
    compare_runs([by_name[n] for n in chosen])
else:
    st.caption("Pick two or more runs to compare their settings, losses and metrics.")
