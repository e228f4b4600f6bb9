"""RD Studio entry point: ``streamlit run app/main.py``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts only app/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import access, sidebar, state  # noqa: E402

# An emoji icon is drawn by the browser itself; a ":material/…:" page icon is fetched from a
# font CDN (a request leaving the machine, failing offline).
st.set_page_config(page_title="RD Studio", page_icon="🔬", layout="wide")
access.guard()  # this machine only, unless a password is set (app/access.py)
state.note_activity()  # background work waits for a quiet moment (app/state.py)

# Not "pages/": that folder name turns on Streamlit's folder-based navigation, which runs a page
# without this file when a browser opens its URL directly.
SCREENS = Path(__file__).parent / "screens"
navigation = st.navigation([
    st.Page(SCREENS / "inspect.py", title="Inspect", icon=":material/image_search:",
            default=True),
    st.Page(SCREENS / "evaluate.py", title="Evaluate", icon=":material/monitoring:"),
    st.Page(SCREENS / "review.py", title="Review", icon=":material/fact_check:"),
    st.Page(SCREENS / "learn.py", title="Learn", icon=":material/school:"),
    st.Page(SCREENS / "train.py", title="Train", icon=":material/model_training:"),
])
sidebar.draw()
try:
    navigation.run()
finally:  # also when the page stops early (st.stop) or reruns
    sidebar.check_jobs_at_start()
    state.complete_builtin_in_background(str(state.data_home()))
    state.note_run_ended()
