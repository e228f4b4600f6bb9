"""What the Learn page computes: feature PCA colours, one explicit teacher→student walk, and
the image edits of "paint a defect". Pure functions, no Streamlit, so they are unit-tested."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from rd.maps import layer_maps
from rd.model import ReverseDistillation

PCA_COMPONENTS = 3
PERCENTILES = (1.0, 99.0)  # robust range: a few extreme pixels must not wash out the colours


@dataclass(frozen=True)
class PCABasis:
    """A projection fitted on one feature map, reusable on another of the same channels.

    Sharing it (fit on the teacher, apply to the student) makes the same colour mean the same
    feature in both images.
    """

    mean: np.ndarray  # (C,)
    components: np.ndarray  # (3, C), rows orthonormal (zero rows when the rank is below 3)
    low: np.ndarray  # (3,) projection value shown as 0
    high: np.ndarray  # (3,) projection value shown as 255


def _fit(pixels: np.ndarray) -> PCABasis:
    mean = pixels.mean(axis=0)
    _, _, vt = np.linalg.svd(pixels - mean, full_matrices=False)
    components = np.zeros((PCA_COMPONENTS, pixels.shape[1]))
    count = min(PCA_COMPONENTS, vt.shape[0])
    components[:count] = vt[:count]
    # SVD signs are arbitrary: make each component's largest loading positive, so the same
    # features always get the same colours.
    largest = components[np.arange(PCA_COMPONENTS), np.abs(components).argmax(axis=1)]
    components *= np.where(largest < 0, -1.0, 1.0)[:, None]
    projected = (pixels - mean) @ components.T
    low, high = np.percentile(projected, PERCENTILES, axis=0)
    return PCABasis(mean, components, low, np.maximum(high, low + 1e-6))


def pca_rgb(features: np.ndarray, basis: PCABasis | None = None
            ) -> tuple[np.ndarray, PCABasis]:
    """(C, H, W) features as (H, W, 3) uint8: the top three principal components as R, G, B.

    Each position's feature vector is scaled to unit length first: the anomaly map compares
    directions (cosine) and the student's features are several times shorter than the
    teacher's, so colours must show direction only. Without ``basis`` one is fitted on
    ``features``; pass the teacher's to colour the student.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 3:
        raise ValueError(f"expected (C, H, W) features, got shape {features.shape}")
    channels, height, width = features.shape
    pixels = features.reshape(channels, -1).T
    pixels = pixels / np.maximum(np.linalg.norm(pixels, axis=1, keepdims=True), 1e-12)
    if basis is None:
        basis = _fit(pixels)
    elif basis.mean.shape != (channels,):
        raise ValueError(f"the basis was fitted on {basis.mean.shape[0]} channels, "
                         f"these features have {channels}")
    projected = (pixels - basis.mean) @ basis.components.T
    scaled = np.clip((projected - basis.low) / (basis.high - basis.low), 0, 1)
    return (scaled * 255).round().astype(np.uint8).reshape(height, width, 3), basis


@torch.no_grad()
def feature_walk(model: ReverseDistillation, batch: torch.Tensor) -> dict[str, object]:
    """Teacher → bottleneck → decoder step by step, keeping what each step hands on.

    Returns numpy arrays: ``teacher`` and ``student`` (lists of (N, C, H, W) per layer),
    ``embedding`` (N, C, h, w) and ``layer_maps`` (N, 3, S, S), the latter by the very
    function inference uses, so the page explains the maps the detector reports (for a
    ``--turn-average`` model, the average over the image's quarter turns; the features shown
    are the unturned image's).
    """
    if model.training:
        raise ValueError("put the model in eval mode: batch norm would use this batch's "
                         "statistics and the maps would differ from inference")
    device = next(model.bottleneck.parameters()).device
    images = batch.to(device)
    teacher = model.teacher(images)
    embedding = model.bottleneck(teacher)
    student = model.decoder(embedding)
    maps = (model.rd_maps(images)[1] if model.turn_average
            else layer_maps(teacher, student, images.shape[-2:]))
    return {
        "teacher": [t.float().cpu().numpy() for t in teacher],
        "student": [s.float().cpu().numpy() for s in student],
        "embedding": embedding.float().cpu().numpy(),
        "layer_maps": maps.cpu().numpy(),
    }


def enlarge(rgb: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upscale to size×size: feature cells stay visible as blocks."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.NEAREST))


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.any(before != after, axis=-1)


def paint_stroke(image: np.ndarray, start: tuple[float, float], end: tuple[float, float],
                 width: float, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw a round-capped straight stroke from ``start`` to ``end`` ((x, y) pixel centres).

    Returns the painted copy and the mask of pixels whose value changed (a pixel already of
    ``colour`` is not a change).
    """
    if width <= 0:
        raise ValueError(f"stroke width must be positive, got {width}")
    height, width_px = image.shape[:2]
    yy, xx = np.mgrid[:height, :width_px].astype(np.float64)
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    along = 0.0 if length2 == 0 else np.clip(((xx - x0) * dx + (yy - y0) * dy) / length2, 0, 1)
    distance2 = (xx - (x0 + along * dx)) ** 2 + (yy - (y0 + along * dy)) ** 2
    out = image.copy()
    out[distance2 <= (width / 2) ** 2] = colour
    return out, _changed(image, out)


def paste_patch(target: np.ndarray, source: np.ndarray, box_src: tuple[int, int, int, int],
                position: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Copy ``source[top:bottom, left:right]`` (box = left, top, right, bottom) into ``target``
    with its top-left corner at ``position`` (x, y); what falls outside ``target`` is dropped.

    Returns the edited copy and the mask of pixels whose value changed.
    """
    left, top, right, bottom = box_src
    if not (0 <= left < right <= source.shape[1] and 0 <= top < bottom <= source.shape[0]):
        raise ValueError(f"box {box_src} does not lie inside the {source.shape[1]}×"
                         f"{source.shape[0]} source image")
    x, y = position
    patch = source[top:bottom, left:right]
    x0, y0 = max(x, 0), max(y, 0)
    x1 = min(x + patch.shape[1], target.shape[1])
    y1 = min(y + patch.shape[0], target.shape[0])
    out = target.copy()
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = patch[y0 - y:y1 - y, x0 - x:x1 - x]
    return out, _changed(target, out)


def outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
            width: int = 2) -> np.ndarray:
    """A copy of ``image`` with a ring of ``width`` pixels drawn just *outside* ``mask``, so
    a thin painted stroke, or the map under it, stays visible inside its outline."""
    ring = ndimage.binary_dilation(mask, iterations=width) & ~np.asarray(mask, dtype=bool)
    out = image.copy()
    out[ring] = colour
    return out


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The bounding box (left, top, right, bottom; right/bottom exclusive) of a mask, or None
    when it is empty: the default source box of a pasted defect."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def hex_colour(value: str) -> tuple[int, int, int]:
    """'#rrggbb' (what st.color_picker returns) as an RGB triple."""
    text = value.lstrip("#")
    if len(text) != 6:
        raise ValueError(f"expected a colour like '#ff8800', got {value!r}")
    red, green, blue = (int(text[i:i + 2], 16) for i in (0, 2, 4))
    return red, green, blue


def canvas_figure(image: np.ndarray, step: int = 2) -> go.Figure:
    """The image as a Plotly figure to draw on: lasso (default) or box around a region, or click
    a spot. An invisible grid of points every ``step`` pixels makes clicks and selections report
    where they fell; the axes are the image's pixel coordinates."""
    height, width = image.shape[:2]
    ys, xs = np.mgrid[step // 2:height:step, step // 2:width:step]
    figure = go.Figure(go.Image(z=image, hoverinfo="skip"))
    figure.add_trace(go.Scatter(x=xs.ravel(), y=ys.ravel(), mode="markers",
                                marker={"size": 6, "opacity": 0}, hoverinfo="none",
                                showlegend=False))
    figure.update_layout(dragmode="lasso", margin={"l": 0, "r": 0, "t": 0, "b": 0},
                         height=min(640, max(320, 2 * height)), clickmode="event+select",
                         xaxis={"visible": False, "range": [-0.5, width - 0.5],
                                "constrain": "domain"},
                         yaxis={"visible": False, "range": [height - 0.5, -0.5],
                                "scaleanchor": "x", "constrain": "domain"})
    return figure


def region_of(selection: Mapping[str, Any], height: int, width: int, brush: float = 3
              ) -> np.ndarray | None:
    """The pixels a Plotly selection (``st.plotly_chart`` with ``on_select``) covers on a
    height×width image: every box and lasso filled, and a disc of diameter ``brush`` around
    each clicked point when there is neither. None when nothing is selected."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    shapes = 0
    for box in selection.get("box") or []:
        (x0, x1), (y0, y1) = sorted(box["x"]), sorted(box["y"])
        draw.rectangle([round(x0), round(y0), round(x1), round(y1)], fill=1)
        shapes += 1
    for lasso in selection.get("lasso") or []:
        points = list(zip(lasso["x"], lasso["y"], strict=True))
        if len(points) >= 3:
            draw.polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
            shapes += 1
    mask = np.asarray(canvas, dtype=bool)
    if not shapes:
        clicked = [(p["x"], p["y"]) for p in selection.get("points") or []
                   if "x" in p and "y" in p]
        if not clicked:
            return None
        mask = np.zeros((height, width), dtype=bool)
        blank = np.zeros((height, width, 3), np.uint8)
        for x, y in clicked:
            mask |= paint_stroke(blank, (x, y), (x, y), brush, (1, 1, 1))[1]
    return mask if mask.any() else None


def paint_region(image: np.ndarray, region: np.ndarray, colour: tuple[int, int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with ``region`` filled in ``colour``, and the mask of pixels that changed."""
    out = image.copy()
    out[region] = colour
    return out, _changed(image, out)


def centre_of(region: np.ndarray) -> tuple[int, int]:
    """The (x, y) centre of a region's bounding box: where a pasted patch goes."""
    left, top, right, bottom = mask_box(region)
    return (left + right) // 2, (top + bottom) // 2
