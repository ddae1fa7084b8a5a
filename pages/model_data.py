"""Step 1: choose the model and the forget/retain sets; preview and validate them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from pages.common import (
    current_data,
    current_model,
    data_label,
    keep_widget,
    knowledge_check,
    remember,
    require_entrypoint,
    show_error,
)
from simu_core import data as qa
from simu_core.arch import count_parameters, model_type_of, neuron_widths
from simu_core.knowledge_check import DEFAULT_SAMPLE
from simu_core.models import BUILTIN_MODELS

require_entrypoint()
st.header("1 · Model & data")
st.caption(
    "Pick the model to unlearn from and the data it should forget (and keep). "
    "The built-in default works offline: tiny Llama models trained on fictitious authors."
)

# --------------------------------------------------------------------------- model
SOURCES = ["Built-in", "Local folder", "Hugging Face hub id"]
SPEC_INPUT = {"Local folder": "model_folder", "Hugging Face hub id": "model_hub"}


def source_of(spec: str) -> str:
    """Which model source radio option a spec belongs to."""
    if spec.startswith("builtin:"):
        return "Built-in"
    return "Local folder" if Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) else SOURCES[2]


def use_model(spec: str) -> None:
    """Callback of "Use this model": runs before the script, so the sidebar shows the new model at once."""
    st.session_state["model_spec"] = spec.strip()


st.subheader("Model")
in_use = st.session_state["model_spec"]
keep_widget("model_source", source_of(in_use))
source = st.radio(
    "Model source", SOURCES, horizontal=True, key="model_source", on_change=remember, args=("model_source",)
)
if source == "Built-in":
    name = in_use.removeprefix("builtin:")
    keep_widget("model_builtin", name if name in BUILTIN_MODELS else BUILTIN_MODELS[0])
    name = st.selectbox(
        "Built-in model",
        BUILTIN_MODELS,
        key="model_builtin",
        on_change=remember,
        args=("model_builtin",),
        help="`full` saw every author; `retainXX` never saw the authors of `forgetXX` (the gold standard).",
    )
    spec = f"builtin:{name}"
else:
    keep_widget(SPEC_INPUT[source], in_use if source_of(in_use) == source else "")
    if source == "Local folder":
        label, placeholder, help = "Folder written by save_pretrained (safetensors weights)", "/path/to/model", None
    else:
        label, placeholder = "Hub id", "EleutherAI/pythia-70m"
        help = "Needs network or the local Hugging Face cache (offline, a model not in the cache fails at once)."
    spec = st.text_input(
        label,
        placeholder=placeholder,
        help=help,
        key=SPEC_INPUT[source],
        on_change=remember,
        args=(SPEC_INPUT[source],),
    )
    if source == SOURCES[2]:
        st.session_state["trust_remote_code"] = st.checkbox(
            "Trust remote code",
            value=st.session_state["trust_remote_code"],
            key="trust_remote_code_widget",
            help="Runs Python code shipped with the model. Leave off unless you trust its authors.",
        )
# Widget keys differ from the state keys: Streamlit forgets a widget's key on pages that do not draw it.
DEVICES = ["auto", "cpu", "cuda", "mps"]
st.session_state["device"] = st.selectbox(
    "Device", DEVICES, index=DEVICES.index(st.session_state["device"]), key="device_widget",
    help="auto = CUDA GPU, else Apple MPS, else CPU.",
)  # fmt: skip
if spec and spec.strip() != in_use:
    st.button("Use this model", type="primary", on_click=use_model, args=(spec,))

loaded = current_model()
if loaded is not None:
    widths = neuron_widths(loaded.model)
    cols = st.columns(4)
    cols[0].metric("Family", model_type_of(loaded.model))
    cols[1].metric("Parameters", f"{count_parameters(loaded.model) / 1e6:.2f} M")
    cols[2].metric("MLP neurons", f"{len(widths)} × {widths[0]}")
    cols[3].metric("Device", str(loaded.device))
    st.caption(f"Loaded `{loaded.spec}` from `{loaded.source}`. Prompt template: `{loaded.fmt.template!r}`")


# --------------------------------------------------------------------------- data
KINDS = ["Built-in split", "Upload JSONL/CSV", "datasets name"]


def kind_of(spec: str) -> str:
    """Which data source radio option a spec belongs to."""
    return KINDS[0] if spec.startswith("builtin:") else KINDS[2] if spec.startswith("hf:") else KINDS[1]


def splits_for(role: str) -> list[str]:
    return [s for s in qa.BUILTIN_SPLITS if s.startswith(role)] + (["world_facts"] if role == "retain" else [])


def kind_changed(role: str, default_split: str) -> None:
    """Back to a built-in split: that split is used at once; back to uploads: the last accepted upload."""
    remember(f"{role}_kind")
    kind = st.session_state[f"{role}_kind"]
    if kind == KINDS[0]:
        st.session_state[f"{role}_spec"] = f"builtin:{st.session_state['kept'].get(f'{role}_split', default_split)}"
    elif kind == KINDS[1] and st.session_state.get(f"{role}_upload_spec"):
        st.session_state[f"{role}_spec"] = st.session_state[f"{role}_upload_spec"]


def split_changed(role: str) -> None:
    remember(f"{role}_split")
    st.session_state[f"{role}_spec"] = f"builtin:{st.session_state[f'{role}_split']}"


def upload_changed(role: str) -> None:
    """Store an accepted upload (content-hashed JSONL) and use it; a failed one leaves the spec in use as it was."""
    file = st.session_state.get(f"{role}_file")
    st.session_state.pop(f"{role}_upload_error", None)
    if file is None:  # the file was removed from the widget: the stored upload stays in use
        return
    try:
        path = qa.store_upload(file.name, file.getvalue())
    except Exception as err:
        st.session_state[f"{role}_upload_error"] = err
        return
    st.session_state[f"{role}_upload_spec"] = st.session_state[f"{role}_spec"] = str(path)


def load_dataset_clicked(role: str) -> None:
    remember(f"{role}_hf_name", f"{role}_hf_config", f"{role}_hf_split")
    parts = (st.session_state[f"{role}_hf_{k}"].strip() for k in ("name", "config", "split"))
    st.session_state[f"{role}_spec"] = "hf:" + ":".join(parts)


def data_picker(role: str, default_split: str) -> None:
    """Widgets choosing one data set for `role` (forget or retain); every change goes through a callback."""
    spec = st.session_state[f"{role}_spec"]
    keep_widget(f"{role}_kind", kind_of(spec))
    kind = st.radio(
        f"{role.capitalize()} set source", KINDS, horizontal=True, key=f"{role}_kind",
        on_change=kind_changed, args=(role, default_split),
    )  # fmt: skip
    if kind == KINDS[0]:
        splits = splits_for(role)
        split = spec.removeprefix("builtin:")
        keep_widget(f"{role}_split", split if split in splits else default_split)
        st.selectbox(f"Built-in {role} split", splits, key=f"{role}_split", on_change=split_changed, args=(role,))
    elif kind == KINDS[1]:
        st.file_uploader(
            f"{role.capitalize()} file",
            type=list(qa.UPLOAD_TYPES),
            key=f"{role}_file",
            on_change=upload_changed,
            args=(role,),
            help="One row per question with `question` and `answer` columns; optional `paraphrased_answer`, "
            "`perturbed_answers` (a JSON list or values separated by |) for the truth-ratio metrics. "
            "An accepted file is stored once in SIMU Studio's data folder and stays in use until you pick another.",
        )
        error = st.session_state.get(f"{role}_upload_error")
        if error is not None and st.session_state.get(f"{role}_file") is not None:
            show_error(error, f"read the uploaded {role} file")
            st.caption(f"Still using `{data_label(role)}`.")
        elif qa.is_upload(spec):
            st.caption(f"In use: the upload stored as `{spec}` (the CLI reads it by this path too).")
        else:
            st.caption(f"Nothing uploaded yet: still using `{spec}`.")
    else:
        hf = spec[3:].split(":") if spec.startswith("hf:") else []
        cols = st.columns(3)
        for col, (i, field, label, placeholder, default) in zip(cols, (
            (0, "name", "Dataset name", "locuslab/TOFU", ""),
            (1, "config", "Config", "forget10", ""),
            (2, "split", "Split", "", "train"),
        ), strict=True):  # fmt: skip
            keep_widget(f"{role}_hf_{field}", hf[i] if len(hf) > i else default)
            key = f"{role}_hf_{field}"
            col.text_input(label, placeholder=placeholder, key=key, on_change=remember, args=(key,))
        if st.session_state[f"{role}_hf_name"]:
            st.button(f"Load {role} dataset", key=f"{role}_hf_load", on_click=load_dataset_clicked, args=(role,))


st.subheader("Data")
left, right = st.columns(2)
with left:
    data_picker("forget", "forget10")
with right:
    data_picker("retain", "retain10")

forget, retain = current_data("forget"), current_data("retain")
for role, dataset in (("forget", forget), ("retain", retain)):
    if dataset is None:
        continue
    extras = [f for f in ("paraphrased_answer", "perturbed_answers") if dataset.has_field(f)]
    st.markdown(
        f"**{role.capitalize()} set** `{data_label(role)}`: {len(dataset)} items"
        + (f"; has {', '.join(extras)}" if extras else "; no paraphrased/perturbed answers (truth ratio is skipped)")
    )
    preview = pd.DataFrame(dataset.items[:8])[[c for c in ("question", "answer", "author") if c in dataset.items[0]]]
    st.dataframe(preview, hide_index=True, width="stretch")
if forget is not None and retain is not None and (shared := qa.overlap_count(forget, retain)):
    st.warning(
        f"{shared} item(s) of the forget set also appear in the retain set: unlearning will pull them both ways. "
        "Remove them from one of the sets."
    )

# --------------------------------------------------------------------------- what the model knows
st.subheader("Does the model know the forget set?")
st.caption(
    "Unlearning needs something to remove: the model's greedy answers and its loss on the gold answers, on a "
    f"sample of at most {DEFAULT_SAMPLE} items of each set. A model that does not know the forget set has "
    "nothing to unlearn."
)
if loaded is not None and forget is not None and retain is not None:
    check = knowledge_check(loaded, forget, retain)
    if check is not None:
        c = st.columns(4)
        c[0].metric("Forget exact match", f"{check.forget.em:.2f}", help="Greedy answers that match the gold answer.")
        c[1].metric("Forget answer loss", f"{check.forget.nll:.2f} nats", help="Per answer token, teacher-forced.")
        if check.retain is not None:
            c[2].metric("Retain exact match", f"{check.retain.em:.2f}")
            c[3].metric("Retain answer loss", f"{check.retain.nll:.2f} nats")
        (st.success if check.knows else st.warning)(check.reason)
        st.markdown(f"**The model's greedy answers** ({check.forget.n} of {check.forget.n_total} forget items)")
        st.dataframe(
            pd.DataFrame(
                {
                    "question": check.forget.questions,
                    "gold answer": check.forget.answers,
                    "model's answer": check.forget.predictions,
                    "loss (nats/token)": check.forget.item_nll,
                }
            ),
            hide_index=True,
            width="stretch",
            column_config={"loss (nats/token)": st.column_config.NumberColumn(format="%.2f")},
        )
