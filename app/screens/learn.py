"""Learn: reverse distillation shown on the selected model, step by step, and a defect you paint
yourself to watch the maps and the score respond."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from app import state
from app.views.detail import LAYER_NAMES, layer_context
from app.views.images import (
    CONTOUR_TRUTH,
    ScaleContext,
    colour_bar,
    colour_range,
    heat_map,
    to_rgb_array,
)
from app.views.learn import (
    canvas_figure,
    centre_of,
    enlarge,
    feature_walk,
    hex_colour,
    mask_box,
    outline,
    paint_region,
    paste_patch,
    pca_rgb,
    region_of,
)
from rd.data import DataError, MVTecCategory, Sample, read_image, read_mask
from rd.detector import Detector
from rd.teacher import count_parameters

REGION = "learn_region"  # the region drawn on the canvas, with the image it belongs to
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
LAYER_ONE_NOTE = (
    "Why layer 1 is speckled even on a normal image: its features (stride 4) describe fine "
    "texture (weave, grain, sensor noise), which differs from image to image, and the student "
    "rebuilds it from a small code that keeps only what normal images share; the small misses "
    "are scattered everywhere. Layers 2 and 3 describe larger parts, which the student rebuilds "
    "well; the fused map is smoothed (σ = 4) so scattered speckle does not add up to a defect.")
DEFECT_NOTE = (
    "On a defect the teacher describes something the student never learned to rebuild: the "
    "disagreement rises where the defect is (green outline), usually most in the layers whose "
    "scale matches its size, while the texture speckle of layer 1 stays everywhere.")
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


def _context(chosen: state.Selection, detector: Detector) -> tuple[ScaleContext, float]:
    """The colour scale and threshold, read without storing one (the Evaluate page sets it)."""
    threshold = st.session_state.get(state.threshold_key(chosen))
    if threshold is None:
        threshold = state.default_threshold(detector, None)
    p99 = detector.metadata.normal_score("p99")
    # category_max is only read by the 'absolute' scale; this page uses the calibrated one.
    return ScaleContext(2 * float(threshold), p99, float(threshold)), float(threshold)


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
    truth = read_mask(sample.mask_path, (size, size)) if sample.mask_path else None
    st.graphviz_chart(_diagram(detector, steps["embedding_shape"], steps["layers"]),
                      width="stretch")
    left, right = st.columns([2, 3], gap="large")
    with left:
        st.markdown(EXPLANATION)
        image_column, code_column = st.columns(2)
        picture = to_rgb_array(read_image(sample.path), size)
        if truth is not None:
            picture = outline(picture, truth, CONTOUR_TRUTH, 1)
        image_column.image(picture, output_format="PNG", width="stretch",
                           caption=f"input ({_label(chosen, sample)})"
                                   + (", ground truth in green" if truth is not None else ""))
        code_column.image(enlarge(steps["embedding"], size), output_format="PNG",
                          width="stretch",
                          caption=f"one-class embedding {_shape(steps['embedding_shape'])} "
                                  "(PCA): all the student gets to see")
        st.caption(PCA_NOTE)
    with right:
        per_layer = layer_context(context)
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
            picture = heat_map(values, SCALE_MODE, per_layer)
            if truth is not None:
                picture = outline(picture, truth, CONTOUR_TRUTH, 1)
            row[3].image(picture, output_format="PNG",
                         width="stretch",
                         caption=f"mean {values.mean():.3f} · max {values.max():.3f}")
        vmin, vmax = colour_range(SCALE_MODE, steps["layers"][0]["map"], per_layer)
        st.image(colour_bar(vmin, vmax, width=384), output_format="PNG",
                 caption=f"1 − cos scale {vmin:.3f} → {vmax:.3f} (mid-scale: the typical worst "
                         "spot of a normal image, per layer)")
        st.caption(LAYER_ONE_NOTE if sample.label == 0 else DEFECT_NOTE)


# ------------------------------------------------------------------------ paint a defect


def _remember_region(key: str, image: str, size: int) -> None:
    """Canvas callback: keep the drawn selection (with the image it was drawn on)."""
    selection = st.session_state[key].selection
    st.session_state[REGION] = {"image": image, "size": size,
                                "selection": {name: list(selection.get(name) or [])
                                              for name in ("points", "box", "lasso")}}


def _edit(base: np.ndarray, region: np.ndarray, kind: str, colour: str,
          source: Sample | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image after the edit, and the pixels that changed."""
    if source is None:
        return paint_region(base, region, hex_colour(colour))
    donor = to_rgb_array(read_image(source.path), size)
    mask = read_mask(source.mask_path, (size, size)) if source.mask_path else None
    box = (mask_box(mask) if mask is not None else None) or (
        size * 3 // 8, size * 3 // 8, size * 5 // 8, size * 5 // 8)
    x, y = centre_of(region)
    position = (x - (box[2] - box[0]) // 2, y - (box[3] - box[1]) // 2)
    return paste_patch(base, donor, box, position)


def _map_row(title: str, found: state.ImageDetection, context: ScaleContext,
             mask: np.ndarray | None, before: state.ImageDetection | None = None) -> None:
    """One row: the three layer maps and the fused map, the edited region outlined with its
    peak (and the peak before the edit)."""
    per_layer = layer_context(context)
    columns = st.columns([1, 2, 2, 2, 2])
    columns[0].markdown(f"**{title}**")
    images = [heat_map(layer, SCALE_MODE, per_layer) for layer in found.layer_maps]
    images.append(heat_map(found.fused, SCALE_MODE, context))
    values = [*found.layer_maps, found.fused]
    earlier = [*before.layer_maps, before.fused] if before else [None] * 4
    for column, image, value, old, name in zip(columns[1:], images, values, earlier,
                                               [*LAYER_NAMES, "fused"], strict=True):
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
    size = detector.image_size
    kinds = ["Paint", "Paste a patch of a real defect"]
    controls = st.columns([2, 2, 1])
    kind = controls[0].radio("Edit", kinds, horizontal=True, key="learn_kind")
    source = None
    if kind == kinds[1]:
        if not defects:
            st.info("This category has no defective test images to copy from.")
            return
        source = controls[1].selectbox("Copy from", defects, key="learn_source",
                                       format_func=lambda s: _label(chosen, s))
        colour = "#000000"
    else:
        colour = controls[1].color_picker("Colour", "#f2f2f2", key="learn_colour")
    brush = controls[2].slider("Brush (a click)", 1, max(2, size // 8), max(3, size // 16),
                               key="learn_width")
    try:
        base = to_rgb_array(read_image(sample.path), size)
        before = state.detect(chosen, detector, base)
    except (DataError, OSError) as error:
        st.error(f"Cannot read {sample.path.name}: {error}")
        return
    drawn = st.session_state.get(REGION)
    region = None
    if drawn and drawn["image"] == str(sample.path) and drawn["size"] == size:
        region = region_of(drawn["selection"], size, size, brush)
    edited = after = mask = None
    if region is not None:
        try:
            edited, mask = _edit(base, region, kind, colour, source, size)
            after = state.detect(chosen, detector, edited)
        except (DataError, OSError, ValueError) as error:
            st.error(f"Cannot apply this edit: {error}")
            return

    top = st.columns([2, 2, 1])
    with top[0]:
        key = f"learn_canvas::{sample.path}::{size}"
        st.plotly_chart(canvas_figure(base, max(1, size // 64)), key=key,
                        on_select=lambda: _remember_region(key, str(sample.path), size),
                        selection_mode=("points", "box", "lasso"),
                        config={"displaylogo": False, "modeBarButtonsToRemove":
                                ["zoom2d", "pan2d", "autoScale2d", "resetScale2d"]})
        st.caption(f"Draw on the image ({size}×{size}, as the model sees it): drag a lasso "
                   "around a region (a box from the toolbar), or click a spot. "
                   + ("The region is filled with the colour." if source is None else
                      "The defect's patch is pasted at the region's centre."))
    if edited is None:
        top[1].info("Draw a region on the image at the left: the edited image, its maps and "
                    "its score appear here.")
    else:
        top[1].image(outline(edited, mask, CONTOUR_EDIT), output_format="PNG",
                     width="stretch", caption=f"edited: {int(mask.sum())} pixels changed "
                                              "(cyan outline)")
    top[2].metric("Score before", f"{before.score:.4f}")
    if after is not None:
        top[2].metric("Score after", f"{after.score:.4f}", f"{after.score - before.score:+.4f}",
                      delta_color="inverse")
    verdicts = [("original", before.score)] + ([("edited", after.score)] if after else [])
    top[2].caption(f"Threshold {threshold:.4f}: " + "; ".join(
        f"the {name} image is judged **{state.verdict(value, threshold)}**"
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
    if not normals and not defects:
        st.info("This category has no images to explain with.")
        return
    sample = st.selectbox("Image (normal ones first, then the defective test images)",
                          normals + defects, key="learn_image",
                          format_func=lambda s: _label(chosen, s))
    _explain(chosen, detector, sample, context)
    st.divider()
    _paint(chosen, detector, sample, defects, context, threshold)


main()
