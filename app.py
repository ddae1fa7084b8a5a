"""SIMU Studio: Streamlit entry point. Navigation over pages/ and the shared sidebar.

Run with `streamlit run app.py` (binds to localhost, see .streamlit/config.toml).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from pages.common import init_state, sidebar_summary

st.set_page_config(page_title="SIMU Studio", page_icon="🧠", layout="wide")
init_state()

PAGES_DIR = Path(__file__).parent / "pages"
# Material icons ship with Streamlit's own font, so they render everywhere (emoji need a system emoji font).
STEPS = [
    ("model_data.py", "Model & data", ":material/dataset:"),
    ("attribution.py", "Attribution", ":material/biotech:"),
    ("unlearn.py", "Unlearn", ":material/cleaning_services:"),
    ("evaluate.py", "Evaluate", ":material/fact_check:"),
    ("connectivity.py", "Mode connectivity", ":material/timeline:"),
    ("runs.py", "Runs", ":material/history:"),
]
pages = [
    st.Page(PAGES_DIR / file, title=title, icon=icon, default=i == 0)
    for i, (file, title, icon) in enumerate(STEPS)
    if (PAGES_DIR / file).exists()
]
nav = st.navigation(pages)
with st.sidebar:
    st.title("SIMU Studio")
    st.caption("Selective unlearning: find the neurons that hold a forget set, then update only them.")
sidebar_summary()
nav.run()
