"""The torch Dataset over :class:`~rd.data.mvtec.Sample` records (in a module of its own so
that listing images and reading them, as the studio's first page does, does not import torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rd.data.images import DataError, read_mask, read_pixels
from rd.data.mvtec import Sample
from rd.data.transforms import Preprocess, mask_to_tensor


class ImageDataset(Dataset):
    """Samples read and preprocessed for a model; masks come at the same size as the image."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess | None = None) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess or Preprocess()

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode the image (RGB pixels) and its mask, checking the two match in size."""
        image = read_pixels(sample.path)
        if sample.mask_path is None:
            return image, None
        mask = read_mask(sample.mask_path)
        image_hw = image.shape[:2]
        if mask.shape != image_hw:
            raise DataError(
                f"{sample.mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} (h x w) but image "
                f"{sample.path} is {image_hw[0]}x{image_hw[1]}; masks must match their image"
            )
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image, mask = self._read(sample)
        size = self.preprocess.size
        return {
            "image": self.preprocess(image),
            "label": sample.label,
            "mask": torch.zeros(1, size, size) if mask is None else mask_to_tensor(mask, size),
            "path": str(sample.path),
            "defect": sample.defect,
        }

    def pixels_and_mask(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as uint8 (S, S, 3) pixels and a bool (S, S) mask: for the threads
        that normalise their own images (``Preprocess.normalize`` of these pixels is the
        ``image`` of ``__getitem__``, bit for bit)."""
        image, mask = self._read(self.samples[index])
        size = self.preprocess.size
        binary = (np.zeros((size, size), dtype=bool) if mask is None
                  else mask_to_tensor(mask, size)[0].numpy() > 0.5)
        return self.preprocess.pixels(image).numpy(), binary

    def usable(self) -> tuple[list[Sample], list[str]]:
        """The samples whose image and mask decode, and one message per sample that does not."""
        good, problems = [], []
        for sample in self.samples:
            try:
                self._read(sample)
                good.append(sample)
            except DataError as exc:
                problems.append(str(exc))
        return good, problems

    def check(self, show: int = 5) -> None:
        """Decode every image and mask once so a bad file stops a run at start, not mid-epoch."""
        _, problems = self.usable()
        if problems:
            more = f"; and {len(problems) - show} more" if len(problems) > show else ""
            raise DataError(
                f"{len(problems)} of {len(self.samples)} samples cannot be used: "
                + "; ".join(problems[:show])
                + more
            )
