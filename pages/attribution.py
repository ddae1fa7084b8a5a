"""Step 2: score every MLP neuron on the forget and retain sets, pick the critical ones, look at one example."""

from __future__ import annotations

from functools import partial

import streamlit as st

from pages.common import (
    chart,
    data_label,
    dataset_key,
    follow_job,
    job_busy,
    knowledge_warning,
    launch_button,
    need_setup,
    require_entrypoint,
    result_store,
    session_job,
    submit_job,
)
from simu_core import attribution as att
from simu_core import data as qa
from simu_core import figures
from simu_core.arch import count_parameters
from simu_core.errors import SimuError
from simu_core.jobs import item_weighted
from simu_core.masks import DUAL_POLICIES, RULES, SCORE_KINDS, make_mask, trainable_count
from simu_core.neurons import param_counts
from simu_core.unlearn import preset_config

AUTO_START_PARAMS = 50e6  # below this size the default scores are computed as soon as the page opens
PRESET = preset_config("simu")
METHOD_HELP = {
    "simu_ig": "SIMU: integrated gradients of each layer's activations (m steps). The paper's score.",
    "grad_x_act": "Gradient × activation: one pass, fastest (m = 1).",
    "captum_ig": "Captum IntegratedGradients over the activations (same path as simu_ig; the reference).",
    "captum_gxa": "Captum LayerGradientXActivation (same as grad_x_act; the reference).",
    "captum_layer_ig": "Captum LayerIntegratedGradients: baseline = an all-padding input, not zero activations.",
    "captum_conductance": "Captum LayerConductance: interpolates the input embeddings from zero.",
}
RULE_HELP = {
    "layer_threshold": "SIMU: neuron k of layer l is critical if its score > t × the layer's top score.",
    "layer_percent": "The top p% of every layer.",
    "layer_top": "The top k neurons of every layer.",
    "global_top": "The top p% of all neurons (tends to pick mostly one layer).",
}

require_entrypoint()
st.header("2 · Attribution")
st.caption(
    "Which MLP neurons hold the forget set? Each neuron gets a score: how much the model's log-likelihood of the "
    "memorised answers drops when the neuron's activation is scaled to zero (positive = supports the answer). "
    "Neurons that score high on the forget set are *critical*; those that also score high on the retain set are "
    "*dual*. Only critical neurons are trained by SIMU."
)
loaded, forget, retain = need_setup()
knowledge_warning(loaded, forget, retain)
retain_part = qa.QADataset(retain.name, retain.items[: PRESET.mask.retain_limit])

# --------------------------------------------------------------------------- scores
methods = [m for m in METHOD_HELP if m in att.METHODS] + [m for m in att.METHODS if m not in METHOD_HELP]
left, mid, right = st.columns([3, 1, 2], vertical_alignment="bottom")
method = left.selectbox(
    "Attribution method",
    methods,
    index=methods.index(PRESET.mask.method),
    key="att_method",
    help="\n\n".join(f"**{m}**: {METHOD_HELP.get(m, '')}" for m in methods),
)
one_step = method in att.ONE_STEP
steps = mid.number_input(
    "Steps m",
    min_value=1,
    max_value=32,
    value=1 if one_step else PRESET.mask.steps,
    disabled=one_step,
    key=f"att_steps_{one_step}",
    help="Integration steps (SIMU uses 3–5). More steps: closer to the exact integral, proportionally slower.",
)
steps = 1 if one_step else int(steps)
here = (loaded.spec, loaded.source, str(loaded.device), method, steps)  # source: the same spec in another home
keys = {"forget": ("scores", *here, dataset_key(forget)), "retain": ("scores", *here, dataset_key(retain_part))}
key = (keys["forget"], keys["retain"])  # the scores a selection is made from
store = result_store()


def compute_scores(ctx, loaded, todo: dict, method: str, steps: int, store: dict) -> None:
    """Job: the scores of each data set in `todo` ({role: (dataset, key)}), each stored under its key as soon
    as it is ready, so the page can draw the forget scores while the retain scores are computed (worker thread)."""
    sizes = [len(dataset) for dataset, _ in todo.values()]  # progress by items: the retain part is the larger
    for i, (role, (dataset, key)) in enumerate(todo.items()):

        def progress(message: str, fraction: float, i: int = i, role: str = role, n: int = len(dataset)) -> None:
            if ctx.cancelled:
                raise SimuError("cancelled")
            ctx.report(item_weighted(sizes, i, fraction), f"{role} set ({n} items): {message}")

        try:
            store[key] = att.attribute(loaded, dataset, method=method, steps=steps, progress=progress)
        except SimuError:
            if ctx.cancelled:
                return
            raise


def start_scores() -> None:
    """Queue the missing scores (a running job for other settings is no longer wanted: cancel it)."""
    if job_busy("attribution") and st.session_state.get("att_job_for") != key:
        session_job("attribution").cancel()
    job = partial(compute_scores, loaded=loaded, todo=todo, method=method, steps=steps, store=store)
    submit_job("attribution", f"Attribution ({method}, m={steps})", job)
    st.session_state["att_job_for"] = key


todo = {role: (ds, keys[role]) for role, ds in (("forget", forget), ("retain", retain_part)) if keys[role] not in store}
running = job_busy("attribution") and st.session_state.get("att_job_for") == key
if right.button(
    "Compute scores",
    key="launch_attribution",
    type="primary" if todo else "secondary",
    disabled=not todo or running,
    help="Runs in the background (one job at a time on this server).",
):
    start_scores()
    st.rerun()
small = count_parameters(loaded.model) < AUTO_START_PARAMS
if todo and small and not running and not st.session_state.get(f"att_auto_{key}"):
    st.session_state[f"att_auto_{key}"] = True  # starts by itself once on small models; later on click only
    start_scores()


def wait_for(role: str):
    """The role's scores, or the job's progress and a stop (the page reruns when the job ends)."""
    if keys[role] not in store:
        follow_job("attribution", "compute the neuron scores", ready=lambda: keys[role] in store)
    if keys[role] not in store:
        if not job_busy("attribution"):
            st.info("Press **Compute scores** to score every neuron on the forget and retain sets.")
        st.stop()
    return store[keys[role]]


forget_scores = wait_for("forget")
st.caption(
    f"Scores of {sum(forget_scores.widths())} neurons in {len(forget_scores.layers)} layers on "
    f"`{data_label('forget')}` ({forget_scores.n_examples} items, {forget_scores.seconds:.1f} s). "
    "Units: nats of answer log-likelihood."
)
chart(figures.scores_heatmap(forget_scores), key="att_heatmap")
retain_scores = wait_for("retain")


# --------------------------------------------------------------------------- selection
@st.fragment
def selection() -> None:
    """Rule, value, score and dual policy -> counts, trainable fraction, scatter and bars (no recomputation)."""
    st.subheader("Select the critical neurons")
    st.caption(
        f"Retain scores: first {retain_scores.n_examples} items of `{data_label('retain')}` "
        f"({retain_scores.seconds:.1f} s). Moving these controls only re-selects from the stored scores."
    )
    saved = st.session_state.get("mask_choice", {})
    c1, c2, c3, c4 = st.columns(4)
    rules = list(RULES)
    rule = c1.selectbox(
        "Rule",
        rules,
        index=rules.index(saved.get("rule", PRESET.mask.rule)),
        key="att_rule",
        help="\n\n".join(f"**{r}**: {RULE_HELP.get(r, '')}" for r in rules),
    )
    score = c3.selectbox(
        "Score",
        SCORE_KINDS,
        index=SCORE_KINDS.index(saved.get("score", PRESET.mask.score)),
        key="att_score",
        help="forget: rank by the forget score. forget_minus_retain: by forget minus retain score, each scaled to "
        "unit size per layer (neurons that matter much more for the forget set than for the retain set).",
    )
    dual = c4.selectbox(
        "Dual neurons",
        DUAL_POLICIES,
        index=DUAL_POLICIES.index(saved.get("dual", PRESET.mask.dual)),
        key="att_dual",
        help="Dual = critical for forget AND retain. include (default, reported better) keeps them; exclude drops them.",
    )
    with c2:
        value = rule_value(rule, saved.get("value") if saved.get("rule") == rule else None, min(forget_scores.widths()))
    try:
        mask = make_mask(forget_scores, rule, value, retain=retain_scores, dual="include", score=score)
        retain_critical = make_mask(retain_scores, rule, value)
    except SimuError as err:
        st.error(f"**Cannot select neurons with these settings.** {err}")
        return
    duals = [m & r for m, r in zip(mask.layers, retain_critical.layers, strict=True)]
    if dual == "exclude":
        mask = make_mask(forget_scores, rule, value, retain=retain_scores, dual="exclude", score=score)
    st.session_state["mask_choice"] = {
        "key": key, "model": loaded.spec, "device": str(loaded.device), "forget": dataset_key(forget),
        "rule": rule, "value": value, "score": score, "dual": dual,
    }  # fmt: skip

    counts = forget_scores.counts() or param_counts(loaded.model)
    trainable = trainable_count(mask, counts, mlp=PRESET.mlp_parts, attention=PRESET.attention)
    m1, m2, m3 = st.columns(3)
    m1.metric(
        "Selected neurons",
        f"{mask.total()} of {sum(mask.widths())}",
        f"{mask.fraction():.1%}",
        delta_color="off",
        delta_arrow="off",
    )
    m2.metric(
        "Dual neurons",
        sum(int(d.sum()) for d in duals),
        "excluded" if dual == "exclude" else "kept",
        delta_color="off",
        delta_arrow="off",
    )
    m3.metric(
        "Trainable parameters",
        f"{trainable:,}",
        f"{trainable / counts.total:.3%} of the model",
        delta_color="off",
        delta_arrow="off",
        help=f"With the SIMU preset's trainable set: MLP parts `{PRESET.mlp_parts}`, attention "
        f"{'on' if PRESET.attention else 'off'} (change them on the Unlearn page).",
    )
    left, right = st.columns([3, 2])
    with left:
        chart(figures.selection_scatter(forget_scores, retain_scores, mask, duals), key="att_scatter")
    with right:
        chart(figures.selection_bars(mask, duals), key="att_bars")
    st.caption("The Unlearn page uses this selection for SIMU when you launch a run with the same model and data.")


def rule_value(rule: str, saved: float | None, narrowest: int) -> float:
    """The slider of the rule's value (threshold t, percent, or k)."""
    if rule == "layer_threshold":
        default = saved if saved is not None else PRESET.mask.value
        return st.slider("Threshold t", 0.01, 1.0, float(default), 0.01, key="att_value_t",
                         help="Critical if score > t × the layer's top score. Higher t = fewer neurons.")  # fmt: skip
    if rule == "layer_top":
        default = int(saved) if saved is not None else max(1, narrowest // 20)
        return st.slider("Neurons per layer k", 1, narrowest, min(default, narrowest), 1, key="att_value_k")
    default = saved if saved is not None else 5.0
    return st.slider("Percent p", 0.1, 50.0, float(default), 0.1, key=f"att_value_{rule}", format="%.1f%%")


selection()


# --------------------------------------------------------------------------- one example, token by token
st.subheader("One forget example, token by token")
st.caption(
    "Which words of the question make the model produce each word of the memorised answer "
    "(Captum LLMGradientAttribution with LayerIntegratedGradients on the input embeddings)."
)
questions = forget.questions()
left, right = st.columns([4, 1], vertical_alignment="bottom")
pick = left.selectbox("Forget example", range(len(questions)), format_func=lambda i: questions[i], key="att_example")
item = forget.items[pick]
token_key = ("tokens", loaded.spec, loaded.source, str(loaded.device), item["question"], item["answer"])


def explain(ctx, loaded, question: str, answer: str, key: tuple, store: dict) -> tuple:
    """Job: the token-level attribution of one example (worker thread)."""
    enc = qa.encode(loaded.tokenizer, loaded.fmt, question, answer, max_length=10_000)
    expected = 3 * max(1, len(enc.ids) - enc.n_prompt)  # Captum: about 3 forward passes per answer token
    calls = [0]

    def count(*_) -> None:  # progress = forward passes so far (the hook only counts)
        calls[0] += 1
        ctx.report(min(0.99, calls[0] / expected), f"integrated gradients on the embeddings: pass {calls[0]}")

    hook = loaded.model.register_forward_hook(count)
    try:
        store[key] = att.token_attribution(loaded, question, answer)
    finally:
        hook.remove()
    return key


explain_job = partial(
    explain, loaded=loaded, question=item["question"], answer=item["answer"], key=token_key, store=store
)
launch_button(
    "Explain this example", "tokens", "Token attribution", explain_job, where=right, disabled=token_key in store
)
st.markdown(f"**Answer:** {item['answer']}")
if token_key in store:
    chart(figures.token_figure(store[token_key]), key="att_tokens")
else:
    follow_job("tokens", "attribute the example's tokens")
