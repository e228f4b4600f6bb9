"""Heat maps with colour scales that mean the same on every image, overlays and mask contours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from rd.lazy import lazy_module
from rd.visualize import colorize

ndimage = lazy_module("scipy.ndimage")  # 0.25 s to import: not before the first page

COLOUR_MODES = {
    "absolute": "One fixed range for the whole category (0 to the highest test score): the "
                "same colour is the same disagreement on every image.",
    "calibrated": "Scaled by the normal images' scores stored with the model: mid-scale is the "
                  "typical worst spot of a normal image (99th percentile of their scores at "
                  "half the range); orange and red are beyond anything normal.",
    "threshold": "The colour midpoint sits at the current threshold: everything above it is "
                 "warm, everything below cool.",
    "per-image": "Each image stretched to its own min–max. Makes every image, normal ones "
                 "included, look 'hot' somewhere: for shape only, not for comparing images.",
}
CONTOUR_TRUTH = (0, 255, 0)
CONTOUR_PREDICTED = (255, 0, 255)


@dataclass(frozen=True)
class ScaleContext:
    """What the colour modes need beyond the map itself."""

    category_max: float
    normal_p99: float | None
    threshold: float


def colour_range(mode: str, values: np.ndarray, context: ScaleContext) -> tuple[float, float]:
    """The (vmin, vmax) of a colour mode for ``values``."""
    if mode == "absolute":
        top = context.category_max
    elif mode == "calibrated":
        top = 2 * (context.normal_p99 if context.normal_p99 is not None else context.threshold)
    elif mode == "threshold":
        top = 2 * context.threshold
    elif mode == "per-image":
        low, high = float(values.min()), float(values.max())
        return low, high if high > low else low + 1e-6
    else:
        raise ValueError(f"unknown colour mode {mode!r}; choose one of {list(COLOUR_MODES)}")
    return 0.0, max(float(top), 1e-6)


def heat_map(values: np.ndarray, mode: str, context: ScaleContext) -> np.ndarray:
    """A map coloured as uint8 RGB under colour mode ``mode``."""
    vmin, vmax = colour_range(mode, values, context)
    return colorize(values, vmin, vmax)


def to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """The image as the model saw it: size×size uint8 RGB."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def blend(base: np.ndarray, heat: np.ndarray, opacity: float) -> np.ndarray:
    """Alpha-blend a heat map over an image of the same size."""
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}")
    mixed = (1 - opacity) * base.astype(np.float32) + opacity * heat.astype(np.float32)
    return mixed.round().astype(np.uint8)


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The outline pixels of a boolean mask (``width`` pixels thick, inside the region)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def draw_contour(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
                 width: int = 1) -> np.ndarray:
    """A copy of ``image`` with the outline of ``mask`` drawn in ``colour``."""
    out = image.copy()
    out[contour(mask, width)] = colour
    return out


def colour_bar(vmin: float, vmax: float, width: int = 256, height: int = 14) -> np.ndarray:
    """A horizontal strip showing the colour scale from vmin (left) to vmax (right)."""
    ramp = np.tile(np.linspace(vmin, vmax, width), (height, 1))
    return colorize(ramp, vmin, vmax)


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (height, width), e.g. back to an upload's size."""
    image = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR))
