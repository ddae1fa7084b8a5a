"""Step 1: choose the model and the forget/retain sets; preview and validate them."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages.common import current_data, current_model, data_label, parse_upload, require_entrypoint, show_error
from simu_core import data as qa
from simu_core.arch import count_parameters, model_type_of, neuron_widths
from simu_core.models import BUILTIN_MODELS

require_entrypoint()
st.header("1 · Model & data")
st.caption(
    "Pick the model to unlearn from and the data it should forget (and keep). "
    "The built-in default works offline: tiny Llama models trained on fictitious authors."
)

# --------------------------------------------------------------------------- model
st.subheader("Model")
source = st.radio(
    "Model source", ["Built-in", "Local folder", "Hugging Face hub id"], horizontal=True, key="model_source"
)
if source == "Built-in":
    name = st.selectbox(
        "Built-in model",
        BUILTIN_MODELS,
        help="`full` saw every author; `retainXX` never saw the authors of `forgetXX` (the gold standard).",
    )
    spec = f"builtin:{name}"
elif source == "Local folder":
    spec = st.text_input("Folder written by save_pretrained (safetensors weights)", placeholder="/path/to/model")
else:
    spec = st.text_input("Hub id", placeholder="EleutherAI/pythia-70m", help="Needs network or the local HF cache.")
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
if spec and spec != st.session_state["model_spec"] and st.button("Use this model", type="primary"):
    st.session_state["model_spec"] = spec.strip()
    st.rerun()

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
def data_picker(role: str, default_split: str) -> None:
    """Widgets choosing one data set for `role` (forget or retain)."""
    kind = st.radio(
        f"{role.capitalize()} set source",
        ["Built-in split", "Upload JSONL/CSV", "datasets name"],
        horizontal=True,
        key=f"{role}_kind",
    )
    if kind == "Built-in split":
        splits = [s for s in qa.BUILTIN_SPLITS if s.startswith(role)] + (["world_facts"] if role == "retain" else [])
        split = st.selectbox(f"Built-in {role} split", splits, index=splits.index(default_split), key=f"{role}_split")
        choose(role, f"builtin:{split}")
    elif kind == "Upload JSONL/CSV":
        file = st.file_uploader(
            f"{role.capitalize()} file",
            type=["jsonl", "json", "csv"],
            key=f"{role}_file",
            help="One row per question with `question` and `answer` columns; optional `paraphrased_answer`, "
            "`perturbed_answers` (a JSON list or values separated by |) for the truth-ratio metrics.",
        )
        if file is not None:
            try:
                st.session_state[f"{role}_upload"] = parse_upload(file.name, file.getvalue())
            except Exception as err:
                st.session_state.pop(f"{role}_upload", None)
                show_error(err, f"read the uploaded {role} file")
    else:
        cols = st.columns(3)
        name = cols[0].text_input("Dataset name", placeholder="locuslab/TOFU", key=f"{role}_hf_name")
        config = cols[1].text_input("Config", placeholder="forget10", key=f"{role}_hf_config")
        split = cols[2].text_input("Split", value="train", key=f"{role}_hf_split")
        if name and st.button(f"Load {role} dataset", key=f"{role}_hf_load"):
            choose(role, f"hf:{name}:{config}:{split}")


def choose(role: str, spec: str) -> None:
    if st.session_state[f"{role}_spec"] != spec or st.session_state.get(f"{role}_upload") is not None:
        st.session_state[f"{role}_spec"] = spec
        st.session_state.pop(f"{role}_upload", None)


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
