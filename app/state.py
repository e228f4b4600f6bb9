"""What every page shares: the sidebar selection, cached models and cached results.

Models live in ``st.cache_resource`` keyed on checkpoint path and modification time (a retrained
file is reloaded); inference runs under one lock (one GPU, many sessions); results live in
``st.cache_data``. Failures become messages in the page, never tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import torch
from PIL import Image

from rd.backbones import DEFAULT_BACKBONE, list_backbones
from rd.checkpoints import CheckpointError
from rd.data import DataError, MVTecCategory, Sample, list_categories, read_image_bytes
from rd.data.sources import DataSource, available_sources
from rd.detector import Detection, Detector
from rd.detector import load as load_detector
from rd.evaluation import evaluate
from rd.manifest import ManifestError, ModelEntry, find_model
from rd.paths import data_home

MAX_UPLOAD_MB = 20
SETTINGS_FILE = "app_settings.json"


@dataclass(frozen=True)
class Selection:
    """The sidebar's choice: which data, which category, which model, where to run it."""

    source: DataSource
    category: str
    backbone: str
    device: str
    entry: ModelEntry | None

    @property
    def checkpoint(self) -> Path | None:
        return self.entry.path if self.entry else None


# ----------------------------------------------------------------------------- settings


def _settings_path() -> Path:
    return data_home() / SETTINGS_FILE


def load_settings() -> dict[str, Any]:
    try:
        return json.loads(_settings_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save_settings(settings: dict[str, Any]) -> None:
    from rd.checkpoints import atomic_write

    atomic_write(_settings_path(), lambda tmp: tmp.write_text(json.dumps(settings, indent=1)))


# ------------------------------------------------------------------------------ sidebar


@st.cache_resource(show_spinner="Preparing the built-in dataset…")
def _sources(extra: tuple[tuple[str, str], ...]) -> list[DataSource]:
    return available_sources({name: Path(root) for name, root in extra})


def data_sources() -> list[DataSource]:
    """Every data source the sidebar offers (the Train page's form lists them too)."""
    return _sources(_remembered_roots())


def _devices() -> list[str]:
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def _remembered_roots() -> tuple[tuple[str, str], ...]:
    roots = load_settings().get("mvtec_roots", {})
    return tuple(sorted((name, root) for name, root in roots.items() if Path(root).is_dir()))


def _add_root_form() -> None:
    with st.sidebar.expander("Add an MVTec-layout folder"):
        with st.form("add_root", border=False):
            root = st.text_input("Folder (contains <category>/train/good)")
            submitted = st.form_submit_button("Add")
        if submitted and root:
            path = Path(root).expanduser()
            try:
                categories = list_categories(path)
            except DataError as error:
                st.error(str(error))
                return
            settings = load_settings()
            settings.setdefault("mvtec_roots", {})[path.name] = str(path)
            save_settings(settings)
            st.success(f"Added {path.name}: {', '.join(categories)}")
            st.rerun()


@st.cache_resource(show_spinner=False)
def _check_jobs_at_start() -> None:
    """Once per app start: a scheduler step (rd.jobs), so that jobs whose process died with the
    app's last run or the machine show as interrupted, and queued jobs start."""
    from rd import jobs

    with contextlib.suppress(ValueError, OSError):  # the Train page shows these
        jobs.schedule()


def sidebar() -> None:
    """Draw the shared sidebar and store the selection in the session."""
    _check_jobs_at_start()
    st.sidebar.title("RD Studio")
    try:
        sources = _sources(_remembered_roots())
    except (DataError, OSError) as error:
        st.sidebar.error(f"Cannot prepare the data: {error}")
        st.session_state.selection = None
        return
    names = [s.name for s in sources]
    source = sources[names.index(st.sidebar.selectbox(
        "Data", names, key="source", help="; ".join(f"{s.name}: {s.description}"
                                                  for s in sources)))]
    _add_root_form()
    try:
        categories = list_categories(source.root)
    except DataError as error:
        st.sidebar.error(str(error))
        st.session_state.selection = None
        return
    category = st.sidebar.selectbox("Category", categories, key="category")
    backbones = list_backbones()
    trained = {b for b in backbones if _entry(source.name, category, b)}
    default = DEFAULT_BACKBONE if DEFAULT_BACKBONE in trained else (
        sorted(trained)[0] if trained else DEFAULT_BACKBONE)
    if st.session_state.get("backbone") not in backbones:
        st.session_state.backbone = default
    backbone = st.sidebar.selectbox(
        "Backbone", backbones, key="backbone",
        format_func=lambda b: b if b in trained else f"{b} (no model yet)")
    device = st.sidebar.selectbox("Device", _devices(), key="device",
                                  index=len(_devices()) - 1)
    entry = _entry(source.name, category, backbone)
    st.session_state.selection = Selection(source, category, backbone, device, entry)
    if entry is None:
        st.sidebar.warning(f"No {backbone} model for {source.name}/{category} yet.")
        st.sidebar.page_link("screens/train.py", label="Train one", icon=":material/add:")


def _entry(source: str, category: str, backbone: str) -> ModelEntry | None:
    try:
        return find_model(source, category, backbone)
    except ManifestError as error:
        st.sidebar.error(str(error))
        return None


def selection() -> Selection | None:
    return st.session_state.get("selection")


def require_model() -> tuple[Selection, Detector]:
    """The selection and its loaded detector, or stop the page with a message saying why."""
    chosen = selection()
    if chosen is None:
        st.info("Choose a dataset and a category in the sidebar.")
        st.stop()
    if chosen.entry is None:
        st.info(f"There is no **{chosen.backbone}** model for **{chosen.source.name} / "
                f"{chosen.category}** yet: pick another backbone, or train one.")
        st.page_link("screens/train.py", label="Train a model", icon=":material/add:")
        st.stop()
    try:
        path = chosen.entry.verify()
        detector = load_model(str(path), path.stat().st_mtime, chosen.device)
    except (ManifestError, CheckpointError, OSError, ValueError) as error:
        st.error(f"The model cannot be used: {error}")
        st.stop()
    return chosen, detector


# ---------------------------------------------------------------------- models, results


@st.cache_resource(show_spinner="Loading the model…", max_entries=8)
def load_model(path: str, mtime: float, device: str) -> Detector:
    del mtime  # part of the cache key only: a rewritten checkpoint is reloaded
    return load_detector(path, device)


@st.cache_resource
def inference_lock() -> threading.Lock:
    return threading.Lock()


def predict(detector: Detector, images: list[Any]) -> Detection:
    with inference_lock():
        return detector.predict(images)


@st.cache_data(show_spinner=False, max_entries=2048)
def predict_file(checkpoint: str, mtime: float, device: str, image: str, image_mtime: float
                 ) -> dict[str, np.ndarray]:
    """Maps of one image file (cached on checkpoint and image versions)."""
    del image_mtime
    detection = predict(load_model(checkpoint, mtime, device), [image])
    return {"layer_maps": detection.layer_maps[0], "fused": detection.fused[0],
            "score": float(detection.scores[0])}


def maps_for(chosen: Selection, detector: Detector, path: Path) -> dict[str, np.ndarray]:
    checkpoint = chosen.checkpoint
    return predict_file(str(checkpoint), checkpoint.stat().st_mtime, chosen.device, str(path),
                        path.stat().st_mtime)


@st.cache_data(show_spinner=False, max_entries=64)
def _report(checkpoint: str, mtime: float, device: str, root: str, category: str
            ) -> dict[str, Any]:
    detector = load_model(checkpoint, mtime, device)
    samples = MVTecCategory(root, category, allow_missing_masks=True).test_samples()
    bar = st.progress(0.0, text="Evaluating the test set…")

    def show(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Evaluating the test set… {done}/{total} images")

    with inference_lock():
        report = evaluate(detector, samples, on_progress=show)
    bar.empty()
    return report


def report_for(chosen: Selection) -> dict[str, Any] | None:
    """The evaluation report of the selected model on its category's test set (cached)."""
    checkpoint = chosen.checkpoint
    try:
        return _report(str(checkpoint), checkpoint.stat().st_mtime, chosen.device,
                       str(chosen.source.root), chosen.category)
    except (DataError, ValueError, OSError) as error:
        st.error(f"Cannot evaluate {chosen.category}: {error}")
        return None


def test_samples(chosen: Selection) -> list[Sample]:
    try:
        return MVTecCategory(chosen.source.root, chosen.category,
                             allow_missing_masks=True).test_samples()
    except DataError as error:
        st.error(str(error))
        return []


def default_threshold(detector: Detector, report: dict[str, Any] | None) -> float:
    """The F1-optimal threshold of the test report, else the one stored in the checkpoint."""
    if report:
        return float(report["thresholds"]["f1"]["threshold"])
    stored = detector.metadata.get("metrics", {}).get("thresholds", {}).get("f1")
    if stored is not None:
        return float(stored)
    stats = detector.metadata.get("normal_scores")
    return float(stats["max"]) if stats else 1.0


def threshold_key(chosen: Selection) -> str:
    return f"threshold::{chosen.checkpoint}"


def current_threshold(chosen: Selection, detector: Detector,
                      report: dict[str, Any] | None) -> float:
    """The threshold shared by every page for this model (set on Evaluate, used everywhere)."""
    key = threshold_key(chosen)
    if key not in st.session_state:
        st.session_state[key] = default_threshold(detector, report)
    return float(st.session_state[key])


def read_upload(upload) -> Image.Image:
    """An uploaded file as an RGB image; DataError (shown in the page) when it cannot be."""
    if upload.size > MAX_UPLOAD_MB * 1024 * 1024:
        raise DataError(f"{upload.name}: {upload.size / 1e6:.1f} MB is over the "
                        f"{MAX_UPLOAD_MB} MB limit")
    return read_image_bytes(upload.getvalue(), upload.name)
