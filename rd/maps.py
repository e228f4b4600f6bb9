"""Anomaly maps: per-layer ``1 - cos`` maps, their fusion, the Gaussian blur and the score.

Everything runs in torch on the tensors' device. The blur reproduces
``scipy.ndimage.gaussian_filter(map, sigma=4)`` (mode 'reflect', truncate 4: a 33-tap kernel).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIGMA = 4.0
TRUNCATE = 4.0
FUSIONS = ("sum", "product")


def layer_maps(teacher: list[torch.Tensor], student: list[torch.Tensor],
               size: tuple[int, int]) -> torch.Tensor:
    """Per-layer ``1 - cos`` along channels, bilinearly upsampled (align_corners) to ``size``.

    Returns (N, L, H, W). The cosine is computed in float32 whatever the input precision.
    """
    maps = []
    for t, s in zip(teacher, student, strict=True):
        distance = 1 - F.cosine_similarity(t.float(), s.float(), dim=1)
        maps.append(F.interpolate(distance.unsqueeze(1), size=size, mode="bilinear",
                                  align_corners=True))
    return torch.cat(maps, dim=1)


def fuse(maps: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Fuse (N, L, H, W) layer maps into (N, H, W): the reference sums them."""
    if mode == "sum":
        return maps.sum(dim=1)
    if mode == "product":
        return maps.prod(dim=1)
    raise ValueError(f"unknown fusion {mode!r}; choose one of {FUSIONS}")


# The kernel and the padding indices are plain numpy, computed on each call (microseconds): no
# cache, so that torch.compile and torch.export trace them as constants and never keep a tensor
# made while tracing.
def _kernel(sigma: float, truncate: float) -> tuple[np.ndarray, int]:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum(), radius


def _reflect_index(length: int, radius: int) -> np.ndarray:
    """Indices of a length-``length`` axis padded by ``radius`` in SciPy's 'reflect' mode.

    'reflect' repeats the edge sample (d c b a | a b c d | d c b a); the mapping below also
    holds when the radius exceeds the axis length.
    """
    index = np.arange(-radius, length + radius) % (2 * length)
    return np.where(index < length, index, 2 * length - 1 - index)


def gaussian_blur(maps: torch.Tensor, sigma: float = SIGMA, truncate: float = TRUNCATE
                  ) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) maps, equal to SciPy's ``gaussian_filter``."""
    weights, radius = _kernel(sigma, truncate)
    kernel = torch.as_tensor(weights, dtype=maps.dtype, device=maps.device)
    n, h, w = maps.shape
    x = maps.unsqueeze(1)
    x = x.index_select(3, torch.as_tensor(_reflect_index(w, radius), device=maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, torch.as_tensor(_reflect_index(h, radius), device=maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.view(n, h, w)


def image_scores(smoothed: torch.Tensor) -> torch.Tensor:
    """The image score: the maximum of the smoothed fused map."""
    return smoothed.flatten(1).amax(dim=1)
