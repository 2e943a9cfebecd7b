"""YOLOX's building blocks (``yolox/models/network_blocks.py`` of Megvii-BaseDetection/YOLOX): the
depthwise pair of YOLOX-Nano, the bottleneck, the CSP layer, SPP and the Focus stem. Each is built
from ``common.BaseConv`` (Conv-BN-SiLU, which YOLOv8 shares).

Split from ``yolox.py`` so that the network there reads as the paper's figure and these as its
units; ``yolox.py`` documents the deliberate choices.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import BaseConv


class DWConv(nn.Module):
    """Depthwise ``ksize`` conv then pointwise 1x1 conv, both Conv-BN-SiLU (YOLOX-Nano)."""

    def __init__(self, cin: int, cout: int, ksize: int, stride: int = 1) -> None:
        super().__init__()
        self.dconv = BaseConv(cin, cin, ksize, stride, groups=cin)
        self.pconv = BaseConv(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pconv(self.dconv(x))


def conv_kind(depthwise: bool) -> type[nn.Module]:
    return DWConv if depthwise else BaseConv


class Bottleneck(nn.Module):
    """1x1 then 3x3, with a residual add when shapes allow and ``shortcut`` is asked for."""

    def __init__(
        self, cin: int, cout: int, shortcut: bool = True, expansion: float = 0.5, depthwise: bool = False
    ) -> None:
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = BaseConv(cin, hidden, 1)
        self.conv2 = conv_kind(depthwise)(hidden, cout, 3)
        self.use_add = shortcut and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nn.Module):
    """Cross Stage Partial layer (YOLOv5's C3): half the channels go through ``n`` bottlenecks,
    half bypass them; a 1x1 conv fuses the concatenation."""

    def __init__(
        self, cin: int, cout: int, n: int = 1, shortcut: bool = True, depthwise: bool = False
    ) -> None:
        super().__init__()
        hidden = int(cout * 0.5)
        self.conv1 = BaseConv(cin, hidden, 1)
        self.conv2 = BaseConv(cin, hidden, 1)
        self.conv3 = BaseConv(2 * hidden, cout, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, hidden, shortcut, 1.0, depthwise) for _ in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(torch.cat([self.m(self.conv1(x)), self.conv2(x)], dim=1))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling (YOLOv3-SPP): stride-1 max-pools of several sizes, concatenated."""

    def __init__(self, cin: int, cout: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = cin // 2
        self.conv1 = BaseConv(cin, hidden, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes])
        self.conv2 = BaseConv(hidden * (len(kernel_sizes) + 1), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x, *(pool(x) for pool in self.m)], dim=1))


class Focus(nn.Module):
    """Space-to-depth: the four pixel phases of each 2x2 cell become channels, then a conv."""

    def __init__(self, cin: int, cout: int, ksize: int = 3) -> None:
        super().__init__()
        self.conv = BaseConv(4 * cin, cout, ksize)

    def forward(self, x: Tensor) -> Tensor:
        top_left, bot_left = x[..., ::2, ::2], x[..., 1::2, ::2]
        top_right, bot_right = x[..., ::2, 1::2], x[..., 1::2, 1::2]
        return self.conv(torch.cat([top_left, bot_left, top_right, bot_right], dim=1))
