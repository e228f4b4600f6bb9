"""The one preprocessing path shared by training, evaluation and inference.

Resizing is PIL bilinear on the 8-bit RGB image, exactly what the reference's torchvision
`Resize` does on PIL input, so scores stay comparable with the paper's setup. No augmentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rd.data.images import ImageSource, read_image, read_pixels, resize_mask
from rd.data.normalization import IMAGENET_MEAN, IMAGENET_STD

_FIELDS = ("size", "mean", "std")


@dataclass(frozen=True)
class Preprocess:
    """Resize to size×size and normalise; stored with checkpoints so inference matches training."""

    size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"Preprocess size must be a positive integer, got {self.size!r}")
        for field in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, field))
            if len(values) != 3:
                raise ValueError(f"Preprocess {field} needs 3 values (R, G, B), got {values}")
            object.__setattr__(self, field, values)
        if min(self.std) <= 0:
            raise ValueError(f"Preprocess std values must be positive, got {self.std}")

    def __call__(self, image: ImageSource) -> torch.Tensor:
        """Return a float32 (3, size, size) tensor from anything read_image accepts."""
        return self.normalize(self.pixels(image))

    def pixels(self, image: ImageSource) -> torch.Tensor:
        """The resized 8-bit RGB pixels, (size, size, 3) uint8: a quarter of the float tensor's
        bytes, so a decoding worker hands batches over cheaply (``normalize`` finishes them).

        A file is decoded by ``read_pixels``; RGB pixels already at the size are used as they
        are (resizing to the same size changes nothing).
        """
        if isinstance(image, str | Path):
            image = read_pixels(image)
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 \
                and image.shape == (self.size, self.size, 3):
            return torch.from_numpy(np.require(image, requirements=("C", "W")))
        rgb = read_image(image).resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())

    def normalize(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """uint8 (..., size, size, 3) pixels -> float32 (..., 3, size, size), normalised.

        A numpy array gives a numpy array, bit for bit the tensor's result: the threads that
        feed ONNX Runtime use it, since a torch op there would start a thread team per caller.
        """
        if isinstance(pixels, np.ndarray):
            array = np.ascontiguousarray(np.moveaxis(pixels, -1, -3), dtype=np.float32)
            array /= np.float32(255.0)
            array -= np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
            array /= np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
            return array
        tensor = pixels.movedim(-1, -3).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        return tensor.sub_(mean).div_(std)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly form for checkpoint metadata."""
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """Rebuild from to_dict() output; strict, so a foreign checkpoint fails loudly."""
        missing = [key for key in _FIELDS if key not in data]
        unknown = sorted(set(data) - set(_FIELDS))
        if missing or unknown:
            raise ValueError(
                f"preprocess metadata has missing keys {missing} and unknown keys {unknown}; "
                f"expected exactly {list(_FIELDS)} (was the checkpoint written by this package?)"
            )
        return cls(size=data["size"], mean=tuple(data["mean"]), std=tuple(data["std"]))


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) mask -> {0, 1} float (1, size, size) tensor: binarise > 0.5, nearest resize."""
    binary = resize_mask(np.asarray(mask) > 0.5, (size, size))
    return torch.from_numpy(binary).to(torch.float32).unsqueeze(0)
