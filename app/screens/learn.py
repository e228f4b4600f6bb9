"""Learn: reverse distillation shown on the selected model, step by step, and a defect you paint
yourself to watch the maps and the score respond."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import streamlit as st

from app import state
from app.views.images import (
    ScaleContext,
    colour_bar,
    colour_range,
    heat_map,
    to_rgb_array,
)
from app.views.learn import (
    enlarge,
    feature_walk,
    hex_colour,
    mask_box,
    outline,
    paint_stroke,
    paste_patch,
    pca_rgb,
)
from rd.backbones import count_parameters
from rd.data import DataError, MVTecCategory, Sample, read_image, read_mask
from rd.detector import Detector

LAYER_NAMES = ("layer 1 · stride 4", "layer 2 · stride 8", "layer 3 · stride 16")
CONTOUR_EDIT = (0, 255, 255)
SCALE_MODE = "calibrated"  # the same colour means the same disagreement on every image
EXPLANATION = """
**The teacher** is a CNN trained on ImageNet and then frozen: it never sees this category.
Its three feature maps describe the image at three scales (fine texture to object parts).

**The student** is trained on *normal* images only. It does not see the image: it receives
the teacher's features squeezed through a narrow **one-class bottleneck** and has to rebuild
all three maps from that small code, in reverse (deepest layer first).

On normal images the student has learned to do this well. Anything it never saw (a crack, a
stain, a missing part) does not fit through the bottleneck, so the rebuilt features **disagree**
with the teacher's there. The disagreement, 1 − cosine between the two feature vectors at each
position, is the anomaly map; the three layers are summed and smoothed, and the image score is
the map's maximum.
"""
PCA_NOTE = ("Feature colours: each position's feature vector, scaled to unit length (the cosine "
            "ignores length), along the three strongest directions of the teacher's channels "
            "(PCA) as red, green and blue. The student's map is coloured with the *teacher's* "
            "projection, so equal colours mean equal features: where the student rebuilt the "
            "teacher well, the two images look alike.")


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(v) for v in shape)


def _label(chosen: state.Selection, sample: Sample) -> str:
    return str(sample.path.relative_to(chosen.source.root / chosen.category))


def _samples(chosen: state.Selection) -> tuple[list[Sample], list[Sample]]:
    """Normal images (test/good first, then train/good) and defective test images."""
    tests = state.test_samples(chosen)
    try:
        train = MVTecCategory(chosen.source.root, chosen.category).train_samples()
    except DataError as error:
        st.warning(f"Training images unavailable: {error}")
        train = []
    return [s for s in tests if s.label == 0] + train, [s for s in tests if s.label == 1]


@st.cache_data(show_spinner="Walking the image through teacher, bottleneck and student…",
               max_entries=64)
def walk(checkpoint: str, mtime: float, device: str, image: str, image_mtime: float
         ) -> dict[str, Any]:
    """PCA images, shapes and 1 − cos maps of one image (cached on model and image versions)."""
    del image_mtime
    detector = state.load_model(checkpoint, mtime, device)
    batch = detector.to_batch(image)
    with state.inference_lock():
        steps = feature_walk(detector.model, batch)
    layers = []
    for teacher, student, layer in zip(steps["teacher"], steps["student"],
                                       steps["layer_maps"][0], strict=True):
        teacher_rgb, basis = pca_rgb(teacher[0])
        student_rgb, _ = pca_rgb(student[0], basis)
        layers.append({"teacher": teacher_rgb, "student": student_rgb,
                       "shape": teacher.shape[1:], "map": layer})
    embedding_rgb, _ = pca_rgb(steps["embedding"][0])
    return {"layers": layers, "embedding": embedding_rgb,
            "embedding_shape": steps["embedding"].shape[1:]}


@st.cache_data(show_spinner=False, max_entries=256)
def predict_pixels(checkpoint: str, mtime: float, device: str, digest: str, _pixels: np.ndarray
                   ) -> dict[str, Any]:
    """Maps and score of an (edited) image array, cached on its digest (the array is not
    hashed by Streamlit: the digest is its key)."""
    del digest
    detection = state.predict(state.load_model(checkpoint, mtime, device), [_pixels])
    return {"layer_maps": detection.layer_maps[0], "fused": detection.fused[0],
            "score": float(detection.scores[0])}


def _maps(chosen: state.Selection, pixels: np.ndarray) -> dict[str, Any]:
    checkpoint = chosen.checkpoint
    return predict_pixels(str(checkpoint), checkpoint.stat().st_mtime, chosen.device,
                          hashlib.sha256(pixels.tobytes()).hexdigest(), pixels)


def _context(chosen: state.Selection, detector: Detector) -> tuple[ScaleContext, float]:
    """The colour scale and threshold, read without storing one (the Evaluate page sets it)."""
    threshold = st.session_state.get(state.threshold_key(chosen))
    if threshold is None:
        threshold = state.default_threshold(detector, None)
    p99 = (detector.metadata.get("normal_scores") or {}).get("p99")
    # category_max is only read by the 'absolute' scale; this page uses the calibrated one.
    return ScaleContext(2 * float(threshold), p99, float(threshold)), float(threshold)


def _layer_context(context: ScaleContext) -> ScaleContext:
    """Each layer is about a third of the fused sum: scale its colours accordingly."""
    return ScaleContext(context.category_max / 3,
                        None if context.normal_p99 is None else context.normal_p99 / 3,
                        context.threshold / 3)


def _diagram(detector: Detector, embedding_shape: tuple[int, ...], layers: list[dict]) -> str:
    """The model as a Graphviz flow, with the parameter counts of each part."""
    model = detector.model
    size = detector.image_size
    teacher = (f"teacher · {detector.backbone}\\nfrozen, ImageNet\\n"
               f"{_millions(count_parameters(model.teacher))} params")
    bottleneck = f"OCBE bottleneck\\ntrained\\n{_millions(count_parameters(model.bottleneck))}"
    decoder = f"student decoder\\ntrained\\n{_millions(count_parameters(model.decoder))}"
    lines = [
        "digraph { rankdir=LR; bgcolor=transparent; nodesep=0.15; ranksep=0.3;",
        'node [shape=box, style="rounded,filled", fontname="sans-serif", fontsize=10, '
        'fillcolor="#eef2f7"]; edge [color="#777777"];',
        f'image [label="image\\n3×{size}×{size}"];',
        f'teacher [label="{teacher}", fillcolor="#dbe7f5"];',
        f'ocbe [label="{bottleneck}", fillcolor="#f7e3c8"];',
        f'code [label="one-class embedding\\n{_shape(embedding_shape)}", fillcolor="#f5d0a9"];',
        f'decoder [label="{decoder}", fillcolor="#f7e3c8"];',
        'score [label="sum + blur\\n→ anomaly map, score", fillcolor="#f5c6c6"];',
        "image -> teacher; ocbe -> code -> decoder;",
    ]
    for index, layer in enumerate(layers, 1):
        shape = _shape(layer["shape"])
        lines += [f't{index} [label="T{index}\\n{shape}"]; s{index} [label="S{index}\\n{shape}"];',
                  f'c{index} [label="1 − cos(T{index}, S{index})", fillcolor="#fbe0e0"];',
                  f"teacher -> t{index} -> ocbe; decoder -> s{index} -> c{index} -> score;"]
    return "\n".join([*lines, "}"])


def _explain(chosen: state.Selection, detector: Detector, sample: Sample,
             context: ScaleContext) -> None:
    try:
        steps = walk(str(chosen.checkpoint), chosen.checkpoint.stat().st_mtime, chosen.device,
                     str(sample.path), sample.path.stat().st_mtime)
    except (DataError, OSError) as error:
        st.error(f"Cannot read {sample.path.name}: {error}")
        return
    size = detector.image_size
    st.graphviz_chart(_diagram(detector, steps["embedding_shape"], steps["layers"]),
                      width="stretch")
    left, right = st.columns([2, 3], gap="large")
    with left:
        st.markdown(EXPLANATION)
        image_column, code_column = st.columns(2)
        image_column.image(to_rgb_array(read_image(sample.path), size), output_format="PNG",
                           caption=f"input ({_label(chosen, sample)})", width="stretch")
        code_column.image(enlarge(steps["embedding"], size), output_format="PNG",
                          width="stretch",
                          caption=f"one-class embedding {_shape(steps['embedding_shape'])} "
                                  "(PCA): all the student gets to see")
        st.caption(PCA_NOTE)
    with right:
        layer_context = _layer_context(context)
        header = st.columns([1, 2, 2, 2])
        for column, title in zip(header[1:], ("teacher (frozen)", "student (rebuilt)",
                                              "disagreement 1 − cos"), strict=True):
            column.markdown(f"**{title}**")
        for name, layer in zip(LAYER_NAMES, steps["layers"], strict=True):
            row = st.columns([1, 2, 2, 2], vertical_alignment="center")
            row[0].markdown(f"{name}  \n{_shape(layer['shape'])}")
            row[1].image(enlarge(layer["teacher"], size), output_format="PNG", width="stretch")
            row[2].image(enlarge(layer["student"], size), output_format="PNG", width="stretch")
            values = layer["map"]
            row[3].image(heat_map(values, SCALE_MODE, layer_context), output_format="PNG",
                         width="stretch",
                         caption=f"mean {values.mean():.3f} · max {values.max():.3f}")
        vmin, vmax = colour_range(SCALE_MODE, steps["layers"][0]["map"], layer_context)
        st.image(colour_bar(vmin, vmax, width=384), output_format="PNG",
                 caption=f"1 − cos scale {vmin:.3f} → {vmax:.3f} (mid-scale: the typical worst "
                         "spot of a normal image, per layer)")


# ------------------------------------------------------------------------ paint a defect


def _stroke_inputs(size: int) -> tuple:
    columns = st.columns(5)
    x0 = columns[0].slider("Start x", 0, size - 1, int(size * 0.35), key="learn_x0")
    y0 = columns[1].slider("Start y", 0, size - 1, int(size * 0.40), key="learn_y0")
    x1 = columns[2].slider("End x", 0, size - 1, int(size * 0.65), key="learn_x1")
    y1 = columns[3].slider("End y", 0, size - 1, int(size * 0.60), key="learn_y1")
    width = columns[4].slider("Width", 1, max(2, size // 8), max(2, size // 64),
                              key="learn_width")
    colour = st.color_picker("Colour", "#f2f2f2", key="learn_colour")
    return ("stroke", (x0, y0), (x1, y1), width, colour)


def _patch_inputs(chosen: state.Selection, source: Sample, size: int) -> tuple:
    mask = read_mask(source.mask_path, (size, size)) if source.mask_path else None
    box = mask_box(mask) if mask is not None else None
    if box is None:
        box = (size * 3 // 8, size * 3 // 8, size * 5 // 8, size * 5 // 8)
    key = f"{chosen.checkpoint}::{source.path}"  # the defaults follow the chosen defect
    columns = st.columns(4)
    x_range = columns[0].slider("Source box x", 0, size, (box[0], box[2]), key=f"bx::{key}")
    y_range = columns[1].slider("Source box y", 0, size, (box[1], box[3]), key=f"by::{key}")
    x = columns[2].slider("Paste at x", 0, size - 1, box[0], key=f"px::{key}")
    y = columns[3].slider("Paste at y", 0, size - 1, box[1], key=f"py::{key}")
    left, top = min(x_range[0], size - 1), min(y_range[0], size - 1)
    box = (left, top, max(x_range[1], left + 1), max(y_range[1], top + 1))
    return ("patch", str(source.path), box, (x, y))


def _apply(base: np.ndarray, edit: tuple, size: int) -> tuple[np.ndarray, np.ndarray]:
    if edit[0] == "stroke":
        _, start, end, width, colour = edit
        return paint_stroke(base, start, end, width, hex_colour(colour))
    _, source, box, position = edit
    return paste_patch(base, to_rgb_array(read_image(source), size), box, position)


def _map_row(title: str, maps: dict[str, Any], context: ScaleContext,
             mask: np.ndarray | None, before: dict[str, Any] | None = None) -> None:
    layer_context = _layer_context(context)
    columns = st.columns([1, 2, 2, 2, 2])
    columns[0].markdown(f"**{title}**")
    images = [heat_map(layer, SCALE_MODE, layer_context) for layer in maps["layer_maps"]]
    images.append(heat_map(maps["fused"], SCALE_MODE, context))
    values = [*maps["layer_maps"], maps["fused"]]
    earlier = [*before["layer_maps"], before["fused"]] if before else [None] * 4
    for column, image, value, old, name in zip(columns[1:], images, values, earlier,
                                               ["layer 1", "layer 2", "layer 3", "fused"],
                                               strict=True):
        caption = name
        if mask is not None and mask.any():
            image = outline(image, mask, CONTOUR_EDIT)
            caption += f" · region max {value[mask].max():.3f}"
            if old is not None:
                caption += f" (was {old[mask].max():.3f})"
        column.image(image, output_format="PNG", width="stretch", caption=caption)


def _paint(chosen: state.Selection, detector: Detector, sample: Sample,
           defects: list[Sample], context: ScaleContext, threshold: float) -> None:
    st.subheader("Paint a defect")
    st.caption("Change the normal image, then compare the maps and the score before and after. "
               "Coordinates are pixels of the image as the model sees it "
               f"({detector.image_size}×{detector.image_size}).")
    size = detector.image_size
    kinds = ["Stroke", "Paste a patch of a real defect"]
    kind = st.radio("Edit", kinds, horizontal=True, key="learn_kind",
                    label_visibility="collapsed")
    source = None
    if kind == kinds[1]:
        if not defects:
            st.info("This category has no defective test images to copy from.")
            return
        source = st.selectbox("Copy from", defects, key="learn_source",
                              format_func=lambda s: _label(chosen, s))
    with st.form("learn_paint", border=True):
        try:
            edit = (_patch_inputs(chosen, source, size) if source is not None
                    else _stroke_inputs(size))
        except DataError as error:
            st.error(f"Cannot read the defect: {error}")
            edit = None
        applied = st.form_submit_button("Apply", type="primary")
    if applied and edit is not None:
        st.session_state.learn_edit = {"image": str(sample.path), "size": size, "edit": edit}
    stored = st.session_state.get("learn_edit")
    try:
        base = to_rgb_array(read_image(sample.path), size)
        before = _maps(chosen, base)
        if stored and stored["image"] == str(sample.path) and stored["size"] == size:
            edited, mask = _apply(base, stored["edit"], size)
            after = _maps(chosen, edited)
        else:
            edited = mask = after = None
    except (DataError, OSError, ValueError) as error:
        st.error(f"Cannot apply this edit: {error}")
        return

    top = st.columns([2, 2, 1])
    top[0].image(base, output_format="PNG", width="stretch", caption="normal image")
    if edited is None:
        top[1].info("Set a stroke or a patch above and press **Apply**.")
    else:
        top[1].image(outline(edited, mask, CONTOUR_EDIT), output_format="PNG",
                     width="stretch", caption=f"edited: {int(mask.sum())} pixels changed "
                                              "(cyan outline)")
    score = before["score"]
    top[2].metric("Score before", f"{score:.4f}")
    if after is not None:
        top[2].metric("Score after", f"{after['score']:.4f}", f"{after['score'] - score:+.4f}",
                      delta_color="inverse")
    verdicts = [("normal image", score)] + ([("edited image", after["score"])] if after else [])
    top[2].caption(f"Threshold {threshold:.4f}: " + "; ".join(
        f"the {name} is judged **{'defective' if value >= threshold else 'normal'}**"
        for name, value in verdicts) + ".")
    _map_row("before", before, context, mask)
    if after is not None:
        if not mask.any():
            st.info("The edit changed no pixels.")
        _map_row("after", after, context, mask, before)


def main() -> None:
    st.title("Learn")
    chosen, detector = state.require_model()
    context, threshold = _context(chosen, detector)
    st.caption(f"{chosen.source.name} / {chosen.category} · {chosen.backbone} · "
               f"{detector.image_size} px · how the detector reaches its maps")
    normals, defects = _samples(chosen)
    if not normals:
        st.info("This category has no normal images (train/good or test/good) to explain with.")
        return
    sample = st.selectbox("Normal image", normals, key="learn_image",
                          format_func=lambda s: _label(chosen, s))
    _explain(chosen, detector, sample, context)
    st.divider()
    _paint(chosen, detector, sample, defects, context, threshold)


main()
