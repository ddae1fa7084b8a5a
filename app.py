"""SIMU Studio: Streamlit entry point (a thin layer over `simu_core`)."""

from __future__ import annotations

import streamlit as st

from simu_core.config import builtin_root
from simu_core.models import BUILTIN_MODELS, builtin_status, ensure_builtin, read_manifest

st.set_page_config(page_title="SIMU Studio", page_icon="🧠", layout="wide")
st.title("SIMU Studio")
st.caption("Selective Influence Machine Unlearning: find the neurons that hold a forget set, then unlearn only them.")

root = builtin_root()
status = builtin_status(root)
if status != "ok":
    st.info(f"The built-in default model and benchmark are {status} in `{root}`. Building takes a few minutes, once.")
    bar = st.progress(0.0, text="Building the built-in default...")
    ensure_builtin(root, progress=lambda message, fraction: bar.progress(min(1.0, fraction), text=message))
    bar.empty()

manifest = read_manifest(root) or {}
st.success(f"Built-in default ready in `{root}`.")
cols = st.columns(len(BUILTIN_MODELS))
for col, name in zip(cols, BUILTIN_MODELS, strict=True):
    scores = {k.split("/")[1]: v for k, v in manifest.get("exact_match", {}).items() if k.startswith(f"{name}/")}
    col.metric(f"builtin:{name}", f"{scores.get('full', scores.get(name, 0.0)):.0%} exact match")
config = manifest.get("config", {})
st.write(
    f"{config.get('n_authors', '?')} fictitious authors, seed {config.get('seed', '?')}, "
    f"built in {manifest.get('seconds', '?')} s with torch {manifest.get('versions', {}).get('torch', '?')}."
)
