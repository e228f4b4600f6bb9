"""``load(checkpoint)`` -> Detector: the one inference entry point for the CLI, app and tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rd.checkpoints import CheckpointMetadata, load_checkpoint
from rd.data import ImageSource, Preprocess

# the decision rule lives in rd.decision (no torch: pages showing stored scores start fast)
from rd.decision import ImageDetection as ImageDetection
from rd.decision import is_defective as is_defective
from rd.decision import verdict as verdict
from rd.errors import RDError
from rd.geometry import Geometry, NativeMaps, predict_native
from rd.model import Prediction, ReverseDistillation, resolve_device

# --amp choices: autocast dtypes for the teacher and student (the maps stay float32).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Most images one CPU forward pass takes: past a few 256 px images the activations overflow the
# caches and each image gets slower (on the project's CPU, chunks of 4 were 1.1-1.7x faster per
# image than 16; benchmarks/inference.py). GPUs take whole batches.
CPU_CHUNK = 4


@dataclass
class Detection:
    """Maps and scores of a batch, at the model's input resolution, as numpy arrays;
    ``detection[i]`` is image i's ImageDetection."""

    layer_maps: np.ndarray  # (N, 3, S, S): 1 - cos per teacher layer (strides 4, 8, 16)
    fused: np.ndarray  # (N, S, S): fused, Gaussian-smoothed anomaly map (rd.position adds to it)
    scores: np.ndarray  # (N,): image scores (max of RD's fused map)

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: int) -> ImageDetection:
        return ImageDetection(float(self.scores[index]), self.layer_maps[index],
                              self.fused[index])


class Detector:
    """A trained student with its teacher, preprocessing and metadata, ready to predict.

    Speed options, all off by default: ``amp`` ("bf16" or "fp16", CUDA only) autocasts teacher
    and student (maps within about 1e-2 of float32: docs/performance.md); ``channels_last``
    stores weights and inputs NHWC, which cuDNN's and oneDNN's fastest convolutions want (same
    maps within 1e-5); ``compile`` runs the whole predict graph through ``torch.compile`` (a
    one-off compilation of tens of seconds per batch shape, then fewer, fused kernels).
    """

    def __init__(self, model: ReverseDistillation, metadata: Mapping[str, Any],
                 device: str | torch.device | None = None, batch_size: int = 16, *,
                 amp: str | None = None, channels_last: bool = False,
                 compile: bool = False) -> None:
        self.device = resolve_device(device)
        if amp is not None and (amp not in AMP_DTYPES or self.device.type != "cuda"):
            raise ValueError(f"--amp takes one of {sorted(AMP_DTYPES)} and needs a CUDA device; "
                             f"got {amp!r} on {self.device}")
        self.amp = None if amp is None else AMP_DTYPES[amp]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.metadata = CheckpointMetadata.from_dict(metadata)  # a dict is checked here
        self.preprocess = Preprocess.from_dict(self.metadata.preprocess)
        self.fusion = self.metadata.fusion
        self.geometry = Geometry.from_metadata(metadata)  # squash (the paper) unless trained so
        self.batch_size = batch_size
        self._predict = self.model.predict
        if compile:  # static shapes (rd.scoring pads the last batch); CUDA graphs on a GPU
            graphs = self.device.type == "cuda"
            compiled = torch.compile(self.model.predict, dynamic=False,
                                     mode="reduce-overhead" if graphs else None)
            self._predict = _copying(compiled) if graphs else compiled

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

    def check_batch(self, batch: torch.Tensor) -> None:
        """Refuse anything but a preprocessed (N, 3, S, S) batch at this model's size."""
        expected = (3, self.image_size, self.image_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"expected a preprocessed batch of shape (N, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}), got {tuple(batch.shape)}")

    @torch.no_grad()
    def predict_tensor(self, batch: torch.Tensor) -> Prediction:
        """Maps of a preprocessed (N, 3, S, S) batch, as torch tensors on the device."""
        self.check_batch(batch)
        chunk_size = self.batch_size if self.device.type == "cuda" else min(self.batch_size,
                                                                              CPU_CHUNK)
        parts = [self._predict(chunk.to(self.device, memory_format=self.memory_format,
                                        non_blocking=True), self.fusion, self.amp)
                 for chunk in batch.split(chunk_size)]
        if len(parts) == 1:  # the usual case (one image, or one batch): no copy
            return _finite(parts[0])
        return _finite(Prediction(*(torch.cat(items) for items in zip(
            *((p.layer_maps, p.fused, p.scores) for p in parts), strict=True))))

    def predict(self, images: ImageSource | Sequence[ImageSource] | torch.Tensor) -> Detection:
        """Per-layer maps, fused map and scores for paths, PIL images, arrays or a batch.

        A tensor must already be preprocessed (see ``preprocess``): (N, 3, S, S).
        """
        if not isinstance(images, torch.Tensor) and not self.geometry.is_paper:
            return self._predict_native(images)
        batch = images if isinstance(images, torch.Tensor) else self.to_batch(images)
        result = self.predict_tensor(batch)
        return Detection(result.layer_maps.cpu().numpy(), result.fused.cpu().numpy(),
                         result.scores.cpu().numpy())

    def detect(self, image: ImageSource) -> ImageDetection:
        """One image's score and maps (``predict`` of a one-image batch)."""
        return self.predict([image])[0]

    def predict_native(self, image: ImageSource) -> NativeMaps:
        """Maps of one image at its original size, fitted to the model as it was trained
        (``squash`` upsamples the S×S maps; letterbox and tile: rd.geometry)."""
        with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16,
                            enabled=self.amp is not None):
            maps = predict_native(self.model, image, self.preprocess, self.geometry,
                                  self.fusion, CPU_CHUNK if self.device.type == "cpu"
                                  else self.batch_size, self.device)
        if not np.isfinite(maps.score):
            _finite(Prediction(maps.layer_maps[None], maps.fused[None],
                               torch.tensor([maps.score])))
        return maps

    def _predict_native(self, images: ImageSource | Sequence[ImageSource]) -> Detection:
        """letterbox / tile checkpoints: maps at the images' original size (one size a call)."""
        if isinstance(images, str | Path | Image.Image) or (
                isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        results = [self.predict_native(image) for image in images]
        shapes = {tuple(r.fused.shape) for r in results}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)}: predict them one "
                             "at a time (maps come back at each image's original size)")
        return Detection(torch.stack([r.layer_maps for r in results]).float().cpu().numpy(),
                         torch.stack([r.fused for r in results]).float().cpu().numpy(),
                         np.array([r.score for r in results], dtype=np.float32))


class DetectionError(RDError, ValueError):
    """The model produced maps that are no measurement (NaN or infinite values)."""


def _finite(prediction: Prediction) -> Prediction:
    """Refuse NaN or infinite maps (a NaN maximum propagates, so the scores tell)."""
    if not bool(torch.isfinite(prediction.scores).all()):
        raise DetectionError("the model's anomaly maps hold NaN or infinite values: its weights "
                             "are broken (e.g. trained with a too large --lr); retrain it")
    return prediction


def _copying(compiled: Any) -> Any:
    """A CUDA graph's outputs are overwritten by its next replay: hand out copies."""
    def predict(*args: Any) -> Prediction:
        out = compiled(*args)
        return Prediction(out.layer_maps.clone(), out.fused.clone(), out.scores.clone())
    return predict


def load(checkpoint: str | Path, device: str | torch.device | None = None,
         teacher_weights: str | Path | None = None, *, amp: str | None = None,
         channels_last: bool = False, compile: bool = False) -> Detector:
    """Load a checkpoint of this package into a Detector (CUDA when present by default)."""
    model, metadata = load_checkpoint(checkpoint, teacher_weights)
    return Detector(model, metadata, device, amp=amp, channels_last=channels_last,
                    compile=compile)
