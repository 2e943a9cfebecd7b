"""Shared fixtures: a toy detector small enough for exact checks, and quiet warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from detectors.base import Detector

warnings.filterwarnings("ignore", category=FutureWarning)


class ToyDetector(Detector):
    """conv(3->8) -> conv(8->16) -> two parallel 1x1 predictors; the predictors are fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size = 16
        self.strides = (1,)
        self.spec = {"name": "toy"}
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.cls = nn.Conv2d(16, 2, 1)
        self.box = nn.Conv2d(16, 4, 1)

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.cls(h), self.box(h)

    @property
    def neck(self) -> nn.Module:
        return self.conv2

    def prune_ignored(self) -> list[nn.Module]:
        return [self.cls, self.box]


@pytest.fixture
def toy() -> ToyDetector:
    torch.manual_seed(0)
    return ToyDetector().eval()
