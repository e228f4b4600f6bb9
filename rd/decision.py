"""The one decision rule and one image's result, free of torch so that pages showing stored
scores (the studio's grid, its badges and downloads) start without importing it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def is_defective(score: float | np.ndarray, threshold: float) -> bool | np.ndarray:
    """THE decision rule of every page, download and command: an image is defective when its
    score reaches the threshold (``>=``, so an image scoring exactly the threshold is
    defective). ``score`` may be an array of scores: then an array of decisions."""
    if isinstance(score, np.ndarray):
        return score >= float(threshold)
    return bool(float(score) >= float(threshold))


def verdict(score: float, threshold: float) -> str:
    """``"defective"`` or ``"normal"``: the word for :func:`is_defective`'s decision."""
    return "defective" if is_defective(score, threshold) else "normal"


@dataclass(frozen=True)
class ImageDetection:
    """One image's result: its score and maps (numpy, at the model's input resolution, or at
    the image's own size for letterbox and tile checkpoints)."""

    score: float
    layer_maps: np.ndarray  # (3, H, W): 1 - cos per teacher layer (strides 4, 8, 16)
    fused: np.ndarray  # (H, W): the fused, Gaussian-smoothed anomaly map

    def is_defective(self, threshold: float) -> bool:
        return bool(is_defective(self.score, threshold))

    def verdict(self, threshold: float) -> str:
        return verdict(self.score, threshold)
