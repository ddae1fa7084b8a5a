"""Step 3: choose a method and its settings, launch a background run, watch its losses, cancel."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import streamlit as st

from pages.common import (
    chart,
    data_label,
    dataset_key,
    follow_job,
    launch_button,
    need_setup,
    require_entrypoint,
    result_store,
    runs_dir,
    show_error,
)
from simu_core.config import MaskConfig, UnlearnConfig
from simu_core.errors import SimuError
from simu_core.figures import history_figure
from simu_core.jobs import DONE
from simu_core.masks import MLP_PARTS, make_mask
from simu_core.neurons import NeuronMask
from simu_core.optim import ESTIMATORS
from simu_core.runs import read_history, run_unlearning
from simu_core.unlearn import METHODS, PRESET_NOTES, preset_config, validate_config

require_entrypoint()
st.header("3 · Unlearn")
st.caption(
    "Train a copy of the model to forget the forget set while keeping the retain set. SIMU updates only the "
    "critical neurons found on the Attribution page (masked Sophia + GradDiff); the other methods are the "
    "baselines it is compared with. The shared model is never changed: every run trains its own copy."
)
loaded, forget, retain = need_setup()

names = list(METHODS)
method = st.selectbox(
    "Method",
    names,
    format_func=lambda m: f"{m} · {METHODS[m].help}",
    key="ul_method",
    help="random_mask is the control for SIMU: a random mask with the same number of neurons per layer.",
)
preset = preset_config(method)
st.caption(f"Presets: {PRESET_NOTES}.")


def field(col, label: str, name: str, help: str, **kw):
    """A number input for one config field, defaulting to the method's preset (one widget per method)."""
    return col.number_input(label, value=getattr(preset, name), key=f"ul_{method}_{name}", help=help, **kw)


c = st.columns(4)
steps = field(c[0], "Steps", "steps", "Optimiser steps at most (early stopping may end the run sooner).", min_value=1)
lr = field(
    c[1],
    "Learning rate",
    "lr",
    "Step size. Too high wrecks the model (the run stops on collapse); too low forgets nothing.",
    min_value=1e-9,
    max_value=1.0,
    step=1e-5,
    format="%.2e",
)
gamma = field(
    c[2],
    "Retain weight γ",
    "gamma",
    "Weight of the retain loss (GradDiff, NPO): higher keeps more of what the model knows about the retain set.",
    min_value=0.0,
    step=0.5,
)
batch = field(c[3], "Batch size", "batch_size", "Forget (and retain) examples per step.", min_value=1)
c = st.columns(4)
stop_on = c[0].checkbox(
    "Stop when forgotten",
    value=preset.stop_forget_em is not None,
    key=f"ul_{method}_stop_on",
    help="Stop early once the forget set's greedy exact match falls to the target (checked every few steps).",
)
stop_em = c[1].number_input(
    "Target forget exact match",
    0.0,
    1.0,
    preset.stop_forget_em if preset.stop_forget_em is not None else 0.05,
    0.05,
    key=f"ul_{method}_stop_em",
    disabled=not stop_on,
    help="0.05 = at most 5% of the forget answers still begin with the gold answer as their first sentence "
    "(case, punctuation and articles aside).",
)
seed = field(c[2], "Seed", "seed", "Seeds batching, sampling and the random mask: same seed, same run.", min_value=0)
eval_every = field(
    c[3], "Check every (steps)", "eval_every", "How often the early-stop target is checked.", min_value=1
)

extra: dict = {}
with st.expander("Optimiser and loss settings"):
    c = st.columns(4)
    if preset.optimizer == "sophia":
        extra["rho"] = field(c[0], "Sophia ρ", "rho", "Clipping scale of Sophia's update (SOUL: 0.04).", format="%.3f")
        extra["estimator"] = c[1].selectbox(
            "Curvature estimator",
            ESTIMATORS,
            index=list(ESTIMATORS).index(preset.estimator),
            key=f"ul_{method}_estimator",
            help="gnb: Gauss-Newton-Bartlett (default); hutchinson: u·(Hu), slower; sqgrad: squared gradient (SOUL's code).",
        )
        extra["hessian_interval"] = field(
            c[2], "Curvature every k steps", "hessian_interval", "Sophia's k.", min_value=1
        )
    if preset.loss == "npo":
        extra["npo_beta"] = field(c[3], "NPO β", "npo_beta", "Inverse temperature of NPO.", format="%.3f")
    st.caption(f"Optimiser `{preset.optimizer}`, loss `{preset.loss}`, betas {tuple(preset.betas)}.")

# --------------------------------------------------------------------------- mask (SIMU and its control)
mask: NeuronMask | None = None
mask_config: MaskConfig | None = None
if METHODS[method].mask is not None:
    with st.container(border=True):
        st.markdown("**Trainable set and neuron mask**")
        c = st.columns([1, 1, 2])
        extra["attention"] = c[0].checkbox(
            "Train attention too",
            value=preset.attention,
            key=f"ul_{method}_attention",
            help="Also train the attention projections in full (more parameters; the built-in probes did better without).",
        )
        extra["mlp_parts"] = c[1].selectbox(
            "MLP parts",
            MLP_PARTS,
            index=MLP_PARTS.index(preset.mlp_parts),
            key=f"ul_{method}_mlp",
            help="down: the selected neurons' output weights; down_up: also their input rows of gate/up.",
        )
        choice = st.session_state.get("mask_choice")
        store = result_store()
        here = {"model": loaded.spec, "device": str(loaded.device), "forget": dataset_key(forget)}
        matches = choice is not None and all(choice[k] == v for k, v in here.items())
        matches = matches and all(k in store for k in choice["key"])
        if matches:
            f, r = (store[k] for k in choice["key"])
            agg = {"aggregate": choice.get("aggregate", "sum"), "top_k": choice.get("top_k", 1.0)}
            mask = make_mask(f, choice["rule"], choice["value"], retain=r, dual=choice["dual"], score=choice["score"],
                             **agg)  # fmt: skip
            mask_config = MaskConfig(
                f.method, f.steps, choice["rule"], choice["value"], choice["dual"], choice["score"],
                target=f.target, baseline=f.baseline, positions=f.positions, **agg,
            )  # fmt: skip
            c[2].success(
                f"Mask from the Attribution page: **{mask.total()} neurons** ({choice['rule']} {choice['value']}, "
                f"{f.method}, score {choice['score']}, dual {choice['dual']})"
                + (" — the control draws the same number at random per layer." if method == "random_mask" else "")
            )
        else:
            m = preset.mask
            c[2].info(
                f"The mask is computed at launch with the preset ({m.method}, m={m.steps}, {m.rule} {m.value}, "
                f"score {m.score}). Visit the **Attribution** page to look at it and change it first."
            )


# --------------------------------------------------------------------------- launch
def build_config() -> UnlearnConfig:
    cfg = preset_config(
        method,
        steps=int(steps),
        lr=float(lr),
        gamma=float(gamma),
        batch_size=int(batch),
        retain_batch_size=int(batch),
        seed=int(seed),
        eval_every=int(eval_every),
        model=loaded.spec,
        forget=data_label("forget"),
        retain=data_label("retain"),
        device=st.session_state["device"],
        mask=mask_config,
        **extra,
    )
    cfg.stop_forget_em = float(stop_em) if stop_on else None
    validate_config(cfg)
    return cfg


def run_job(ctx, config: UnlearnConfig, base, forget, retain, mask: NeuronMask | None, folder: Path) -> dict:
    """Job: one unlearning run saved under `folder` (worker thread; no Streamlit here)."""
    needs_mask = METHODS[config.method].mask is not None and mask is None
    ctx.report(0.0, "copying the model" + (" and computing the neuron mask (attribution)" if needs_mask else ""))

    def on_step(record) -> None:
        ctx.report(record.step / record.steps, f"step {record.step}/{record.steps}", **record.to_dict())

    result, path = run_unlearning(
        config, folder, base=base, forget=forget, retain=retain, mask=mask, callback=on_step, cancel=ctx.cancel_event
    )
    return {"folder": str(path), "summary": result.summary()}


try:
    config, problem = build_config(), None
except SimuError as err:
    config, problem = None, err
job = partial(run_job, config=config, base=loaded, forget=forget, retain=retain, mask=mask, folder=runs_dir())
launch_button(
    "Launch unlearning",
    "unlearn",
    f"Unlearning ({method})",
    job,
    type="primary",
    disabled=config is None,
    help="Runs in the background; one heavy job runs at a time on this server, later ones wait in a queue.",
)
if problem is not None:
    show_error(problem, "use these settings")


def live(status) -> None:
    if status.records:
        chart(history_figure({"run": status.records}, "Losses so far"), key="ul_live")


status = follow_job("unlearn", "run the unlearning", live=live)
if status is not None and status.result:
    summary, folder = status.result["summary"], Path(status.result["folder"])
    st.session_state["last_run"] = folder.name
    text = (
        f"Run `{folder.name}`: **{summary['status']}** ({summary['stop_reason']}) after {summary['steps_done']} "
        f"steps in {summary['seconds']:.1f} s."
    )
    if summary["status"] == "failed":
        st.error(f"{text} {summary['error']}")
    elif status.state == DONE:
        st.success(text)
    c = st.columns(4)
    c[0].metric("Forget loss", f"{summary['forget_loss']:.3f}" if summary["forget_loss"] is not None else "–",
                help="Last batch, nats per answer token (higher = more forgotten).")  # fmt: skip
    c[1].metric("Retain loss", f"{summary['retain_loss']:.3f}" if summary["retain_loss"] is not None else "–",
                help="Last batch, nats per answer token (should stay low).")  # fmt: skip
    c[2].metric(
        "Forget exact match",
        "–" if summary["forget_em"] is None else f"{summary['forget_em']:.2f}",
        help="Greedy answers equal to the forget answers, checked with 'Stop when forgotten' (the Evaluate page has all metrics).",
    )
    c[3].metric("Trainable parameters", f"{summary['trainable_params']:,}",
                f"{summary['trainable_params'] / summary['total_params']:.2%} of the model", delta_color="off", delta_arrow="off")  # fmt: skip
    if (folder / "history.jsonl").is_file():
        chart(history_figure({folder.name: read_history(folder)}), key="ul_final")
    c = st.columns(2)
    c[0].page_link("pages/evaluate.py", label="Evaluate this run", icon=":material/fact_check:")
    c[1].page_link("pages/runs.py", label="All runs", icon=":material/history:")
