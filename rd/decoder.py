"""The student decoder: a ResNet run backwards (supplementary Table 1).

Each of its three stages starts with a block whose spatial convolution is a 2x2 stride-2
transposed convolution, with a matching transposed-convolution + BN shortcut; the other blocks
are plain residual blocks. It returns the three rebuilt maps ordered to pair with the teacher's
stride-4, stride-8 and stride-16 features.
"""

from __future__ import annotations

import torch
from torch import nn

from rd.bottleneck import EXPANSION, init_like_reference


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


def deconv2x2(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)


class DecoderBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, upsample: bool, width: int = 64,
                 final_relu: bool = True) -> None:
        super().__init__()
        del width  # basic blocks have no inner width
        self.conv1 = deconv2x2(in_channels, planes) if upsample else conv3x3(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, planes, upsample)
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + (self.shortcut(x) if self.shortcut else x)
        return self.relu(out) if self.final_relu else out


class DecoderBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, upsample: bool, width: int = 64,
                 final_relu: bool = True) -> None:
        super().__init__()
        inner = planes * width // 64
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = deconv2x2(inner, inner) if upsample else conv3x3(inner, inner)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, upsample)
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + (self.shortcut(x) if self.shortcut else x)
        return self.relu(out) if self.final_relu else out


def _shortcut(in_channels: int, out_channels: int, upsample: bool) -> nn.Sequential | None:
    if not upsample:
        return None
    return nn.Sequential(deconv2x2(in_channels, out_channels), nn.BatchNorm2d(out_channels))


class Decoder(nn.Module):
    """Three upsampling stages from the bottleneck code back to the teacher's three scales.

    ``final_relu=False`` drops the last ReLU of each stage, for teachers whose features are
    partly negative (EfficientNet's projection outputs): a ReLU could not rebuild them.
    """

    def __init__(self, channels: tuple[int, int, int], block: str,
                 blocks: tuple[int, int, int], width_factor: int = 1,
                 final_relu: bool = True) -> None:
        super().__init__()
        block_class = DecoderBasicBlock if block == "basic" else DecoderBottleneck
        expansion = EXPANSION[block]
        in_channels = 2 * channels[2]
        stages = []
        for out_channels, count in zip(reversed(channels), blocks, strict=True):
            planes = out_channels // expansion
            layers = []
            for index in range(count):
                layers.append(block_class(
                    in_channels if index == 0 else out_channels, planes, upsample=index == 0,
                    width=64 * width_factor, final_relu=final_relu or index < count - 1))
            in_channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.stage16, self.stage8, self.stage4 = stages
        init_like_reference(self)

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        d16 = self.stage16(code)
        d8 = self.stage8(d16)
        return [self.stage4(d8), d8, d16]
