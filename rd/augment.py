"""In-distribution augmentation of the normal training images (supplement, Appendix D).

``--augment`` takes ``none`` (the paper), ``auto``, or a comma-separated list of the transforms
below. Every training image gets one augmented copy, made by one of the kept transforms drawn
at random (the draws seeded by the image, so a run is reproducible): the training set doubles,
whatever the number of transforms, and the copies join it before the teacher's features are
cached.

``auto`` keeps only the transforms whose augmented normals stay inside the normal distribution
as the teacher sees it: for each normal image, the distance of its augmented copy's teacher
features to the nearest *other* un-augmented normal, against the distance of that normal itself
to its nearest other normal (the spread among normals). A transform is kept when the median
ratio is at most ``AUTO_RATIO``. Every candidate's ratio and verdict is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

from rd.data.images import read_image
from rd.data.mvtec import Sample
from rd.data.transforms import Preprocess
from rd.geometry import Geometry, ImageTransform
from rd.teacher import Teacher

AUTO_RATIO = 1.15  # kept when augmented normals lie at most this much farther than normals do


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _hflip(image: Image.Image, seed: int) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _vflip(image: Image.Image, seed: int) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def _rot90(image: Image.Image, seed: int) -> Image.Image:
    turn = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
            Image.Transpose.ROTATE_270)[_rng(seed).integers(3)]
    return image.transpose(turn)


def _edge_colour(image: Image.Image) -> tuple[int, ...]:
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def _shift(image: Image.Image, seed: int) -> Image.Image:
    """Translate by up to 3 % of each side, filling with the border's median colour."""
    dy, dx = _rng(seed).uniform(-0.03, 0.03, 2)
    offset = (round(dx * image.width), round(dy * image.height))
    return image.transform(image.size, Image.Transform.AFFINE,
                           (1, 0, -offset[0], 0, 1, -offset[1]), Image.Resampling.BILINEAR,
                           fillcolor=_edge_colour(image))


def _rotate(image: Image.Image, seed: int) -> Image.Image:
    """Rotate by up to 5 degrees about the centre."""
    angle = float(_rng(seed).uniform(-5, 5))
    return image.rotate(angle, Image.Resampling.BILINEAR, fillcolor=_edge_colour(image))


def _brightness(image: Image.Image, seed: int) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(float(_rng(seed).uniform(0.9, 1.1)))


def _contrast(image: Image.Image, seed: int) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(float(_rng(seed).uniform(0.9, 1.1)))


def _blur(image: Image.Image, seed: int) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(float(_rng(seed).uniform(0.4, 1.0))))


TRANSFORMS: Mapping[str, ImageTransform] = {
    "hflip": _hflip, "vflip": _vflip, "rot90": _rot90, "shift": _shift, "rotate": _rotate,
    "brightness": _brightness, "contrast": _contrast, "blur": _blur,
}
"""Geometric and photometric transforms by name: (PIL image, seed) -> PIL image."""


class OneOf:
    """Apply one of ``transforms``, chosen by the seed (an image's augmented copy)."""

    def __init__(self, transforms: Sequence[ImageTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Image.Image, seed: int) -> Image.Image:
        pick = int(_rng(seed + 7919).integers(len(self.transforms)))
        return self.transforms[pick](image, seed)


def parse_augment(value: str) -> list[str] | None:
    """``none`` -> [], ``auto`` -> None (choose), else the listed transform names (checked)."""
    value = value.strip()
    if value == "none":
        return []
    if value == "auto":
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRANSFORMS]
    if not names or unknown:
        raise ValueError(f"--augment takes none, auto or a comma-separated list of "
                         f"{', '.join(TRANSFORMS)}; got {value!r}")
    return list(dict.fromkeys(names))


@torch.no_grad()
def _descriptors(teacher: Teacher, images: Sequence[Image.Image], preprocess: Preprocess,
                 geometry: Geometry, device: torch.device) -> torch.Tensor:
    """One vector per image: each teacher layer pooled to a 4x4 grid, L2-normalised, joined
    (coarse layout kept, so a flipped or turned part is told apart)."""
    view = geometry if geometry.mode in ("squash", "letterbox") else Geometry("letterbox")
    batch = torch.cat([view.inputs(image, preprocess).images for image in images])
    parts = []
    for start in range(0, len(batch), 8):
        features = teacher(batch[start:start + 8].to(device))
        parts.append(torch.cat([F.normalize(F.adaptive_avg_pool2d(f.float(), 4).flatten(1),
                                            dim=1) for f in features], dim=1))
    return torch.cat(parts).cpu()


def _nearest_other(queries: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Distance from query i to the nearest normal other than normal i."""
    distances = torch.cdist(queries, normals)
    distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values


def select_transforms(teacher: Teacher, samples: Sequence[Sample], preprocess: Preprocess,
                      geometry: Geometry, candidates: Mapping[str, ImageTransform],
                      device: torch.device | None = None, ratio: float = AUTO_RATIO
                      ) -> dict[str, Any]:
    """Judge each candidate transform on the normal ``samples`` (see the module's notes).

    Returns {"kept": [...], "ratio_limit": r, "candidates": {name: {"ratio", "kept", "why"}}}.
    """
    if len(samples) < 3:
        raise ValueError("--augment auto needs at least 3 normal training images")
    device = device or next(teacher.parameters()).device
    images = [read_image(s.path) for s in samples]
    normals = _descriptors(teacher, images, preprocess, geometry, device)
    spread = float(_nearest_other(normals, normals).median())
    report: dict[str, Any] = {}
    for name, transform in candidates.items():
        augmented = [transform(image, index * 1009 + 1) for index, image in enumerate(images)]
        distance = float(_nearest_other(
            _descriptors(teacher, augmented, preprocess, geometry, device), normals).median())
        value = distance / max(spread, 1e-12)
        kept = value <= ratio
        report[name] = {"ratio": round(value, 4), "kept": kept,
                        "why": (f"augmented normals lie {value:.2f}x as far from other normals "
                                f"as normals do ({'<=' if kept else '>'} {ratio})")}
    return {"kept": [name for name, entry in report.items() if entry["kept"]],
            "ratio_limit": ratio, "candidates": report}


def judge_turns(teacher: Teacher, samples: Sequence[Sample], preprocess: Preprocess,
                geometry: Geometry, device: torch.device | None = None,
                augmented: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Whether quarter-turned normal images stay normal as the teacher sees them (the test of
    ``auto`` for the ``rot90`` transform): what ``--turn-average auto`` decides by, since
    averaging the maps of turned images helps only where turned parts are ordinary ones.
    ``augmented``: what ``augmentation`` recorded, whose ``auto`` has measured it already.
    Returns {"kept", "ratio", "why"}."""
    verdict = (augmented or {}).get("candidates", {}).get("rot90")
    if verdict is None:
        verdict = select_transforms(teacher, samples, preprocess, geometry,
                                    {"rot90": TRANSFORMS["rot90"]}, device)["candidates"]["rot90"]
    action = "averaged over" if verdict["kept"] else "not averaged over"
    return {**verdict, "why": f"quarter-turned normal images lie {verdict['ratio']:.2f}x as far "
            f"from other normals as normals do ({'<=' if verdict['kept'] else '>'} "
            f"{AUTO_RATIO}): maps {action} quarter turns"}


def augmentation(teacher: Teacher, samples: Sequence[Sample], preprocess: Preprocess,
                 geometry: Geometry, value: str, device: torch.device | None = None,
                 log: Callable[[str], None] | None = None
                 ) -> tuple[list[ImageTransform | None], dict[str, Any]]:
    """The training transforms for ``--augment value``: [None] (the originals) and, when any
    transform is kept, one random kept transform per image; and what was chosen and why (for
    the checkpoint's metadata)."""
    names = parse_augment(value)
    if names == []:
        return [None], {"mode": "none"}
    if names is None:
        info = {"mode": "auto", **select_transforms(teacher, samples, preprocess, geometry,
                                                    TRANSFORMS, device)}
        names = info["kept"]
    else:
        info = {"mode": "list", "kept": names}
    if log:
        log(f"augment: kept {', '.join(names) or 'nothing'}" + "".join(
            f"; {name}: {entry['why']}" for name, entry in info.get("candidates", {}).items()))
    if not names:
        return [None], info
    return [None, OneOf([TRANSFORMS[name] for name in names])], info
