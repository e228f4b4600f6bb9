"""Inspect: browse or upload images; see the three per-layer maps and the fused heat map."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from app import state
from app.views.images import (
    COLOUR_MODES,
    CONTOUR_PREDICTED,
    CONTOUR_TRUTH,
    ScaleContext,
    blend,
    colour_bar,
    colour_range,
    draw_contour,
    heat_map,
    to_rgb_array,
)
from rd.data import DataError, read_image, read_image_bytes, read_mask

GRID_COLUMNS = 6
PAGE_SIZE = 24
LAYER_NAMES = ("layer 1 · stride 4", "layer 2 · stride 8", "layer 3 · stride 16")


@st.cache_data(show_spinner=False, max_entries=4096)
def thumbnail(path: str, mtime: float, size: int = 160) -> np.ndarray:
    del mtime
    image = read_image(path)
    image.thumbnail((size, size))
    return np.asarray(image)


@st.cache_data(show_spinner=False, max_entries=256)
def predict_upload(checkpoint: str, mtime: float, device: str, digest: str, data: bytes,
                   name: str) -> dict:
    del digest  # the bytes are hashed too; the digest keeps the key readable
    detector = state.load_model(checkpoint, mtime, device)
    image = read_image_bytes(data, name)
    detection = state.predict(detector, [image])
    return {"layer_maps": detection.layer_maps[0], "fused": detection.fused[0],
            "score": float(detection.scores[0]), "name": name}


def _open(item: tuple) -> None:
    """Button callback: runs before the page, so the detail shows in the same rerun."""
    st.session_state.inspect_item = item


def _browse(chosen: state.Selection, report: dict | None) -> None:
    samples = state.test_samples(chosen)
    if not samples:
        return
    scores = {item["path"]: item["score"] for item in (report or {}).get("images", [])}
    defects = sorted({s.defect for s in samples})
    left, right = st.columns([3, 1])
    shown = left.multiselect("Defect types", defects, default=defects, key="inspect_defects")
    order = right.selectbox("Sort by", ["name", "score ↓", "score ↑"], key="inspect_sort")
    chosen_samples = [s for s in samples if s.defect in shown]
    if order != "name" and scores:
        chosen_samples.sort(key=lambda s: scores.get(str(s.path), 0.0),
                            reverse=order == "score ↓")
    pages = max(1, -(-len(chosen_samples) // PAGE_SIZE))
    page = st.number_input("Page", 1, pages, 1, key="inspect_page") if pages > 1 else 1
    visible = chosen_samples[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
    threshold = st.session_state.get(state.threshold_key(chosen))
    for row in range(0, len(visible), GRID_COLUMNS):
        columns = st.columns(GRID_COLUMNS)
        for column, sample in zip(columns, visible[row: row + GRID_COLUMNS], strict=False):
            score = scores.get(str(sample.path))
            verdict = ""
            if score is not None and threshold is not None:
                verdict = " ⚠" if score >= threshold else " ✓"
            caption = f"{sample.defect}/{sample.path.name}" + (
                f" · {score:.3f}{verdict}" if score is not None else "")
            try:
                column.image(thumbnail(str(sample.path), sample.path.stat().st_mtime),
                             caption=caption, width="stretch")
            except DataError as error:
                column.warning(str(error))
                continue
            column.button("Open image", key=f"open::{sample.path}", width="stretch",
                          on_click=_open, args=(("path", str(sample.path)),))


def _upload(chosen: state.Selection) -> None:
    uploads = st.file_uploader("Images (PNG, JPEG, BMP, TIFF, WebP)", accept_multiple_files=True,
                               type=["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"],
                               max_upload_size=state.MAX_UPLOAD_MB, key="inspect_uploads")
    rows = []
    for upload in uploads or []:
        try:
            image = state.read_upload(upload)
        except DataError as error:
            st.error(f"Cannot read this upload: {error}")
            continue
        data = upload.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        rows.append((upload.name, digest, data, image.size))
    if not rows:
        if (st.session_state.get("inspect_item") or ("",))[0] == "upload":
            st.session_state.inspect_item = None  # the upload was removed
        return
    names = [name for name, *_ in rows]
    picked = st.radio("Uploaded", names, horizontal=True, key="inspect_upload_pick")
    name, digest, data, _ = rows[names.index(picked)]
    st.session_state.inspect_item = ("upload", name, digest, data)


def _maps_of_item(chosen: state.Selection, detector, item: tuple) -> tuple[dict, Image.Image,
                                                                          np.ndarray | None]:
    checkpoint = chosen.checkpoint
    if item[0] == "path":
        path = Path(item[1])
        image = read_image(path)
        maps = state.maps_for(chosen, detector, path)
        sample = next((s for s in state.test_samples(chosen) if str(s.path) == item[1]), None)
        mask = (read_mask(sample.mask_path, (detector.image_size,) * 2)
                if sample is not None and sample.mask_path is not None else None)
        return maps, image, mask
    _, name, digest, data = item
    maps = predict_upload(str(checkpoint), checkpoint.stat().st_mtime, chosen.device, digest,
                          data, name)
    return maps, read_image_bytes(data, name), None


def _detail(chosen: state.Selection, detector, report: dict | None, item: tuple) -> None:
    try:
        maps, image, mask = _maps_of_item(chosen, detector, item)
    except (DataError, OSError) as error:
        st.error(f"Cannot show this image: {error}")
        return
    threshold = state.current_threshold(chosen, detector, report)
    normal = detector.metadata.get("normal_scores") or (report or {}).get("normal_scores") or {}
    category_max = max(item["score"] for item in report["images"]) if report else maps["score"]
    context = ScaleContext(category_max, normal.get("p99"), threshold)
    name = ("/".join(Path(item[1]).parts[-2:]) if item[0] == "path" else item[1])
    size = detector.image_size

    score = maps["score"]
    verdict = "defective" if score >= threshold else "normal"
    top = st.columns([2, 1, 1, 2])
    top[0].subheader(name)
    top[1].metric("Score", f"{score:.4f}", f"{score - threshold:+.4f} vs threshold",
                  delta_color="inverse")
    top[2].metric("Verdict", verdict)
    top[3].caption(f"Threshold {threshold:.4f} (set it on the Evaluate page). "
                   "Score = maximum of the smoothed fused map.")

    controls = st.columns([2, 1, 1])
    mode = controls[0].radio("Colour scale", list(COLOUR_MODES), horizontal=True,
                             key="colour_mode")
    controls[0].caption(COLOUR_MODES[mode])
    opacity = controls[1].slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="opacity")
    show_contours = controls[2].toggle("Contours", value=True, key="contours",
                                       help="green: ground truth; magenta: map ≥ threshold")

    base = to_rgb_array(image, size)
    fused = maps["fused"]
    heat = heat_map(fused, mode, context)
    overlay = blend(base, heat, opacity)
    if show_contours:
        if mask is not None:
            overlay = draw_contour(overlay, mask, CONTOUR_TRUTH, 2)
        overlay = draw_contour(overlay, fused >= threshold, CONTOUR_PREDICTED, 2)

    first = st.columns(3)
    first[0].image(base, caption=f"input ({image.width}×{image.height}, shown at {size})",
                   output_format="PNG", width="stretch")
    if mask is not None:
        first[1].image((mask * 255).astype(np.uint8), caption="ground truth",
                       output_format="PNG", width="stretch")
    else:
        first[1].info("No ground-truth mask for this image.")
    first[2].image(overlay, caption="overlay", output_format="PNG", width="stretch")

    st.markdown("**Teacher–student disagreement, layer by layer** (1 − cosine, before "
                "smoothing) **and fused** (sum of the three, Gaussian σ = 4)")
    layer_context = ScaleContext(context.category_max / 3,
                                 None if context.normal_p99 is None else context.normal_p99 / 3,
                                 context.threshold / 3)
    second = st.columns(4)
    for column, layer, title in zip(second[:3], maps["layer_maps"], LAYER_NAMES, strict=True):
        column.image(heat_map(layer, mode, layer_context), caption=title, output_format="PNG",
                     width="stretch")
    second[3].image(heat, caption="fused heat map", output_format="PNG", width="stretch")
    vmin, vmax = colour_range(mode, fused, context)
    st.image(colour_bar(vmin, vmax, width=512), output_format="PNG",
             caption=f"fused scale {vmin:.3f} → {vmax:.3f} (layer maps: a third of it)")

    downloads = st.columns(3)
    buffer = io.BytesIO()
    Image.fromarray(heat).save(buffer, format="PNG")
    downloads[0].download_button("Heat map (PNG)", buffer.getvalue(), f"{Path(name).stem}_heat.png",
                                 "image/png", key="dl_png")
    raw = io.BytesIO()
    np.save(raw, fused.astype(np.float32))
    downloads[1].download_button("Fused map (.npy)", raw.getvalue(), f"{Path(name).stem}.npy",
                                 key="dl_npy")
    layers = io.BytesIO()
    np.save(layers, maps["layer_maps"].astype(np.float32))
    downloads[2].download_button("Layer maps (.npy, 3×S×S)", layers.getvalue(),
                                 f"{Path(name).stem}_layers.npy", key="dl_layers")


def main() -> None:
    st.title("Inspect")
    chosen, detector = state.require_model()
    report = state.report_for(chosen)
    threshold = state.current_threshold(chosen, detector, report)
    st.caption(f"{chosen.source.name} / {chosen.category} · {chosen.backbone} · "
               f"{detector.image_size} px · threshold {threshold:.4f}")
    item = st.session_state.get("inspect_item")
    category_folder = chosen.source.root / chosen.category
    if item is not None and item[0] == "path" and not item[1].startswith(str(category_folder)):
        item = st.session_state.inspect_item = None  # chosen under another category
    source = st.segmented_control("Images", ["Test images", "Upload"], default="Test images",
                                  key="inspect_source")
    if source == "Upload":
        _upload(chosen)
        item = st.session_state.get("inspect_item")
    if item is not None and (item[0] == "upload") == (source == "Upload"):
        _detail(chosen, detector, report, item)
        st.divider()
    if source != "Upload":
        with st.expander("Test images", expanded=item is None):
            _browse(chosen, report)
        if report:
            table = pd.DataFrame(report["images"])
            st.download_button("Scores of the test images (CSV)",
                               table.to_csv(index=False).encode(),
                               f"{chosen.category}_{chosen.backbone}_scores.csv", "text/csv",
                               key="dl_csv")


main()
