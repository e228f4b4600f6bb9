"""Aligned statistics: a per-pixel colour model of the normal images after rigid registration.

A part that turns and shifts a little between images (a nut dropped on a plate) defeats the
per-position statistics of ``rd.position`` (its normal variation moves with position), and RD's
map misses defects that only change its shape a little (hex_nut's bent corners: a few pixels of
outline moved, every patch still looking like a normal edge). Registered onto a common frame,
such parts line up, and each pixel's colour can be compared with what the normal images have
there: a bent outline is then pixels where the normals have background.

Registration: the image's grey level (channels averaged) is turned through ``angles()`` about its
centre, and each turned copy is phase-correlated with the *template*, the mean registered normal
image; the angle with the highest correlation peak, and that peak's shift, bring the image onto
the template. In that frame each pixel's z-score against the normals' per-pixel mean and
standard deviation (plus a floor of ``FLOOR`` of the pixel range, so that pixels the normals
never change do not turn noise into anomalies) is squared, averaged over the channels, blurred
like RD's map (σ 4) and taken back to the image's own frame.

``--aligned-stats`` (off by default: the paper) fits them on the squashed S×S normal training
images before the student trains and adds ``weight × map`` to RD's smoothed map; ``weight`` is
``WEIGHT_SHARE`` times the ratio of RD's mean map to the aligned map's mean over the normal
training images (each scored with the statistics of the *other* images, as new normal images
are). The image score stays RD's. ``--aligned-stats auto`` keeps them only when the registered
normal images are alike: their median correlation peak with the template is at least
``ALIKE_MIN_PEAK``. Textures and parts that turn freely or change shape do not register onto one
template, and there the per-pixel model only adds noise (docs/results.md, round 21).

The statistics are buffers of ``ReverseDistillation.aligned`` (checkpoint tensors
``aligned.*``). The ONNX graph does not carry the registration: a checkpoint with them runs in
torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rd.maps import gaussian_blur

MAX_ANGLE = 12.0  # degrees either way a part may turn between images
ANGLE_STEP = 0.5  # degrees between the turned copies tried
FLOOR = 0.1  # added to each pixel's standard deviation, as a share of the pixel range
# --aligned-stats auto keeps the statistics when the normal images' median phase-correlation
# peak with the template is at least this (docs/results.md, round 21: 0.21-0.54 on the parts
# that register, 0.10-0.15 on textures, a brushed strip and hazelnuts that turn freely)
ALIKE_MIN_PEAK = 0.2
# the aligned map's share of RD's on normal images (docs/results.md, round 21: 0.25 and 0.5
# compared on hex_nut; 0.5 lost wood's and hazelnut's AU-PRO)
WEIGHT_SHARE = 0.25


def angles() -> torch.Tensor:
    """The rotations tried, in radians, from -MAX_ANGLE to +MAX_ANGLE degrees."""
    count = round(MAX_ANGLE / ANGLE_STEP)
    return torch.deg2rad(torch.arange(-count, count + 1, dtype=torch.float32) * ANGLE_STEP)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """(..., 2, 2) rotation matrices of ``angle`` (radians), in affine_grid's (x, y) order."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def _sample(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W) sampled at ``theta`` (N, 2, 3) of each output position."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def grey(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W): the channels averaged (what registration compares)."""
    return images.float().mean(1)


def _phase_correlation(template_spectrum: torch.Tensor, moving: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (K, H, W) image: its shift (dy, dx) in pixels onto the template and the peak height
    (1: the same image shifted; near 0: nothing in common)."""
    spectrum = torch.fft.fft2(moving - moving.mean((-2, -1), keepdim=True))
    cross = template_spectrum * spectrum.conj()
    correlation = torch.fft.ifft2(cross / (cross.abs() + 1e-9)).real
    height, width = correlation.shape[-2:]
    peak, where = correlation.flatten(-2).max(-1)
    dy, dx = where // width, where % width
    dy = torch.where(dy > height // 2, dy - height, dy)
    dx = torch.where(dx > width // 2, dx - width, dx)
    return dy.float(), dx.float(), peak


def register(images: torch.Tensor, template: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses that bring ``images`` (N, C, H, W) onto ``template`` (H, W): theta (N, 2, 3), the
    affine_grid matrix giving, at each position of the registered frame, where to sample the
    image; and each image's correlation peak (N,)."""
    turns = angles().to(images.device)
    height, width = template.shape
    centred = template.float() - template.float().mean()
    template_spectrum = torch.fft.fft2(centred)
    rotations = _rotation(turns)  # (K, 2, 2)
    spin = torch.cat([rotations, rotations.new_zeros(len(turns), 2, 1)], -1)
    thetas, peaks = [], []
    for one in grey(images):  # one image at a time: its turned copies are the batch
        turned = _sample(one.expand(len(turns), 1, height, width), spin)[:, 0]
        dy, dx, peak = _phase_correlation(template_spectrum, turned)
        best = int(peak.argmax())
        # registered[p] = turned[p - d] = image[R (p - d)]: theta = [R | -R d], d normalised
        shift = torch.stack([dx[best] * 2 / width, dy[best] * 2 / height])
        rotation = rotations[best]
        thetas.append(torch.cat([rotation, -(rotation @ shift)[:, None]], 1))
        peaks.append(peak[best])
    return torch.stack(thetas), torch.stack(peaks)


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W) in the registered frame."""
    return _sample(images.float(), theta)


def unwarp(maps: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``maps`` (N, H, W) of the registered frame back in each image's own frame."""
    rotation, shift = theta[:, :, :2], theta[:, :, 2:]
    inverse = torch.cat([rotation.transpose(1, 2), -rotation.transpose(1, 2) @ shift], 2)
    return _sample(maps[:, None], inverse)[:, 0]


class AlignedStatistics(nn.Module):
    """The template, per-pixel mean and standard deviation of the registered normal images
    (normalised input units), the floor added to the deviation, and the map's weight."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("template", torch.zeros(size, size))
        self.register_buffer("mean", torch.zeros(3, size, size))
        self.register_buffer("std", torch.ones(3, size, size))
        self.register_buffer("floor", torch.full((3, 1, 1), FLOOR))
        self.register_buffer("weight", torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``weight`` times the smoothed map (N, H, W) of preprocessed ``images``."""
        return self.weight * self.raw_map(images)

    def raw_map(self, images: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None
                = None, theta: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H, W): mean squared z-score over channels in the registered frame, blurred
        (σ 4), in each image's own frame; ``moments`` (mean, std) replace the fitted ones,
        ``theta`` the images' registration when already known."""
        if theta is None:
            theta, _ = register(images, self.template)
        mean, std = moments or (self.mean, self.std)
        registered = warp(images, theta)
        z = (((registered - mean) / (std + self.floor)) ** 2).mean(1)
        return unwarp(gaussian_blur(z), theta)


def fit_aligned_statistics(batches: Callable[[], Iterable[torch.Tensor]], size: int,
                           pixel_std: Iterable[float], device: torch.device
                           ) -> tuple[AlignedStatistics, dict[str, Any]]:
    """Fit on the preprocessed normal images ``batches()`` yields (called three times: a
    template from the first image, the template again from the images registered to it, then
    the moments). ``pixel_std``: the normalisation's per-channel std (the floor is a share of
    the pixel range). Returns the statistics (weight 1: calibrate with RD's map) and metadata:
    the images, the median correlation peak and whether the images are alike (``auto``), the
    turns found, and the left-out map mean that calibration needs."""
    statistics = AlignedStatistics(size).to(device)
    statistics.floor.copy_(torch.tensor([FLOOR / s for s in pixel_std]).view(3, 1, 1))
    first = next(iter(batches())).to(device)
    statistics.template.copy_(grey(first[:1])[0])
    for rounds in range(2):  # the first registration's mean, then the moments against it
        # float64 sums: a deviation of 1 % of the values' size survives E[x²] - E[x]²
        total = torch.zeros(3, size, size, device=device, dtype=torch.float64)
        squares = torch.zeros_like(total)
        peaks, turns, thetas, count = [], [], [], 0
        for batch in batches():
            batch = batch.to(device).float()
            theta, peak = register(batch, statistics.template)
            thetas.append(theta)
            registered = warp(batch, theta).double()
            total += registered.sum(0)
            squares += (registered ** 2).sum(0)
            peaks.append(peak)
            turns.append(torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0])))
            count += len(batch)
        if rounds == 0:
            statistics.template.copy_(grey((total / count)[None])[0])
    mean = total / count
    statistics.mean.copy_(mean.float())
    statistics.std.copy_((squares / count - mean ** 2).clamp_min(0).sqrt().float())
    peaks_all, turns_all = torch.cat(peaks), torch.cat(turns)
    median_peak = float(peaks_all.median())
    alike = median_peak >= ALIKE_MIN_PEAK
    info = {
        "images": count,
        "median_peak": round(median_peak, 4),
        "turns_degrees": [round(float(v), 2) for v in (turns_all.min(), turns_all.median(),
                                                        turns_all.max())],
        "alike": alike,
        "why": (f"the registered normal images correlate with their template at a median peak "
                f"of {median_peak:.3f} ({'>=' if alike else '<'} {ALIKE_MIN_PEAK}): "
                + ("they line up, aligned statistics kept" if alike else
                   "they do not line up (a texture, or parts that turn freely or change "
                   "shape), aligned statistics left out")),
        "map_mean": left_out_map_mean(statistics, batches, thetas, total, squares, count)
        if count >= 3 else None,
    }
    return statistics, info


@torch.no_grad()
def left_out_map_mean(statistics: AlignedStatistics,
                      batches: Callable[[], Iterable[torch.Tensor]],
                      thetas: list[torch.Tensor], total: torch.Tensor, squares: torch.Tensor,
                      count: int) -> float:
    """The aligned map's mean over the normal images, each scored with the moments of the
    others (``thetas``: each batch's registration; ``total`` and ``squares``: the registered
    images' float64 sums)."""
    means, seen = 0.0, 0
    for batch, theta in zip(batches(), thetas, strict=True):
        batch = batch.to(total.device).float()
        for index, registered in enumerate(warp(batch, theta).double()):
            mean = (total - registered) / (count - 1)
            std = ((squares - registered ** 2) / (count - 1) - mean ** 2).clamp_min(0).sqrt()
            means += float(statistics.raw_map(batch[index:index + 1], (mean.float(), std.float()),
                                              theta[index:index + 1]).mean())
            seen += 1
    return means / seen


def calibrate(statistics: AlignedStatistics, rd_mean: float, map_mean: float) -> float:
    """Set and return the weight: ``WEIGHT_SHARE`` of RD's mean map on normal images."""
    usable = map_mean > 0 and math.isfinite(map_mean)
    weight = WEIGHT_SHARE * rd_mean / map_mean if usable else 0.0
    statistics.weight.fill_(weight)
    return weight
