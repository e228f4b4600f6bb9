"""Inspect: browse or upload images; see the three per-layer maps and the fused heat map.

Only what changed reruns: the grid and the detail are one fragment (opening an image reruns
neither the sidebar nor the page head), and the detail is a fragment inside it (next/previous
and the colour controls redraw the detail alone). Thumbnails are cached JPEG bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from app import state
from app.views.detail import (
    DetailPictures,
    detail_pictures,
    display_size,
    download_name,
    fit_mask,
    npy_bytes,
    png_bytes,
    score_note,
    show_maps,
    show_verdict,
    to_size,
)
from app.views.images import COLOUR_MODES, ScaleContext
from rd.data import DataError, Sample, read_image, read_image_bytes, read_mask

GRID_COLUMNS = 3
GRID_HEIGHT = 900  # px: the grid scrolls inside its own box, so it stays where it was
PAGE_SIZE = 24
THUMBNAIL_SIZE = 160
UPLOADS = "inspect_uploaded"  # the uploads of this session, kept across mode switches
UPLOAD_PICKED = "inspect_upload_picked"
ORDER = "inspect_order"  # the paths as the grid lists them: what next/previous walk through
UPLOAD_TYPES = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"]


@st.cache_data(show_spinner=False, max_entries=4096)
def thumbnail(path: str, mtime: float, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small JPEG of an image file (cached on its path and modification time)."""
    del mtime
    image = read_image(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _open(path: str) -> None:
    """Button callback: runs before the fragment, so the detail shows in the same rerun."""
    st.session_state.inspect_item = path


def _step(offset: int) -> None:
    """Next/previous callback: move through the grid's order, wrapping at the ends."""
    order = st.session_state.get(ORDER) or []
    current = st.session_state.get("inspect_item")
    if not order:
        return
    index = order.index(current) if current in order else -1
    st.session_state.inspect_item = order[(index + offset) % len(order)]


def _filtered(chosen: state.Selection, samples: list[Sample], scores: dict[str, float]
              ) -> list[Sample]:
    defects = sorted({s.defect for s in samples})
    left, right = st.columns([3, 1])
    shown = left.multiselect("Defect types", defects, default=defects,
                             key=state.category_key(chosen, "inspect_defects"))
    order = right.selectbox("Sort by", ["name", "score ↓", "score ↑"], key="inspect_sort")
    picked = [s for s in samples if s.defect in shown]
    if order != "name" and scores:
        picked.sort(key=lambda s: scores.get(str(s.path), 0.0), reverse=order == "score ↓")
    return picked


def _grid(chosen: state.Selection, samples: list[Sample], scores: dict[str, float],
          threshold: float | None) -> None:
    """The thumbnails of one page of ``samples``, each with its Open button."""
    pages = max(1, -(-len(samples) // PAGE_SIZE))
    key = state.category_key(chosen, "inspect_page")
    if st.session_state.get(key, 1) > pages:  # the filter left fewer pages
        st.session_state[key] = pages
    page = st.number_input("Page", 1, pages, 1, key=key) if pages > 1 else 1
    visible = samples[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
    with st.container(height=GRID_HEIGHT, border=False):
        for row in range(0, len(visible), GRID_COLUMNS):
            columns = st.columns(GRID_COLUMNS)
            for column, sample in zip(columns, visible[row: row + GRID_COLUMNS], strict=False):
                score = scores.get(str(sample.path))
                caption = f"{sample.defect}/{sample.path.name}"
                if score is not None:
                    caption += f" · {score:.3f}"
                    if threshold is not None:
                        defective = state.verdict(score, threshold) == "defective"
                        caption += " ⚠" if defective else " ✓"
                try:
                    column.image(thumbnail(str(sample.path), sample.path.stat().st_mtime),
                                 caption=caption, width="stretch")
                except (DataError, OSError) as error:
                    column.warning(str(error))
                    continue
                column.button("Open image", key=f"open::{sample.path}", width="stretch",
                              on_click=_open, args=(str(sample.path),))


# ---------------------------------------------------------------------------- the detail


def _context(detector, report: dict | None, scores: dict[str, float], score: float,
             threshold: float) -> ScaleContext:
    normal = detector.metadata.get("normal_scores") or (report or {}).get("normal_scores") or {}
    return ScaleContext(max([score, *scores.values()]), normal.get("p99"), threshold)


def _colour_controls() -> dict[str, Any]:
    mode = st.radio("Colour scale", list(COLOUR_MODES), horizontal=True, key="colour_mode")
    st.caption(COLOUR_MODES[mode])
    controls = st.columns(3)
    return {
        "mode": mode,
        "opacity": controls[0].slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="opacity"),
        "contours": controls[1].toggle("Contours", value=True, key="contours",
                                       help="green: ground truth; magenta: map ≥ threshold"),
        "model_size": controls[2].toggle("Model resolution", value=False,
                                         key="inspect_model_size",
                                         help="Show and download the maps at the model's "
                                              "square input size instead of the image's own."),
    }


def _downloads(names: dict[str, str], pictures: DetailPictures, maps: Any,
               size: tuple[int, int]) -> None:
    """Overlay and heat map as PNG, fused and layer maps as .npy (at ``size``), each built
    only when its button is pressed."""
    columns = st.columns(4)
    columns[0].download_button("Overlay (PNG)", lambda: png_bytes(pictures.overlay),
                               names["overlay"], "image/png", key="dl_overlay",
                               on_click="ignore")
    columns[1].download_button("Heat map (PNG)", lambda: png_bytes(pictures.heat),
                               names["heat"], "image/png", key="dl_png", on_click="ignore")
    columns[2].download_button("Fused map (.npy)", lambda: npy_bytes(to_size(maps.fused, size)),
                               names["npy"], key="dl_npy", on_click="ignore")
    columns[3].download_button(
        f"Layer maps (.npy, 3×{size[1]}×{size[0]})",
        lambda: npy_bytes(np.stack([to_size(layer, size) for layer in maps.layer_maps])),
        names["layers"], key="dl_layers", on_click="ignore")


def _show(chosen: state.Selection, detector, found: state.Evaluation | None, *, title: str,
          image, detection: state.ImageDetection, mask: np.ndarray | None, defect: str
          ) -> None:
    """The detail block of one image: verdict, colour controls, pictures, downloads."""
    report = found.report if found else None
    threshold = state.current_threshold(chosen, detector, report)
    st.subheader(title)
    top = st.columns([1, 1, 2])
    show_verdict(top[:2], detection.score, threshold, detection.verdict(threshold))
    top[2].caption(f"Threshold {threshold:.4f} (set it on the Evaluate page); flagged "
                   "defective when score ≥ threshold. " + score_note(detector.metadata))
    options = _colour_controls()
    model = detector.image_size
    size = (model, model) if options["model_size"] else None
    context = _context(detector, report, found.scores if found else {}, detection.score,
                       threshold)
    pictures = detail_pictures(image, detection.layer_maps, detection.fused, mask, context,
                               options["mode"], options["opacity"], options["contours"], size)
    shown = (pictures.base.shape[1], pictures.base.shape[0])
    st.caption(f"{image.width}×{image.height} image, shown at {shown[0]}×{shown[1]}; the model "
               f"sees it at {model}×{model}.")
    show_maps(pictures)
    out_size = (model, model) if options["model_size"] else image.size
    name = Path(title).name
    names = {kind: download_name(chosen.category, defect, name, kind, extension)
             for kind, extension in (("overlay", "png"), ("heat", "png"), ("layers", "npy"))}
    names["npy"] = download_name(chosen.category, defect, name, "heat", "npy")
    _downloads(names, pictures, detection, out_size)


def _show_without_model(title: str, image, mask: np.ndarray | None) -> None:
    """Browsing data that has no model: the image and its ground truth."""
    st.subheader(title)
    size = display_size(*image.size)
    columns = st.columns(2)
    columns[0].image(np.asarray(image.resize(size)), caption=f"input ({image.width}×"
                     f"{image.height})", output_format="PNG", width="stretch")
    if mask is not None:
        columns[1].image(fit_mask(mask, size).astype(np.uint8) * 255, caption="ground truth",
                         output_format="PNG", width="stretch")
    else:
        columns[1].info("No ground-truth mask for this image.")


def _sample_of(chosen: state.Selection, path: str) -> Sample | None:
    return next((s for s in state.test_samples(chosen) if str(s.path) == path), None)


@state.interactive_fragment
def _test_image_detail(chosen: state.Selection, found: state.Evaluation | None) -> None:
    """The open test image with next/previous; reruns alone when its own controls change."""
    path = st.session_state.get("inspect_item")
    if path is None:
        st.info("Open an image from the grid.")
        return
    navigation = st.columns([1, 1, 2])
    navigation[0].button("Previous", key="inspect_previous", icon=":material/arrow_back:",
                         on_click=_step, args=(-1,), shortcut="ArrowLeft", width="stretch",
                         help="Previous image of the grid (← key)")
    navigation[1].button("Next", key="inspect_next", icon=":material/arrow_forward:",
                         on_click=_step, args=(1,), shortcut="ArrowRight", width="stretch",
                         help="Next image of the grid (→ key)")
    sample = _sample_of(chosen, path)
    title = "/".join(Path(path).parts[-2:])
    try:
        image = read_image(path)
        mask = (read_mask(sample.mask_path) if sample is not None and sample.mask_path
                else None)
        if chosen.entry is None:
            _show_without_model(title, image, mask)
            return
        _, detector = state.require_model()  # cached: loaded once, after the grid is drawn
        detection = state.detect(chosen, detector, Path(path))
    except (DataError, OSError) as error:
        st.error(f"Cannot show this image: {error}")
        return
    order = st.session_state.get(ORDER) or []
    if path in order:  # while this one is drawn: Next and Previous then find their maps
        index = order.index(path)
        state.prefetch(chosen, detector, [order[(index + 1) % len(order)],
                                          order[(index - 1) % len(order)]])
    _show(chosen, detector, found, title=title, image=image, detection=detection, mask=mask,
          defect=sample.defect if sample else "test")


@state.interactive_fragment
def _browser(chosen: state.Selection, found: state.Evaluation | None,
             samples: list[Sample]) -> None:
    """The grid beside the open image's detail."""
    grid, detail = st.columns([2, 3], gap="medium")
    with detail:
        _test_image_detail(chosen, found)
    with grid:
        _grid(chosen, samples, found.scores if found else {},
              st.session_state.get(state.threshold_key(chosen)))


@st.fragment(run_every=state.POLL_S)
def _scoring(chosen: state.Selection, detector) -> None:
    """While the test set is being scored (in the background, once per model): its progress;
    the page reruns once with every score when it is done."""
    found = state.evaluation(chosen, detector)
    if found.complete or found.error:
        st.rerun()
    st.progress(found.done / max(1, found.total),
                text=f"Scoring the test images… {found.done}/{found.total} (kept: once per "
                     "model); the images can be opened meanwhile")


# ----------------------------------------------------------------------------- uploads


def _uploader_key() -> str:
    """The uploader's key: a new one empties the widget when the uploads are forgotten."""
    return f"inspect_uploads::{st.session_state.get('inspect_uploader_round', 0)}"


def _remember_uploads() -> None:
    """Uploader callback: keep new uploads in the session and select the newest one."""
    stored = st.session_state.setdefault(UPLOADS, {})
    for upload in st.session_state.get(_uploader_key()) or []:
        data = upload.getvalue()
        key = f"{upload.name}::{len(data)}::{hash(data)}"
        if key not in stored:
            stored[key] = {"name": upload.name, "data": data, "size": upload.size}
            st.session_state[UPLOAD_PICKED] = key


def _forget_uploads() -> None:
    st.session_state[UPLOADS] = {}
    st.session_state[UPLOAD_PICKED] = None
    st.session_state.inspect_uploader_round = st.session_state.get("inspect_uploader_round",
                                                                   0) + 1


def _pick_upload() -> None:
    st.session_state[UPLOAD_PICKED] = st.session_state["inspect_upload_radio"]


def _upload_detail(chosen: state.Selection, detector, found: state.Evaluation | None,
                   upload: dict) -> None:
    name, data = upload["name"], upload["data"]
    try:
        if upload["size"] > state.MAX_UPLOAD_MB * 1024 * 1024:
            raise DataError(f"{name}: {upload['size'] / 1e6:.1f} MB is over the "
                            f"{state.MAX_UPLOAD_MB} MB limit")
        image = read_image_bytes(data, name)
        if detector is None:
            _show_without_model(name, image, None)
            return
        detection = state.detect(chosen, detector, data, name=name)
    except DataError as error:
        st.error(f"Cannot read this upload: {error}")
        return
    _show(chosen, detector, found, title=name, image=image, detection=detection, mask=None,
          defect="upload")


@state.interactive_fragment
def _uploads(chosen: state.Selection, detector, found: state.Evaluation | None) -> None:
    st.file_uploader("Images (PNG, JPEG, BMP, TIFF, WebP)", accept_multiple_files=True,
                     type=UPLOAD_TYPES, max_upload_size=state.MAX_UPLOAD_MB,
                     key=_uploader_key(), on_change=_remember_uploads)
    _remember_uploads()  # files handed over without the callback (AppTest)
    stored = st.session_state.get(UPLOADS) or {}
    if not stored:
        return
    keys = list(stored)
    picked = st.session_state.get(UPLOAD_PICKED)
    if picked not in stored:
        picked = st.session_state[UPLOAD_PICKED] = keys[-1]
    st.session_state["inspect_upload_radio"] = picked
    row = st.columns([5, 1], vertical_alignment="bottom")
    row[0].radio("Uploaded this session", keys, horizontal=True, key="inspect_upload_radio",
                 format_func=lambda key: stored[key]["name"], on_change=_pick_upload)
    row[1].button("Forget uploads", key="inspect_forget", on_click=_forget_uploads,
                  icon=":material/delete:")
    _upload_detail(chosen, detector, found, stored[picked])


def _load_model(header, chosen: state.Selection, found: state.Evaluation | None
                ) -> tuple[state.Selection, Any]:
    """The model (stops the page with a message when it cannot be used), captioned in
    ``header`` with its threshold."""
    with header:
        chosen, detector = state.require_model()
        threshold = state.current_threshold(chosen, detector, found.report if found else None)
        st.caption(_model_caption(chosen, threshold, detector.image_size))
    return chosen, detector


def _model_caption(chosen: state.Selection, threshold: float | None, size: int | None = None
                   ) -> str:
    """Which model the page uses: data, category, backbone (input size, threshold if known)."""
    known = ([f"{size} px"] if size else []) + (
        [f"threshold {threshold:.4f}"] if threshold is not None else [])
    return " · ".join([f"{chosen.source.name} / {chosen.category}", chosen.backbone, *known])


def _csv(rows: list[dict[str, Any]]) -> bytes:
    """The report's per-image rows as CSV, made when the button is pressed (pandas takes 0.3 s
    to import: not on the first page's way)."""
    import pandas as pd

    return pd.DataFrame(rows).to_csv(index=False).encode()


def main() -> None:
    st.title("Inspect")
    chosen = state.require_data()
    detector = found = None
    header = st.container()
    if chosen.entry is None:
        with header:
            st.info(state.no_model_message(chosen) + " Meanwhile, the images and their masks "
                    "can be browsed.")
            state.train_call_to_action(chosen, key="inspect::train")
    else:
        # The stored scores (a shipped model's committed report, an earlier run) need no model:
        # the grid is drawn first and the model (torch, seconds on a fresh server) loaded after.
        found = state.evaluation(chosen, None)
        if not found.complete:  # the test set has to be scored: the model is needed now
            chosen, detector = _load_model(header, chosen, found)
            found = state.evaluation(chosen, detector)
            with header:
                if found.error:
                    st.warning(f"Cannot score the test images: {found.error}")
                elif not found.complete:
                    _scoring(chosen, detector)
    source = st.segmented_control("Images", ["Test images", "Upload"], default="Test images",
                                  key="inspect_source")
    if source == "Upload":
        if chosen.entry is not None and detector is None:
            chosen, detector = _load_model(header, chosen, found)
        _uploads(chosen, detector, found)
        return
    samples = state.test_samples(chosen)
    if not samples:
        return
    item = st.session_state.get("inspect_item")
    if item is not None and item not in {str(s.path) for s in samples}:
        st.session_state.inspect_item = None  # chosen under another category or data
    shown = _filtered(chosen, samples, found.scores if found else {})
    st.session_state[ORDER] = [str(s.path) for s in shown]
    if detector is None and found is not None and found.report is not None:
        state.current_threshold(chosen, None, found.report)  # the grid's badges need no model
    _browser(chosen, found, shown)
    if chosen.entry is not None and detector is None:
        state.preload_model(chosen)  # after the thumbnails, so that opening one does not wait
        report = found.report if found else None
        header.caption(_model_caption(
            chosen, state.current_threshold(chosen, None, report) if report else None))
    if found and found.report:
        images = found.report["images"]
        st.download_button("Scores of the test images (CSV)", lambda: _csv(images),
                           f"{chosen.category}_{chosen.backbone}_scores.csv", "text/csv",
                           key="dl_csv", on_click="ignore")

main()
