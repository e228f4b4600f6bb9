"""The one-class bottleneck embedding (OCBE): multi-scale feature fusion + one-class embedding.

It squeezes the teacher's three feature maps into one compact code at stride 32, from which the
student decoder must rebuild them. Layout (REFERENCE.md §1), with teacher channels (c1, c2, c3):

- fusion: ``f1 -> conv3x3/2 (c1->c2) -> BN -> ReLU -> conv3x3/2 (c2->c3) -> BN -> ReLU``,
  ``f2 -> conv3x3/2 (c2->c3) -> BN -> ReLU``, concatenated with ``f3`` into ``3*c3`` channels;
- embedding: one ResNet stage (first block stride 2 with a 1x1/2 conv + BN shortcut).

For the ResNets (c1, c2, c3) = (64, 128, 256)·e; the reference's unused ``conv4``/``bn4`` pair is
left out. For EfficientNet-Lite0 the same design is sized to (24, 40, 112): the embedding is two
BasicBlocks giving ``2*c3 = 224`` channels, exactly as ResNet18's gives 512 from 256.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

EXPANSION = {"basic": BasicBlock.expansion, "bottleneck": Bottleneck.expansion}


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def init_like_reference(module: nn.Module) -> None:
    """Kaiming-normal (fan_out) for convolutions, BN weight 1 and bias 0.

    Transposed convolutions keep PyTorch's default initialisation, as in the reference.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class OCBE(nn.Module):
    """Multi-scale fusion + one-class embedding; output at stride 32."""

    def __init__(self, channels: tuple[int, int, int], block: str, blocks: int,
                 width_factor: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(conv_bn_relu(c1, c2), conv_bn_relu(c2, c3))
        self.fuse2 = conv_bn_relu(c2, c3)
        self.embed = self._stage(block, 3 * c3, c3 * 2 // EXPANSION[block], blocks, width_factor)
        init_like_reference(self)

    @staticmethod
    def _stage(block: str, in_channels: int, planes: int, blocks: int,
               width_factor: int) -> nn.Sequential:
        block_class = BasicBlock if block == "basic" else Bottleneck
        out_channels = planes * block_class.expansion
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        kwargs = {"base_width": 64 * width_factor}
        layers = [block_class(in_channels, planes, 2, shortcut, **kwargs)]
        layers += [block_class(out_channels, planes, **kwargs) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    @property
    def out_channels(self) -> int:
        last = self.embed[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = features
        fused = torch.cat([self.fuse1(f1), self.fuse2(f2), f3], dim=1)
        return self.embed(fused).contiguous()
