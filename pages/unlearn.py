"""Step 3: choose a method and its settings, launch a background run, watch its losses, cancel."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import streamlit as st

from pages.common import (
    chart,
    dataset_key,
    duration,
    eta_text,
    follow_job,
    job_busy,
    knowledge_warning,
    launch_button,
    need_setup,
    require_entrypoint,
    result_store,
    runs_dir,
    session_job,
    show_error,
)
from simu_core.config import MaskConfig, UnlearnConfig
from simu_core.errors import SimuError
from simu_core.evaluation import curve_sets
from simu_core.figures import history_figure
from simu_core.jobs import DONE, eta_to_stop
from simu_core.masks import MLP_PARTS, make_mask
from simu_core.methods import METHODS, MODEL_PRESETS, PRESET_NOTES, SMOLLM2_PRESET_NOTES, preset_config
from simu_core.neurons import NeuronMask
from simu_core.optim import ESTIMATORS
from simu_core.runs import read_history, run_unlearning
from simu_core.unlearn import validate_config

require_entrypoint()
st.header("3 · Unlearn")
st.caption(
    "Train a copy of the model to forget the forget set while keeping the retain set. SIMU updates only the "
    "critical neurons found on the Attribution page (masked Sophia + GradDiff); the other methods are the "
    "baselines it is compared with. The shared model is never changed: every run trains its own copy."
)
loaded, forget, retain = need_setup()
knowledge = knowledge_warning(loaded, forget, retain)

names = list(METHODS)
method = st.selectbox(
    "Method",
    names,
    format_func=lambda m: f"{m} · {METHODS[m].help}",
    key="ul_method",
    help="simu_paper is SIMU as the paper describes it (attention in full + the critical neurons' down-projection "
    "columns); simu also trains their gate/up rows and no attention. random_mask and random_mask_paper are their "
    "controls: a random mask with the same number of neurons per layer.",
)
preset = preset_config(method, model=loaded.spec)
own_preset = loaded.spec in MODEL_PRESETS  # SmolLM2 has presets of its own; other models start from the default's
st.caption(
    f"Each method starts from settings that worked well on {'this model' if own_preset else 'the built-in benchmark'} "
    "(its preset); change them freely.",
    help=f"Presets: {SMOLLM2_PRESET_NOTES if own_preset else PRESET_NOTES}.",
)


def field(col, label: str, name: str, help: str, **kw):
    """A number input for one config field, defaulting to the method's preset (one widget per method)."""
    key = f"ul_{loaded.spec}_{method}_{name}" if own_preset else f"ul_{method}_{name}"  # its own preset: own widgets
    return col.number_input(label, value=getattr(preset, name), key=key, help=help, **kw)


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
    c = st.columns(4)
    extra["curve_every"] = field(
        c[0], "Trade-off curve every (steps)", "curve_every",
        "0 = off. Every this many steps, score greedy answers on a sample of the forget, retain and (built-in "
        "data) world-facts sets; the Evaluate page plots what each run keeps against what it still knows.",
        min_value=0,
    )  # fmt: skip
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
                + (
                    " — the control draws the same number at random per layer."
                    if METHODS[method].mask == "random"
                    else ""
                )
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
        forget=st.session_state["forget_spec"],
        retain=st.session_state["retain_spec"],
        device=st.session_state["device"],
        mask=mask_config,
        **extra,
    )
    cfg.stop_forget_em = float(stop_em) if stop_on else None
    validate_config(cfg)
    return cfg


def run_job(
    ctx, config: UnlearnConfig, base, forget, retain, mask: NeuronMask | None, folder: Path, knowledge=None
) -> dict:
    """Job: one unlearning run saved under `folder`, with the knowledge check if there is one (worker thread)."""
    needs_mask = METHODS[config.method].mask is not None and mask is None
    ctx.report(0.0, "copying the model" + (" and computing the neuron mask (attribution)" if needs_mask else ""))

    def on_step(record) -> None:
        ctx.report(record.step / record.steps, f"step {record.step}/{record.steps}", **record.to_dict())

    extra = curve_sets(config.forget) if config.curve_every else None
    result, path = run_unlearning(config, folder, base=base, forget=forget, retain=retain, mask=mask, callback=on_step,
                                  cancel=ctx.cancel_event, curve_sets=extra)  # fmt: skip
    if knowledge is not None:
        knowledge.save(path)  # the run says whether the model knew its forget set before it started
    return {"folder": str(path), "summary": result.summary()}


try:
    config, problem = build_config(), None
except SimuError as err:
    config, problem = None, err
job = partial(
    run_job, config=config, base=loaded, forget=forget, retain=retain, mask=mask, folder=runs_dir(), knowledge=knowledge
)


# --------------------------------------------------------------------------- memory plan (before launch)
def memory_plan(cfg: UnlearnConfig | None) -> None:
    """Estimated peak memory of this run next to SOUL's (SIMU's, for SOUL) on the session's device."""
    from simu_core.memory import PARTS, run_plans, size_text

    if cfg is None:
        return
    try:
        plans = run_plans(loaded, forget, retain, cfg, mask.total() if mask else None, cfg.device)
    except SimuError as err:
        show_error(err, "plan the memory")
        return
    if plans[0].fits is False:
        simu = "choose SIMU (its optimiser state covers only the selected neurons), " if cfg.method != "simu" else ""
        st.warning(
            f"This run needs about {size_text(plans[0].total)} but {plans[0].device} has "
            f"{size_text(plans[0].available or 0)} free, so it would stop before training with 'not enough "
            f"memory'. Lower the batch sizes, {simu}or free memory."
        )
    with st.expander("Memory plan: this run vs the comparison method, per device"):
        rows = {part: [size_text(getattr(p, part)) for p in plans] for part in PARTS}
        rows["trainable entries"] = [f"{p.trainable:,}" for p in plans]
        rows["fits"] = ["yes" if p.fits else "NO" for p in plans]
        st.table({"": list(rows), **{p.method: [rows[k][i] for k in rows] for i, p in enumerate(plans)}})
        st.caption(
            f"Device: {plans[0].device}, {size_text(plans[0].available or 0)} free. Estimates (see `python -m "
            "simu_core plan`): within 12% of measured CPU peaks on the built-ins and a SmolLM2-shaped model. "
            "Every run checks its own plan before it trains."
            + ("" if mask is not None or METHODS[cfg.method].mask is None else " SIMU assumes 5% of the neurons.")
        )


memory_plan(config)
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


def unlearn_eta(status) -> str:
    """Time left to the step budget and, when the run stops early on a forget target, to the expected stop."""
    job = session_job("unlearn")
    cfg = job.fn.keywords.get("config") if job is not None and isinstance(job.fn, partial) else None
    steps = status.records[-1]["steps"] if status.records else None
    text = eta_text(status).replace(" left", f" left to the {steps}-step budget" if steps else " left")
    targets = [] if cfg is None else [
        (key, value, label) for key, value, label in (
            ("forget_em", cfg.stop_forget_em, "forget exact match"),
            ("forget_rouge", cfg.stop_forget_rouge, "forget ROUGE-L"),
            ("forget_nll", cfg.stop_forget_loss, "forget loss"),
        ) if value is not None
    ]  # fmt: skip
    if not targets:
        return text
    stops = [(eta_to_stop(status, key, value), label, value) for key, value, label in targets]
    known = [s for s in stops if s[0] is not None]
    if not known:
        return text + " · early stop when the forget target is met: no trend towards it yet"
    seconds, label, value = min(known)
    return text + f" · about {duration(seconds)} to the expected early stop ({label} → {value:g})"


last = session_job("unlearn")
last_config = last.fn.keywords.get("config") if last is not None and isinstance(last.fn, partial) else None
if last_config is not None and last_config.method != method and not job_busy("unlearn"):
    status = None  # the last run was another method's: its outcome is not this launch button's
    st.caption(f"The last run ({last_config.method}) is on the **Runs** page.")
else:
    status = follow_job("unlearn", "run the unlearning", live=live, eta=unlearn_eta)
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
