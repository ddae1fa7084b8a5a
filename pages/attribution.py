"""Step 2: score every MLP neuron on the forget and retain sets, pick the critical ones, look at one example."""

from __future__ import annotations

import json
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
from simu_core import localise as loc
from simu_core import targets as tg
from simu_core.arch import count_parameters
from simu_core.errors import SimuError
from simu_core.jobs import item_weighted
from simu_core.masks import AGGREGATES, DUAL_POLICIES, RULES, SCORE_KINDS, make_mask, trainable_count
from simu_core.methods import preset_config
from simu_core.neurons import param_counts

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
TARGET_HELP = {
    "answer": "SIMU: the log-likelihood of every answer token (name and template tokens included).",
    "fact": "Only the fact's value tokens (built-in templates mark them; uploads may add a fact_span column).",
    "contrastive": "log p(true answer) − mean log p(perturbed answers): what true and wrong answers share cancels.",
}
BASELINE_HELP = {
    "zero": "SIMU: integrate from zero activations.",
    "counterfactual": "Integrate from the activations of a matched item (same question, another author).",
}
POSITIONS_HELP = {
    "all": "SIMU: scale the layer at every position (prompt included).",
    "answer": "Scale only the positions that predict answer tokens.",
    "subject": "Scale only the subject's (author's) tokens in the prompt, where fact lookup happens.",
}
AGGREGATE_HELP = {
    "sum": "SIMU: rank by the summed score (the Score setting applies).",
    "consistency": "Share of forget items with the neuron in their top-k minus that share on retain items.",
    "ratio": "Forget score / (retain score + eps), both clipped at 0 and scaled per layer.",
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
own_path = method in att.OWN_PATH  # other baselines/targets and per-item scores need simu_core's own path
t1, t2, t3 = st.columns(3)
target = t1.selectbox("Target", tg.TARGETS if own_path else ("answer", "fact"), key=f"att_target_{own_path}",
                      help="\n\n".join(f"**{k}**: {v}" for k, v in TARGET_HELP.items()))  # fmt: skip
baseline = t2.selectbox("Baseline", tg.BASELINES if own_path else ("zero",), key=f"att_baseline_{own_path}",
                        help="\n\n".join(f"**{k}**: {v}" for k, v in BASELINE_HELP.items()))  # fmt: skip
positions = t3.selectbox("Positions", att.POSITIONS, key="att_positions",
                         help="\n\n".join(f"**{k}**: {v}" for k, v in POSITIONS_HELP.items()))  # fmt: skip
how = {"target": target, "baseline": baseline, "positions": positions, "per_item": own_path}
here = (
    loaded.spec,
    loaded.source,
    str(loaded.device),
    method,
    steps,
    target,
    baseline,
    positions,
)  # source: another home
keys = {"forget": ("scores", *here, dataset_key(forget)), "retain": ("scores", *here, dataset_key(retain_part))}
key = (keys["forget"], keys["retain"])  # the scores a selection is made from
store = result_store()


def compute_scores(ctx, loaded, todo: dict, method: str, steps: int, store: dict, how: dict | None = None) -> None:
    """Job: the scores of each data set in `todo` ({role: (dataset, key)}), each stored under its key as soon
    as it is ready, so the page can draw the forget scores while the retain scores are computed (worker thread)."""
    sizes = [len(dataset) for dataset, _ in todo.values()]  # progress by items: the retain part is the larger
    for i, (role, (dataset, key)) in enumerate(todo.items()):

        def progress(message: str, fraction: float, i: int = i, role: str = role, n: int = len(dataset)) -> None:
            if ctx.cancelled:
                raise SimuError("cancelled")
            ctx.report(item_weighted(sizes, i, fraction), f"{role} set ({n} items): {message}")

        try:
            store[key] = att.attribute(loaded, dataset, method=method, steps=steps, progress=progress, **(how or {}))
        except SimuError:
            if ctx.cancelled:
                return
            raise


def start_scores() -> None:
    """Queue the missing scores (a running job for other settings is no longer wanted: cancel it)."""
    if job_busy("attribution") and st.session_state.get("att_job_for") != key:
        session_job("attribution").cancel()
    job = partial(compute_scores, loaded=loaded, todo=todo, method=method, steps=steps, store=store, how=how)
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
    a1, a2 = st.columns([1, 3])
    aggregates = AGGREGATES if forget_scores.items is not None else ("sum", "ratio")
    aggregate = a1.selectbox("Aggregation", aggregates, key="att_aggregate",
                             help="\n\n".join(f"**{k}**: {v}" for k, v in AGGREGATE_HELP.items()))  # fmt: skip
    top_k = 1.0
    if aggregate == "consistency":
        top_k = a2.slider("Top-k per item (% of all neurons)", 0.1, 10.0, 1.0, 0.1, key="att_top_k")
    agg = {"aggregate": aggregate, "top_k": top_k}
    try:
        mask = make_mask(forget_scores, rule, value, retain=retain_scores, dual="include", score=score, **agg)
        retain_critical = make_mask(retain_scores, rule, value)
    except SimuError as err:
        st.error(f"**Cannot select neurons with these settings.** {err}")
        return
    duals = [m & r for m, r in zip(mask.layers, retain_critical.layers, strict=True)]
    if dual == "exclude":
        mask = make_mask(forget_scores, rule, value, retain=retain_scores, dual="exclude", score=score, **agg)
    st.session_state["mask_choice"] = {
        "key": key, "model": loaded.spec, "device": str(loaded.device), "forget": dataset_key(forget),
        "rule": rule, "value": value, "score": score, "dual": dual, **agg,
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


# --------------------------------------------------------------------------- localisation check
def run_check(ctx, loaded, mask, forget, retain, key: tuple, store: dict) -> tuple:
    """Job: the localisation check of one selection (worker thread)."""

    def progress(message: str, fraction: float) -> None:
        if ctx.cancelled:
            raise SimuError("cancelled")
        ctx.report(fraction, message)

    store[key] = loc.localise(loaded, mask, forget, retain, n_random=20, progress=progress)
    return key


def localisation_section() -> None:
    """Zero the selected neurons and compare the loss rises with 20 random masks of the same per-layer sizes."""
    st.subheader("Localisation check")
    st.caption(
        "Before unlearning: zero the selected neurons and measure how much the forget and the retain loss rise "
        "(nats per token; on all answer tokens and on the fact's value tokens), against 20 seeded random masks with "
        "the same number of neurons per layer (z = (mask − random mean) / random sd). A mask that holds the forget "
        "set's facts raises the forget loss far more than random ones, and the retain loss not much more."
    )
    choice = st.session_state.get("mask_choice")
    if not choice or choice.get("key") != key:
        st.info("Select neurons above first.")
        return
    params = {k: choice[k] for k in ("score", "dual", "aggregate", "top_k")}
    mask = make_mask(forget_scores, choice["rule"], choice["value"], retain=retain_scores, **params)
    held_out = retain.items[PRESET.mask.retain_limit : PRESET.mask.retain_limit + 400] or retain_part.items
    check_retain = qa.QADataset(f"{retain.name} (not scored)", held_out)
    check_key = ("localise", *key, json.dumps({k: choice[k] for k in ("rule", "value", *params)}, default=str))
    job = partial(run_check, loaded=loaded, mask=mask, forget=forget, retain=check_retain, key=check_key, store=store)
    launch_button("Run the localisation check", "localise", "Localisation check", job,
                  disabled=check_key in store or mask.total() == 0)  # fmt: skip
    if check_key not in store:
        follow_job("localise", "run the localisation check")
        return
    result = store[check_key]
    st.dataframe(localisation_table(result), hide_index=True, width="stretch")
    st.caption(
        f"{result.neurons} neurons zeroed; forget: {result.n_forget} items, retain: {result.n_retain} items the "
        "retain scores did not use. " + " ".join(result.notes)
    )


def localisation_table(result: loc.Localisation) -> list[dict]:
    """One row per token set: rises, selectivity and their z-scores."""

    def z(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.1f}"

    rows = []
    for name in loc.TOKEN_SETS:
        r, zs = result.rises[name], result.z[name]
        rows.append({
            "tokens": name, "forget rise": round(r["forget_rise"], 4), "z forget": z(zs["forget_rise"]),
            "retain rise": round(r["retain_rise"], 4), "z retain": z(zs["retain_rise"]),
            "selectivity (forget / retain)": round(r["selectivity"], 2), "z selectivity": z(zs["selectivity"]),
        })  # fmt: skip
    return rows


localisation_section()


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
