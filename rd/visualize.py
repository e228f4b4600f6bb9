"""Heat-map colouring and overlays as plain numpy/PIL (used by the CLI and the app)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered dark-blue -> cyan -> yellow -> red scale.
_ANCHORS = np.array([
    [0.00, 0, 0, 80], [0.20, 0, 60, 200], [0.40, 0, 190, 230], [0.55, 60, 230, 130],
    [0.70, 240, 230, 40], [0.85, 250, 130, 20], [1.00, 200, 0, 0],
], dtype=np.float64)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map a 2-D array to uint8 RGB with a fixed range, so colours mean the same everywhere."""
    if not vmax > vmin:
        raise ValueError(f"colour range needs vmax > vmin, got [{vmin}, {vmax}]")
    position = np.clip((np.asarray(values, dtype=np.float64) - vmin) / (vmax - vmin), 0, 1)
    channels = [np.interp(position, _ANCHORS[:, 0], _ANCHORS[:, i]) for i in (1, 2, 3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend an RGB heat map (any size) over ``image`` at the image's own size."""
    heat_image = Image.fromarray(heat).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat_image, alpha)
