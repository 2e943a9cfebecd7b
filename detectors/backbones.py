"""ResNet-18 (with a width multiplier) or ResNet-50, + FPN, built from torchvision's blocks (no downloads).

torchvision's ``resnet18`` fixes its widths at 64..512; a tiny detector that trains on a CPU in
minutes needs the same topology at a fraction of the width, so the stages are assembled here
from torchvision's own ``BasicBlock`` and ``FeaturePyramidNetwork``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, resnet50
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
    layers = [BasicBlock(inplanes, planes, stride, downsample, norm_layer=nn.BatchNorm2d)]
    layers += [BasicBlock(planes, planes, norm_layer=nn.BatchNorm2d) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) returning C3, C4, C5 (strides 8, 16, 32)."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        widths = [max(8, int(round(64 * width * m))) for m in (1, 2, 4, 8)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.layer1 = _stage(widths[0], widths[0], 2, 1)
        self.layer2 = _stage(widths[0], widths[1], 2, 2)
        self.layer3 = _stage(widths[1], widths[2], 2, 2)
        self.layer4 = _stage(widths[2], widths[3], 2, 2)
        self.out_channels_list = widths[1:]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016) returning C3, C4, C5: torchvision's, with trainable BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        net = resnet50(weights=None, norm_layer=nn.BatchNorm2d)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels_list = [512, 1024, 2048]

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.layer2(self.layer1(self.stem(x)))
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


def resnet_body(depth: int, width: float = 1.0) -> nn.Module:
    """The backbone body by depth: 18 (width-scalable, for the CPU sizes) or 50 (the papers')."""
    if depth == 18:
        return ResNet18(width)
    if depth == 50 and width == 1.0:
        return ResNet50()
    raise ValueError(f"no ResNet-{depth} at width {width}")


class ResNetFPN(nn.Module):
    """Backbone + FPN with P6/P7 (the RetinaNet/FCOS neck): five levels, strides 8..128."""

    strides = (8, 16, 32, 64, 128)

    def __init__(self, width: float = 1.0, fpn_channels: int = 256, depth: int = 18) -> None:
        super().__init__()
        self.body = resnet_body(depth, width)
        self.fpn = FeaturePyramidNetwork(
            self.body.out_channels_list,
            fpn_channels,
            extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
            norm_layer=None,
        )
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
