"""Train: until background training jobs land, how to train a model from the command line."""

from __future__ import annotations

import shlex

import streamlit as st

from app import state

st.title("Train")
st.info("Training jobs launched from this page (background processes with progress, loss "
        "curves, cancel and resume) are the next feature to land. Until then, train from a "
        "terminal: the app picks the model up once it is registered.")
chosen = state.selection()
if chosen is not None:
    out = f"{chosen.source.name}-{chosen.category}-{chosen.backbone}.safetensors"
    command = ["python", "-m", "rd", "train", "--data", str(chosen.source.root),
               "--category", chosen.category, "--backbone", chosen.backbone, "--out", out]
    st.markdown(f"**Train {chosen.backbone} on {chosen.source.name} / {chosen.category}** "
                "with the paper's recipe (200 epochs; `--epochs 60` is a quicker start):")
    st.code(shlex.join(command), language="bash")
