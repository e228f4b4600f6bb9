"""ReverseDistillation = frozen teacher + trainable OCBE bottleneck + student decoder."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rd.alignment import AlignedStatistics
from rd.bottleneck import OCBE
from rd.decoder import Decoder
from rd.maps import fuse, gaussian_blur, image_scores, layer_maps
from rd.position import PositionStatistics
from rd.teacher import Teacher, build_network, build_teacher, count_parameters

# Blocks of the one-class embedding and of the decoder stages (stride 16, 8, 4), as in the
# reference code (its ResNet-50 decoder is built from layers [3, 4, 6]: the parameter counts of
# REFERENCE.md §1 confirm it).
STUDENT_BLOCKS = {"basic": (2, (2, 2, 2)), "bottleneck": (3, (3, 4, 6))}
# what the model holds besides the student, fitted or rebuilt rather than trained
FITTED_PREFIXES = ("teacher.", "position.", "aligned.")


@dataclass
class Prediction:
    """What one forward pass yields for a batch, all at the input resolution."""

    layer_maps: torch.Tensor  # (N, 3, H, W) unsmoothed 1 - cos per layer
    fused: torch.Tensor  # (N, H, W) fused and smoothed (+ rd.position's, rd.alignment's maps)
    scores: torch.Tensor  # (N,) max of RD's smoothed fused map (rd.position: or more)


class ReverseDistillation(nn.Module):
    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        spec = teacher.spec
        embed_blocks, decoder_blocks = STUDENT_BLOCKS[spec.block]
        self.backbone = spec.name
        self.teacher = teacher
        self.bottleneck = OCBE(spec.channels, spec.block, embed_blocks, spec.width_factor)
        self.decoder = Decoder(spec.channels, spec.block, decoder_blocks, spec.width_factor,
                               final_relu=spec.decoder_final_relu)
        # --position-stats (rd.position): fitted on the normal images, None for the paper
        self.position: PositionStatistics | None = None
        # --aligned-stats (rd.alignment): fitted on the normal images, None for the paper
        self.aligned: AlignedStatistics | None = None
        # --turn-average: RD's maps averaged over each image's four quarter turns (False: the
        # paper's one pass)
        self.turn_average = False

    def student(self, teacher_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rebuild the teacher's features from their one-class embedding."""
        return self.decoder(self.bottleneck(teacher_features))

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = self.teacher(images)
        return features, self.student(features)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable part only: the teacher is rebuilt from its own weights."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(FITTED_PREFIXES)}

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the student, the teacher too once adapted (rd.adapt),
        since an adapted teacher cannot be rebuilt from its ImageNet weights, and the position
        and aligned statistics when fitted (rd.position, rd.alignment)."""
        rebuilt = ("teacher.",) if self.teacher.adapted == "none" else ()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(rebuilt)}

    def rd_maps(self, images: torch.Tensor, amp: torch.dtype | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's features of a square batch and RD's per-layer ``1 - cos`` maps.

        With ``turn_average`` each image is also scored turned by 90, 180 and 270 degrees and
        its maps are the mean of the four, turned back: where quarter-turned normal images are
        still normal (parts that lie at any angle), a patch the student rebuilds badly in only
        one orientation is noise, not a defect. The features are the unturned images' (what
        the position statistics model).
        """
        inputs = (torch.cat([images.rot90(k, (-2, -1)) for k in range(4)])
                  if self.turn_average else images)
        # without ``amp``, a caller's own autocast (Detector.predict_native) still applies
        with (torch.autocast(images.device.type, dtype=amp) if amp is not None
              else nullcontext()):
            features, rebuilt = self(inputs)
        maps = layer_maps(features, rebuilt, images.shape[-2:])
        if not self.turn_average:
            return features, maps
        turns = maps.unflatten(0, (4, -1))  # (turn, N, ...): no batch size fixed in a trace
        turned_back = sum(turns[k].rot90(-k, (-2, -1)) for k in range(4))
        return [f.unflatten(0, (4, -1))[0] for f in features], turned_back / 4

    @torch.no_grad()
    def predict(self, images: torch.Tensor, fusion: str = "sum",
                amp: torch.dtype | None = None) -> Prediction:
        """Maps and scores of a preprocessed batch.

        ``amp`` (torch.bfloat16 or torch.float16) runs teacher and student under autocast, which
        is where the time goes on a GPU; the cosine, maps, blur and score stay float32, since
        low-precision cosines of nearly equal features would round the anomaly signal away.
        """
        features, maps = self.rd_maps(images, amp)
        smoothed = gaussian_blur(fuse(maps, fusion))
        scores = image_scores(smoothed)  # RD's own, unless --position-score (rd.position)
        if self.position is not None:
            position_map, position_scores = self.position(features, tuple(images.shape[-2:]))
            smoothed = smoothed + position_map
            if position_scores is not None:
                scores = torch.maximum(scores, position_scores)
        if self.aligned is not None:  # the image score stays RD's (rd.alignment)
            smoothed = smoothed + self.aligned(images)
        return Prediction(maps, smoothed, scores)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use --device {choices}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported: use --device {choices}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no GPU is available: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{device} does not exist: this machine has "
                         f"{torch.cuda.device_count()} GPU(s) (cuda:0..)")
    return device


def build_model(backbone: str = "efficientnet_lite0", pretrained: bool = True,
                teacher_weights: str | Path | None = None) -> ReverseDistillation:
    """Build teacher + student; ``pretrained`` loads the teacher's ImageNet weights."""
    return ReverseDistillation(build_teacher(backbone, pretrained, teacher_weights))


def parameter_counts(backbone: str) -> dict[str, int]:
    """Parameter counts as REFERENCE.md tabulates them; builds random weights, needs no file."""
    model = ReverseDistillation(build_teacher(backbone, pretrained=False))
    return {
        "teacher_network": count_parameters(build_network(backbone)),
        "teacher_used": count_parameters(model.teacher),
        "bottleneck": count_parameters(model.bottleneck),
        "decoder": count_parameters(model.decoder),
    }
