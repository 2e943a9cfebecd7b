"""YOLOv8's building blocks (``ultralytics/nn/modules/block.py``): C2f with its bottleneck, and SPPF.
Each is built from ``common.BaseConv``, which is Ultralytics' ``Conv`` (and YOLOX's).

Split from ``yolov8.py`` so that the network there reads as the yaml and these as its units;
``yolov8.py`` documents the deliberate choices (why C2f slices rather than chunks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import BaseConv


class Bottleneck(nn.Module):
    """C2f's bottleneck: two 3x3 Convs (expansion 1.0), a residual add when ``shortcut``."""

    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = BaseConv(channels, channels, 3)
        self.cv2 = BaseConv(channels, channels, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convolutions: ``cv1``'s output is cut in two halves, the second
    runs through ``n`` bottlenecks, both halves and every bottleneck output go into ``cv2``
    (a slice rather than ``chunk``: see ``yolov8.py``'s docstring)."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = int(cout * 0.5)
        self.cv1 = BaseConv(cin, 2 * self.c, 1)
        self.cv2 = BaseConv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        kept = self.m[0].cv1.conv.weight.shape[1]  # the second half's width, pruned or not
        parts = [y]  # = cat(first half, second half), as one tensor for the pruning graph
        h = y[:, y.shape[1] - kept :]  # the second half
        for block in self.m:
            h = block(h)
            parts.append(h)
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Fast spatial pyramid pooling: one 5x5 max-pool three times in a row (= pools 5, 9, 13)."""

    def __init__(self, cin: int, cout: int, k: int = 5) -> None:
        super().__init__()
        hidden = cin // 2
        self.cv1 = BaseConv(cin, hidden, 1)
        self.cv2 = BaseConv(4 * hidden, cout, 1)
        self.m = nn.MaxPool2d(k, stride=1, padding=k // 2)

    def forward(self, x: Tensor) -> Tensor:
        maps = [self.cv1(x)]
        for _ in range(3):
            maps.append(self.m(maps[-1]))
        return self.cv2(torch.cat(maps, dim=1))
