"""Input geometry: how an image of any size and aspect becomes model inputs, and maps come back.

- ``squash`` (the paper, the default): resize to S×S whatever the aspect ratio.
- ``letterbox``: keep the aspect ratio, scale the long side to S and pad to the square; the
  padding is masked out of the maps, the score and the training loss.
- ``tile``: scale the image by ``tile_scale`` (1 = native pixels), cover it with S×S tiles that
  overlap by ``overlap`` of a tile; train on the tiles of normal images, and at inference stitch
  the per-layer maps (overlaps averaged), then fuse, blur and score the whole image.
- ``multiscale``: ``tile`` and ``letterbox`` together: one student trains on the tiles and on the
  whole letterboxed image. Tiles see thin defects at native resolution, the whole image sees
  what only its context reveals (a faint uneven region larger than a tile). At inference each
  view's fused map is blurred at its own resolution, as the paper blurs its S×S map (σ = 4
  model pixels: 4 canvas pixels for the tiles, 4·long side/S image pixels for the whole view),
  and the two smoothed maps are averaged (``combine="smoothed"``, docs/results.md, round 5).
  Checkpoints trained before that record no ``combine`` and keep the rule they were evaluated
  with (``"layers"``: per-layer maps averaged, then fused and blurred once at canvas scale).

Maps of ``letterbox`` and ``tile`` come back at the original image size. The geometry is stored
in the checkpoint's metadata (key ``geometry``; absent means ``squash``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from rd.data.dataset import ImageDataset
from rd.data.images import ImageSource, read_image
from rd.data.mvtec import Sample
from rd.data.transforms import Preprocess
from rd.maps import fuse, gaussian_blur

RESIZE_MODES = ("squash", "letterbox", "tile", "multiscale")
COMBINE_RULES = ("smoothed", "layers")  # multiscale: how the two views' maps are combined
ImageTransform = Callable[[Image.Image, int], Image.Image]  # (image, seed) -> image


@dataclass(frozen=True)
class Geometry:
    """How images are fitted to the model's square input (see the module's notes)."""

    mode: str = "squash"
    tile_scale: float = 1.0  # tile: the image is scaled by this before tiling (1 = native)
    overlap: float = 0.25  # tile: share of a tile's side overlapping its neighbour
    combine: str = "smoothed"  # multiscale: each view blurred at its own scale, then averaged

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.mode!r}; choose one of {RESIZE_MODES}")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"unknown multiscale combination {self.combine!r}; choose one of "
                             f"{COMBINE_RULES}")
        if not 0 < self.tile_scale <= 4:
            raise ValueError(f"tile scale must lie in (0, 4], got {self.tile_scale}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"tile overlap must lie in [0, 1), got {self.overlap}")

    @property
    def is_paper(self) -> bool:
        return self.mode == "squash"

    def to_dict(self) -> dict[str, Any]:
        multiscale = {"combine": self.combine} if self.mode == "multiscale" else {}
        return {"mode": self.mode, "tile_scale": self.tile_scale, "overlap": self.overlap,
                **multiscale}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Geometry:
        """The geometry a checkpoint was trained with (``squash`` when none is recorded; a
        multiscale checkpoint without ``combine`` predates the per-view blur: ``layers``)."""
        data = metadata.get("geometry") or {}
        return cls(data.get("mode", "squash"), float(data.get("tile_scale", 1.0)),
                   float(data.get("overlap", 0.25)), str(data.get("combine", "layers")))

    # ------------------------------------------------------------------ one image -> inputs

    def inputs(self, image: Image.Image, preprocess: Preprocess) -> Inputs:
        """The model inputs of one RGB image, with where they lie in the (scaled) image."""
        size = preprocess.size
        if self.mode == "squash":
            return Inputs(preprocess(image).unsqueeze(0), torch.ones(1, 1, size, size),
                          [(0, 0)], (size, size), (size, size))
        if self.mode == "letterbox":
            top, left, height, width = letterbox_box(image.height, image.width, size)
            canvas, valid = _padded(image.resize((width, height), Image.Resampling.BILINEAR),
                                    preprocess, (size, size), (top, left))
            return Inputs(canvas.unsqueeze(0), valid.unsqueeze(0), [(0, 0)], (size, size),
                          (height, width), (top, left))
        if self.mode == "multiscale":  # training inputs: the tiles, then the whole image
            tiles = Geometry("tile", self.tile_scale, self.overlap).inputs(image, preprocess)
            if len(tiles.images) == 1 and tiles.content == (size, size):
                return tiles  # one tile is the whole image: no second, identical input
            whole = Geometry("letterbox").inputs(image, preprocess)
            return Inputs(torch.cat([tiles.images, whole.images]),
                          torch.cat([tiles.valid, whole.valid]), tiles.corners, tiles.canvas,
                          tiles.content)
        height = max(1, round(image.height * self.tile_scale))
        width = max(1, round(image.width * self.tile_scale))
        scaled = image if (height, width) == (image.height, image.width) else image.resize(
            (width, height), Image.Resampling.BILINEAR)
        canvas_hw = (max(height, size), max(width, size))
        canvas, valid = _padded(scaled, preprocess, canvas_hw, (0, 0))
        corners = [(y, x) for y in tile_starts(canvas_hw[0], size, self.overlap)
                   for x in tile_starts(canvas_hw[1], size, self.overlap)]
        tiles = torch.stack([canvas[:, y:y + size, x:x + size] for y, x in corners])
        valids = torch.stack([valid[:, y:y + size, x:x + size] for y, x in corners])
        return Inputs(tiles, valids, corners, canvas_hw, (height, width))


@dataclass
class Inputs:
    """Model inputs of one image: S×S tensors, their valid pixels and their place."""

    images: torch.Tensor  # (T, 3, S, S)
    valid: torch.Tensor  # (T, 1, S, S) 1 on image pixels, 0 on padding
    corners: list[tuple[int, int]]  # top-left of each input in the canvas
    canvas: tuple[int, int]  # (h, w) of the canvas the inputs tile
    content: tuple[int, int]  # (h, w) of the image's pixels in the canvas
    offset: tuple[int, int] = (0, 0)  # where the content starts in the canvas


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image scaled to fit size×size, centred."""
    scale = size / max(height, width)
    new_h = min(size, max(1, round(height * scale)))
    new_w = min(size, max(1, round(width * scale)))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Starts of size-long tiles covering 0..length, evenly spread, overlapping >= overlap."""
    if length <= size:
        return [0]
    stride = max(1, int(size * (1 - overlap)))
    count = math.ceil((length - size) / stride) + 1
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def _padded(image: Image.Image, preprocess: Preprocess, canvas: tuple[int, int],
            offset: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image placed at ``offset`` on a canvas of zeros (the mean colour), and the
    (1, h, w) mask of its pixels."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    tensor = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)
    tensor = tensor.sub_(mean).div_(std)
    out = torch.zeros(3, *canvas)
    valid = torch.zeros(1, *canvas)
    top, left = offset
    out[:, top:top + image.height, left:left + image.width] = tensor
    valid[:, top:top + image.height, left:left + image.width] = 1
    return out, valid


# ------------------------------------------------------------------------- maps and scores


def masked_blur(fused: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of (N, H, W) maps that ignores padding: the blur of the map inside
    ``valid`` normalised by the blur of ``valid`` (padding values never leak in). Where every
    pixel is valid this is exactly ``gaussian_blur``."""
    if bool((valid > 0).all()):
        return gaussian_blur(fused)
    inside = (valid > 0).to(fused.dtype)
    weight = gaussian_blur(inside)
    blurred = gaussian_blur(fused * inside) / weight.clamp_min(1e-12)
    return blurred * inside


def masked_scores(smoothed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The image score: the maximum of the smoothed map over valid pixels only."""
    inside = (valid > 0).flatten(1)
    return smoothed.flatten(1).masked_fill(~inside, float("-inf")).amax(dim=1)


@dataclass
class NativeMaps:
    """Maps of one image at its original size."""

    layer_maps: torch.Tensor  # (3, H, W)
    fused: torch.Tensor  # (H, W) fused and smoothed
    score: float


@torch.no_grad()
def _stitched(model: torch.nn.Module, inputs: Inputs, size: int, chunk: int,
              device: torch.device) -> torch.Tensor:
    """(1, 3, h, w) per-layer maps of the inputs' canvas, overlapping inputs averaged."""
    canvas_h, canvas_w = inputs.canvas
    total = torch.zeros(1, 3, canvas_h, canvas_w, device=device)
    counts = torch.zeros(1, 1, canvas_h, canvas_w, device=device)
    for start in range(0, len(inputs.images), chunk):
        batch = inputs.images[start:start + chunk].to(device)
        maps = model.rd_maps(batch)[1]
        for index, tile_maps in enumerate(maps):
            y, x = inputs.corners[start + index]
            total[0, :, y:y + size, x:x + size] += tile_maps
            counts[0, :, y:y + size, x:x + size] += 1
    return total / counts


def _whole_view(model: torch.nn.Module, rgb: Image.Image, preprocess: Preprocess,
                size: tuple[int, int], fusion: str, chunk: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiscale's second view: the letterboxed whole image's per-layer maps (1, 3, h, w) and
    its fused map blurred at the model's resolution (1, h, w), both brought to ``size``."""
    whole = Geometry("letterbox").inputs(rgb, preprocess)
    maps = _stitched(model, whole, preprocess.size, chunk, device)
    smoothed = masked_blur(fuse(maps, fusion), whole.valid[0])
    (top, left), (height, width) = whole.offset, whole.content
    box = (slice(top, top + height), slice(left, left + width))
    maps = F.interpolate(maps[:, :, box[0], box[1]], size=size, mode="bilinear",
                         align_corners=False)
    smoothed = F.interpolate(smoothed[:, None, box[0], box[1]], size=size, mode="bilinear",
                             align_corners=False)[:, 0]
    return maps, smoothed


def predict_native(model: torch.nn.Module, image: ImageSource, preprocess: Preprocess,
                   geometry: Geometry, fusion: str = "sum", chunk: int = 4,
                   device: torch.device | None = None) -> NativeMaps:
    """Maps of one image at its original size, the way ``geometry`` fits it to the model.

    ``squash`` upsamples the paper's S×S maps; ``letterbox`` crops the padding away;
    ``tile`` stitches the tiles' per-layer maps (overlaps averaged) before fusing and blurring;
    ``multiscale`` adds the whole image's view (see the module's notes). Position statistics
    (rd.position) and aligned statistics (rd.alignment), when the model has them, add their
    maps; the score stays RD's (with --position-score, or the position statistics').
    """
    rgb = read_image(image)
    device = device or next(model.parameters()).device
    views = geometry
    if geometry.mode == "multiscale":
        views = Geometry("tile", geometry.tile_scale, geometry.overlap)
    inputs = views.inputs(rgb, preprocess)
    stitched = _stitched(model, inputs, preprocess.size, chunk, device)
    canvas_h, canvas_w = inputs.canvas
    canvas_valid = torch.zeros(1, canvas_h, canvas_w, device=device)
    top, left = inputs.offset
    height, width = inputs.content
    crop = (slice(top, top + height), slice(left, left + width))
    canvas_valid[:, crop[0], crop[1]] = 1
    views_smoothed = None
    if geometry.mode == "multiscale":  # average with the whole view, at the tiled content's size
        whole_maps, whole_smoothed = _whole_view(model, rgb, preprocess, (height, width),
                                                 fusion, chunk, device)
        if geometry.combine == "smoothed":  # else "layers": checkpoints before the per-view blur
            views_smoothed = masked_blur(fuse(stitched, fusion), canvas_valid)
            views_smoothed[:, crop[0], crop[1]] += whole_smoothed
            views_smoothed[:, crop[0], crop[1]] /= 2
        stitched[:, :, crop[0], crop[1]] += whole_maps
        stitched[:, :, crop[0], crop[1]] /= 2
    smoothed = (masked_blur(fuse(stitched, fusion), canvas_valid) if views_smoothed is None
                else views_smoothed)
    score = float(masked_scores(smoothed, canvas_valid)[0])
    layers = stitched[0][:, crop[0], crop[1]]
    fused = smoothed[0][crop]
    if (height, width) != (rgb.height, rgb.width):
        target = (rgb.height, rgb.width)
        layers = F.interpolate(layers[None], size=target, mode="bilinear", align_corners=False)[0]
        fused = F.interpolate(fused[None, None], size=target, mode="bilinear",
                              align_corners=False)[0, 0]
    if getattr(model, "position", None) is not None:  # rd.position
        position_map, position_score = _position_map(model, rgb, preprocess, device)
        fused = fused + position_map
        if position_score is not None:  # --position-score
            score = max(score, position_score)
    if getattr(model, "aligned", None) is not None:  # rd.alignment
        fused = fused + _aligned_map(model, rgb, preprocess, device)
    return NativeMaps(layers, fused, score)


@torch.no_grad()
def _position_map(model: torch.nn.Module, rgb: Image.Image, preprocess: Preprocess,
                  device: torch.device) -> tuple[torch.Tensor, float | None]:
    """The position statistics' map (rd.position) at the image's size, and their image score
    (None unless --position-score): they model the squashed S×S view of the whole image,
    whatever the geometry."""
    size = preprocess.size
    features = model.teacher(preprocess(rgb).unsqueeze(0).to(device))
    square, score = model.position(features, (size, size))
    native = F.interpolate(square.float()[:, None], size=(rgb.height, rgb.width),
                           mode="bilinear", align_corners=False)[0, 0]
    return native, None if score is None else float(score[0])


@torch.no_grad()
def _aligned_map(model: torch.nn.Module, rgb: Image.Image, preprocess: Preprocess,
                 device: torch.device) -> torch.Tensor:
    """The aligned statistics' map (rd.alignment) at the image's size: they model the
    squashed S×S view of the whole image, whatever the geometry."""
    square = model.aligned(preprocess(rgb).unsqueeze(0).to(device))
    return F.interpolate(square.float()[:, None], size=(rgb.height, rgb.width),
                         mode="bilinear", align_corners=False)[0, 0]


# ------------------------------------------------------------------------------ training


class GeometryDataset(Dataset):
    """Training inputs of normal images: one per image (letterbox) or per tile (tile), each
    with its valid-pixel mask; optional image transforms give augmented copies."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess, geometry: Geometry,
                 transforms: Sequence[ImageTransform | None] = (None,)) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.geometry = geometry
        self.transforms = list(transforms)
        self.items: list[tuple[int, int, int]] = []  # (sample, transform, input) indices
        for s_index in range(len(self.samples)):
            for t_index in range(len(self.transforms)):
                count = len(self._inputs(s_index, t_index).images)
                self.items += [(s_index, t_index, i) for i in range(count)]

    @functools.lru_cache(maxsize=2)  # noqa: B019 - tiles of one image are read in a row
    def _inputs(self, s_index: int, t_index: int) -> Inputs:
        image = read_image(self.samples[s_index].path)
        transform = self.transforms[t_index]
        if transform is not None:  # its random draws are a function of (image, transform)
            image = transform(image, s_index * 1009 + t_index)
        return self.geometry.inputs(image, self.preprocess)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s_index, t_index, i = self.items[index]
        inputs = self._inputs(s_index, t_index)
        return {"image": inputs.images[i], "valid": inputs.valid[i]}

    def check(self) -> None:
        """Every image was decoded when the items were listed."""


def training_dataset(samples: Sequence[Sample], preprocess: Preprocess, geometry: Geometry,
                     transforms: Sequence[ImageTransform | None] = (None,)) -> Dataset:
    """The training set: the paper's ``ImageDataset`` unless a geometry or augmentation asks
    for more (so the default recipe stays bit for bit what it was)."""
    if geometry.is_paper and list(transforms) == [None]:
        return ImageDataset(samples, preprocess)
    return GeometryDataset(samples, preprocess, geometry, transforms)


def masked_distillation_loss(teacher: list[torch.Tensor], student: list[torch.Tensor],
                             valid: torch.Tensor) -> torch.Tensor:
    """The reference loss (1 - cos of whole flattened maps) over valid positions only: each
    layer's features are zeroed where the valid mask, pooled to that layer, is not full."""
    loss = teacher[0].new_zeros((), dtype=torch.float32)
    for t, s in zip(teacher, student, strict=True):
        keep = (F.adaptive_avg_pool2d(valid.float(), t.shape[-2:]) > 0.999).to(torch.float32)
        cosine = F.cosine_similarity((t.float() * keep).flatten(1), (s.float() * keep).flatten(1),
                                     dim=1)
        loss = loss + (1 - cosine).mean()
    return loss
