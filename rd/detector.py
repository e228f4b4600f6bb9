"""``load(checkpoint)`` -> Detector: the one inference entry point for the CLI, app and tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rd.checkpoints import load_checkpoint
from rd.data import ImageSource, Preprocess
from rd.model import Prediction, ReverseDistillation, resolve_device


@dataclass
class Detection:
    """Maps and scores of a batch, at the model's input resolution, as numpy arrays."""

    layer_maps: np.ndarray  # (N, 3, S, S): 1 - cos per teacher layer (strides 4, 8, 16)
    fused: np.ndarray  # (N, S, S): fused, Gaussian-smoothed anomaly map
    scores: np.ndarray  # (N,): image scores (max of the fused map)


class Detector:
    """A trained student with its teacher, preprocessing and metadata, ready to predict."""

    def __init__(self, model: ReverseDistillation, metadata: dict[str, Any],
                 device: str | torch.device | None = None, batch_size: int = 16) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata
        self.preprocess = Preprocess.from_dict(metadata["preprocess"])
        self.fusion = metadata.get("fusion", "sum")
        self.batch_size = batch_size

    @property
    def backbone(self) -> str:
        return self.model.backbone

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    def to_batch(self, images: ImageSource | Sequence[ImageSource]) -> torch.Tensor:
        """Read and preprocess one image or a list of them into an (N, 3, S, S) tensor."""
        if isinstance(images, str | Path | Image.Image) or (
                isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        return torch.stack([self.preprocess(image) for image in images])

    @torch.no_grad()
    def predict_tensor(self, batch: torch.Tensor) -> Prediction:
        """Maps of a preprocessed (N, 3, S, S) batch, as torch tensors on the device."""
        expected = (3, self.image_size, self.image_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"expected a preprocessed batch of shape (N, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}), got {tuple(batch.shape)}")
        parts = [self.model.predict(chunk.to(self.device), self.fusion)
                 for chunk in batch.split(self.batch_size)]
        return Prediction(*(torch.cat(items) for items in zip(
            *((p.layer_maps, p.fused, p.scores) for p in parts), strict=True)))

    def predict(self, images: ImageSource | Sequence[ImageSource] | torch.Tensor) -> Detection:
        """Per-layer maps, fused map and scores for paths, PIL images, arrays or a batch.

        A tensor must already be preprocessed (see ``preprocess``): (N, 3, S, S).
        """
        batch = images if isinstance(images, torch.Tensor) else self.to_batch(images)
        result = self.predict_tensor(batch)
        return Detection(result.layer_maps.cpu().numpy(), result.fused.cpu().numpy(),
                         result.scores.cpu().numpy())


def load(checkpoint: str | Path, device: str | torch.device | None = None,
         teacher_weights: str | Path | None = None) -> Detector:
    """Load a checkpoint of this package into a Detector (CUDA when present by default)."""
    model, metadata = load_checkpoint(checkpoint, teacher_weights)
    return Detector(model, metadata, device)
