"""The shared sidebar: data source, category, backbone, model, device.

It stores its choice as ``st.session_state.selection`` (``app.state.Selection``) for the pages.
The model picker lists every model of the chosen data and category and backbone, shipped and
trained; its default is the best by image AUROC, and a choice is remembered in the app's
settings. Another page can move the sidebar (Train's "Inspect the model") by calling
``show_model`` before switching page.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import streamlit as st

from app import state
from rd.backbones import DEFAULT_BACKBONE, list_backbones
from rd.data import DataError, list_categories
from rd.data.sources import SourceError, allowed_roots, check_user_folder
from rd.devices import device_choices
from rd.manifest import ManifestError, ModelEntry, models_for

PENDING = "sidebar::pending"
# Page widgets whose options depend on the category: dropped when it changes (their per-category
# keys, state.category_key, make this a safety net).
PER_CATEGORY_KEYS = ("inspect_defects", "inspect_page", "inspect_item")


def show_model(entry: ModelEntry) -> None:
    """Make the sidebar select ``entry``'s data, category, backbone and model on the next run."""
    st.session_state[PENDING] = {"source": entry.dataset, "category": entry.category,
                                 "backbone": entry.backbone, "model": entry.id}


def _forget_category_state() -> None:
    for key in PER_CATEGORY_KEYS:
        st.session_state.pop(key, None)


def _remember_model(key: str, slot: str) -> None:
    """Picker callback: the choice is kept in the settings (per data and category)."""
    settings = state.load_settings()
    chosen = settings.get("models")
    chosen = chosen if isinstance(chosen, dict) else {}
    chosen[slot] = st.session_state[key]
    settings["models"] = chosen
    with contextlib.suppress(OSError):
        state.save_settings(settings)


def _remembered_model(slot: str) -> str | None:
    chosen = state.load_settings().get("models")
    return chosen.get(slot) if isinstance(chosen, dict) else None


def _add_folder_form(taken: list[str]) -> None:
    """Add an MVTec-layout folder as a data source: only under the allowed roots, under a name
    no other source has; the absolute path is remembered."""
    settings = state.load_settings()
    roots = allowed_roots(settings.get("allowed_roots"))
    with st.sidebar.expander("Add an MVTec-layout folder"):
        with st.form("add_root", border=False):
            folder = st.text_input("Folder (contains <category>/train/good)",
                                   help="An absolute path under "
                                        + ", ".join(str(r) for r in roots))
            submitted = st.form_submit_button("Add")
        if not (submitted and folder):
            return
        try:
            name, path = check_user_folder(folder, taken, roots)
            categories = list_categories(path)
        except (SourceError, DataError) as error:
            st.error(str(error))
            return
        settings.setdefault("mvtec_roots", {})[name] = str(path)
        try:
            state.save_settings(settings)
        except OSError as error:
            st.error(f"Cannot save the settings: {error}")
            return
        st.success(f"Added {name}: {', '.join(categories)}")
        st.rerun()


@st.cache_resource(show_spinner=False)
def check_jobs_at_start() -> None:
    """Once per app start: a scheduler step (rd.jobs), so that jobs whose process died with the
    app's last run or the machine show as interrupted, and queued jobs start. In a background
    thread once the page has been quiet for a moment: importing rd.jobs takes seconds (torch),
    and done in the first page's run it held the interpreter while the browser fetched that
    page's thumbnails from this server. The Train page's own polls are scheduler steps too."""
    def check() -> None:
        state.wait_for_quiet(state.PRELOAD_QUIET_S)
        from rd import jobs

        with contextlib.suppress(ValueError, OSError):  # the Train page shows these
            jobs.schedule()

    threading.Thread(target=check, name="rd-jobs-at-start", daemon=True).start()


def _apply_pending(names: list[str]) -> dict[str, Any]:
    """A page asked for a model (``show_model``): set the widgets' values before they draw."""
    pending = st.session_state.pop(PENDING, None)
    if not pending or pending["source"] not in names:
        return {}
    if st.session_state.get("source") != pending["source"] or \
            st.session_state.get("category") != pending["category"]:
        _forget_category_state()
    st.session_state["source"] = pending["source"]
    st.session_state["category"] = pending["category"]
    return pending


def draw() -> None:
    """Draw the shared sidebar and store the selection in the session."""
    st.sidebar.title("RD Studio")
    st.session_state.selection = None
    try:
        sources = state.data_sources()
    except (DataError, OSError) as error:
        st.sidebar.error(f"Cannot prepare the data: {error}")
        return
    names = [s.name for s in sources]
    pending = _apply_pending(names)
    if st.session_state.get("source") not in names:
        st.session_state["source"] = names[0]
    source = sources[names.index(st.sidebar.selectbox(
        "Data", names, key="source", on_change=_forget_category_state,
        help="; ".join(f"{s.name}: {s.description}" for s in sources)))]
    _add_folder_form(names)
    try:
        categories = state.categories(source, complete=False)
    except DataError as error:
        st.sidebar.error(str(error))
        return
    if st.session_state.get("category") not in categories:
        st.session_state["category"] = categories[0]
    category = st.sidebar.selectbox("Category", categories, key="category",
                                    on_change=_forget_category_state)
    try:
        state.ensure_category(source, category)
    except (DataError, OSError) as error:
        st.sidebar.error(f"Cannot prepare {category}: {error}")
        return
    try:
        models = models_for(source.name, category)
    except ManifestError as error:
        st.sidebar.error(str(error))
        models = []
    slot = f"{source.name}/{category}"
    remembered = next((m for m in models if m.id == _remembered_model(slot)), None)
    best = remembered or (models[0] if models else None)
    backbones = list_backbones()
    trained = {m.backbone for m in models}
    backbone_key = f"backbone::{slot}"
    if pending.get("backbone") in backbones:
        st.session_state[backbone_key] = pending["backbone"]
    if st.session_state.get(backbone_key) not in backbones:
        st.session_state[backbone_key] = best.backbone if best else DEFAULT_BACKBONE
    backbone = st.sidebar.selectbox(
        "Backbone", backbones, key=backbone_key,
        format_func=lambda b: b if b in trained else f"{b} (no model yet)")
    st.session_state["backbone"] = backbone  # what the Train form starts from
    entry = _pick_model([m for m in models if m.backbone == backbone], slot, backbone,
                        pending.get("model"))
    devices = device_choices()
    device = st.sidebar.selectbox("Device", devices, key="device", index=len(devices) - 1)
    st.session_state.selection = state.Selection(source, category, backbone, device, entry,
                                                 tuple(models))
    if entry is None:
        st.sidebar.warning(state.no_model_message(st.session_state.selection))
        st.sidebar.page_link(state.TRAIN_PAGE, label="Train one", icon=":material/add:")


def _pick_model(entries: list[ModelEntry], slot: str, backbone: str, wanted: str | None
                ) -> ModelEntry | None:
    """The model picker of one backbone: the remembered or requested choice, else the best."""
    if not entries:
        return None
    ids = [e.id for e in entries]
    key = f"model::{slot}/{backbone}"
    if wanted in ids:
        st.session_state[key] = wanted
    if st.session_state.get(key) not in ids:
        remembered = _remembered_model(slot)
        st.session_state[key] = remembered if remembered in ids else ids[0]
    by_id = {e.id: e for e in entries}
    picked = st.sidebar.selectbox("Model", ids, key=key, format_func=lambda i: by_id[i].label,
                                  on_change=_remember_model, args=(key, slot),
                                  help="Every model trained on this data and category; shipped "
                                       "ones are read-only. Default: the best image AUROC.")
    return by_id[picked]
