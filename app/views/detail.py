"""The detail block every page shows for one image: input, ground truth, the three per-layer
maps, the fused map, the overlay and the score against the threshold.

The pictures are built here once (pure numpy, tested directly and timed by
``benchmarks/app_latency.py``); :func:`show_maps` and :func:`show_verdict` draw them, so Inspect,
Review and Learn lay out the same block the same way.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from app.views.images import (
    CONTOUR_PREDICTED,
    CONTOUR_TRUTH,
    ScaleContext,
    blend,
    colour_bar,
    colour_range,
    draw_contour,
    heat_map,
    resize_map,
)
from rd.decision import is_defective


def score_note(metadata: Any) -> str:
    """What a model's score is, and what its heat map shows besides (a checkpoint's
    metadata: ``position_stats``, ``aligned_stats`` and ``turn_average`` when trained with
    them: rd.position, rd.alignment, ReverseDistillation.rd_maps)."""
    notes = [_position_note(metadata)]
    if metadata.get("aligned_stats"):
        notes.append("The heat map also adds where the image, registered onto the normal "
                     "images' template, differs in colour from them at that place (this "
                     "model's aligned statistics: bent or moved outlines, missing pieces), "
                     "which the score leaves out.")
    if metadata.get("turn_average"):
        notes.append("The paper's maps are averaged over the image's four quarter turns "
                     "(this model's parts lie at any angle).")
    return " ".join(notes)


def _position_note(metadata: Any) -> str:
    info = metadata.get("position_stats")
    if not info:
        auto = metadata.get("position_auto")
        if isinstance(auto, Mapping) and auto.get("why"):  # --position-stats auto left them out
            return f"Score = maximum of the smoothed fused map ({auto['why']})."
        return "Score = maximum of the smoothed fused map."
    if isinstance(info, Mapping) and info.get("score"):
        return ("Score = the larger of the paper's score (maximum of its smoothed fused map) "
                "and this model's position statistics' (where the image differs from the "
                "normal images at the same place), each measured against the most surprising "
                "normal training image. The heat map adds both.")
    if isinstance(info, Mapping) and info.get("mode") == "envelope":
        auto = metadata.get("position_auto")  # --position-stats adaptive chose the envelope
        why = f" ({auto['why']})" if isinstance(auto, Mapping) and auto.get("why") else ""
        return ("Score = maximum of the paper's smoothed fused map. The heat map adds where "
                "the image exceeds, at the same place, every normal training image and its "
                "augmented copies (this model's position envelope: faint large regions, "
                f"missing or misplaced parts), which the score leaves out{why}.")
    return ("Score = maximum of the paper's smoothed fused map. The heat map adds this "
            "model's position statistics (where the image differs from the normal images at "
            "the same place: faint large regions, misplaced parts), which the score leaves "
            "out.")

LAYER_NAMES = ("layer 1 · stride 4", "layer 2 · stride 8", "layer 3 · stride 16")
DISPLAY_MAX = 512  # longest side of the shown pictures: the page shows them at most ~450 px wide
PNG_LEVEL = 1  # zlib level: 6x faster than PIL's default for ~15% more bytes (sent on localhost)
CONTOUR_WIDTH = 2


def layer_context(context: ScaleContext) -> ScaleContext:
    """The colour scale of one layer's map: the fused map sums the three layers, so each layer
    is shown on a third of the fused scale."""
    return ScaleContext(context.category_max / 3,
                        None if context.normal_p99 is None else context.normal_p99 / 3,
                        context.threshold / 3)


def display_size(width: int, height: int, longest: int = DISPLAY_MAX) -> tuple[int, int]:
    """(width, height) with the image's own aspect ratio and the longest side at most
    ``longest`` (never enlarged beyond the original)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_size(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map (S×S, as the model computed it) resized to (width, height): back to the
    image's own aspect ratio."""
    width, height = size
    if values.shape == (height, width):
        return np.asarray(values, dtype=np.float32)
    return resize_map(values, (height, width))


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask at (width, height), nearest neighbour so it stays binary."""
    if mask.shape == (size[1], size[0]):
        return np.asarray(mask, dtype=bool)
    return np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
                      .resize(size, Image.Resampling.NEAREST)) > 0


@dataclass(frozen=True)
class DetailPictures:
    """Every picture of the detail block, all at the same (display) size."""

    base: np.ndarray
    mask: np.ndarray | None
    overlay: np.ndarray
    heat: np.ndarray
    layers: tuple[np.ndarray, np.ndarray, np.ndarray]
    bar: np.ndarray
    vmin: float
    vmax: float


def detail_pictures(image: Image.Image, layer_maps: np.ndarray, fused: np.ndarray,
                    mask: np.ndarray | None, context: ScaleContext, mode: str,
                    opacity: float = 0.5, contours: bool = True,
                    size: tuple[int, int] | None = None) -> DetailPictures:
    """The detail block's pictures of one image at ``size`` (width, height; default: the
    image's own aspect ratio, longest side DISPLAY_MAX).

    ``mask`` may have any size (it is resized with nearest neighbour). Layer maps use a third of
    the fused colour scale (:func:`layer_context`).
    """
    size = size or display_size(*image.size)
    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    fused_shown = to_size(fused, size)
    heat = heat_map(fused_shown, mode, context)
    if mask is not None:
        mask = fit_mask(mask, size)
    overlay = blend(base, heat, opacity)
    if contours:
        if mask is not None:
            overlay = draw_contour(overlay, mask, CONTOUR_TRUTH, CONTOUR_WIDTH)
        overlay = draw_contour(overlay, is_defective(fused_shown, context.threshold),
                               CONTOUR_PREDICTED, CONTOUR_WIDTH)
    per_layer = layer_context(context)
    layers = tuple(heat_map(to_size(layer, size), mode, per_layer) for layer in layer_maps)
    vmin, vmax = colour_range(mode, fused_shown, context)
    return DetailPictures(base, mask, overlay, heat, layers,
                          colour_bar(vmin, vmax, width=512), vmin, vmax)


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 picture as PNG bytes (heat maps stay crisp; JPEG smears colour bands), encoded
    fast: ``st.image`` would spend most of the detail's time compressing harder."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def npy_bytes(values: np.ndarray) -> bytes:
    """A float map as the bytes of a float32 ``.npy`` file."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=np.float32))
    return buffer.getvalue()


def download_name(category: str, defect: str, name: str, kind: str, extension: str) -> str:
    """``<category>_<defect>_<name>_<kind>.<extension>``: downloads of different images and
    categories never overwrite each other."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{category}_{defect}_{stem}_{kind}.{extension}"


# ---------------------------------------------------------------------------------- drawing


def show_maps(pictures: DetailPictures, caption_fused: str = "fused heat map",
              truth: bool = True) -> None:
    """Draw the block: input, ground truth, overlay on the first row; the three layer maps and
    the fused map on the second; the colour bar under them."""
    import streamlit as st

    def show(where: Any, picture: np.ndarray, caption: str, width: str = "stretch") -> None:
        # PNG said outright: left to "auto", Streamlit decodes the PNG and re-encodes it as a
        # JPEG (quality 90), which smears the heat maps' colours and costs time on every image
        where.image(png_bytes(picture), caption=caption, output_format="PNG", width=width)

    first = st.columns(3)
    show(first[0], pictures.base, "input")
    if pictures.mask is not None:
        show(first[1], pictures.mask.astype(np.uint8) * 255, "ground truth")
    elif truth:
        first[1].info("No ground-truth mask for this image.")
    show(first[2], pictures.overlay, "overlay")
    st.markdown("**Teacher–student disagreement, layer by layer** (1 − cosine, before "
                "smoothing) **and fused** (sum of the three, Gaussian σ = 4)")
    second = st.columns(4)
    for column, layer, title in zip(second[:3], pictures.layers, LAYER_NAMES, strict=True):
        show(column, layer, title)
    show(second[3], pictures.heat, caption_fused)
    show(st, pictures.bar, f"fused scale {pictures.vmin:.3f} → {pictures.vmax:.3f} "
                           "(layer maps: a third of it)", width="content")


def show_verdict(columns: list, score: float, threshold: float, verdict: str) -> None:
    """The score against the threshold and the verdict (``state.verdict``: the one rule) as
    two metrics, in the first two of ``columns``."""
    columns[0].metric("Score", f"{score:.4f}", f"{score - threshold:+.4f} vs threshold",
                      delta_color="inverse")
    columns[1].metric("Verdict", verdict)
