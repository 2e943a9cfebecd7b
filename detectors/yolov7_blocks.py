"""YOLOv7's building blocks (``models/common.py`` of WongKinYiu/yolov7): Conv, RepConv, ELAN,
MP, SPPCSPC, the tiny SPP and YOLOR's implicit layers; each Conv-like block can ``fuse()`` itself
into the deploy form (BatchNorm folded, RepConv's branches summed into one 3x3 conv).

Split from ``yolov7.py`` so that the network reads as the yaml and the blocks as the paper's
figures; ``yolov7.py`` documents the deliberate choices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .common import BN_EPS, BN_MOMENTUM


def _act(size: str) -> nn.Module:
    return nn.LeakyReLU(0.1) if size == "tiny" else nn.SiLU()


def _fold_bn(weight: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The kernel and bias of ``bn(conv(x))`` in eval mode for a bias-free conv of ``weight``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


def _conv_from(weight: Tensor, bias: Tensor, stride: Any, padding: Any) -> nn.Conv2d:
    """A conv with bias holding ``weight`` and ``bias`` (on their device, in their dtype)."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride, padding).to(weight)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    return conv


# -- building blocks -----------------------------------------------------------------------------


class Conv(nn.Module):
    """Conv (same padding, no bias) -> BatchNorm -> activation: yolov7's ``Conv``."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, size: str = "base") -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = _act(size)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm into the conv (deploy form; eval-mode outputs unchanged)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            weight, bias = _fold_bn(self.conv.weight, self.bn)
            self.conv = _conv_from(weight, bias, self.conv.stride, self.conv.padding)
            self.bn = nn.Identity()


class RepConv(nn.Module):
    """RepVGG-style conv (yolov7's ``RepConv``): ``act(BN(3x3 x) + BN(1x1 x) [+ BN(x)])`` while
    training; ``fuse`` folds the branches into one 3x3 conv with bias (identical in eval mode)."""

    def __init__(self, cin: int, cout: int, s: int = 1, size: str = "base") -> None:
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)  # noqa: E731
        self.rbr_identity = bn(cin) if cin == cout and s == 1 else None
        self.rbr_dense = nn.Sequential(nn.Conv2d(cin, cout, 3, s, 1, bias=False), bn(cout))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(cin, cout, 1, s, 0, bias=False), bn(cout))
        self.rbr_reparam: nn.Conv2d | None = None
        self.act = _act(size)

    def forward(self, x: Tensor) -> Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.rbr_reparam(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        return self.act(y + self.rbr_identity(x) if self.rbr_identity is not None else y)

    @torch.no_grad()
    def fuse(self) -> None:
        """One 3x3 conv: the 1x1 kernel padded to 3x3 at the centre, the identity a centre 1."""
        weight, bias = _fold_bn(self.rbr_dense[0].weight, self.rbr_dense[1])
        w1, b1 = _fold_bn(self.rbr_1x1[0].weight, self.rbr_1x1[1])
        weight, bias = weight + nn.functional.pad(w1, [1, 1, 1, 1]), bias + b1
        if self.rbr_identity is not None:
            eye = torch.zeros_like(weight)
            eye[torch.arange(len(eye)), torch.arange(len(eye)), 1, 1] = 1
            w_id, b_id = _fold_bn(eye, self.rbr_identity)
            weight, bias = weight + w_id, bias + b_id
        self.rbr_reparam = _conv_from(weight, bias, self.rbr_dense[0].stride, 1)
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None  # type: ignore[assignment]


class ELAN(nn.Module):
    """Efficient layer aggregation: 1x1 branches ``cv1``, ``cv2``; ``n`` 3x3 convs chained on
    ``cv2``; the outputs at ``taps`` (1-based, of the chain) and both branches concatenated in
    the yaml's order (newest first: ``[-1, -3, -5, -6]`` / ``[-1 .. -6]``) and fused by ``cv_out``."""

    def __init__(
        self, cin: int, cout: int, c: int, c_mid: int, n: int, taps: tuple[int, ...], size: str
    ) -> None:
        super().__init__()
        self.cv1 = Conv(cin, c, 1, size=size)
        self.cv2 = Conv(cin, c, 1, size=size)
        self.m = nn.ModuleList([Conv(c if i == 0 else c_mid, c_mid, 3, size=size) for i in range(n)])
        self.taps = taps
        self.cv_out = Conv(2 * c + len(taps) * c_mid, cout, 1, size=size)

    def forward(self, x: Tensor) -> Tensor:
        outs = [self.cv1(x), self.cv2(x)]
        y = outs[1]
        for i, conv in enumerate(self.m, start=1):
            y = conv(y)
            if i in self.taps:
                outs.append(y)
        return self.cv_out(torch.cat(outs[::-1], dim=1))


class MPDown(nn.Module):
    """yolov7's MP transition: ``cat([3x3 s2 (1x1 x), 1x1 (maxpool2 x)])`` (yaml order)."""

    def __init__(self, cin: int, c: int, size: str = "base") -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2)
        self.cv_pool = Conv(cin, c, 1, size=size)
        self.cv1 = Conv(cin, c, 1, size=size)
        self.cv2 = Conv(c, c, 3, 2, size=size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.cv2(self.cv1(x)), self.cv_pool(self.pool(x))], dim=1)


class SPPCSPC(nn.Module):
    """SPP in a CSP split (base): pools 5/9/13 on ``cv4(cv3(cv1 x))``, beside the 1x1 ``cv2``."""

    def __init__(self, cin: int, cout: int, size: str = "base", k: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        c = cout  # yolov7: int(2 * c2 * 0.5)
        self.cv1, self.cv2 = Conv(cin, c, 1, size=size), Conv(cin, c, 1, size=size)
        self.cv3, self.cv4 = Conv(c, c, 3, size=size), Conv(c, c, 1, size=size)
        self.m = nn.ModuleList([nn.MaxPool2d(x, 1, x // 2) for x in k])
        self.cv5, self.cv6 = Conv(4 * c, c, 1, size=size), Conv(c, c, 3, size=size)
        self.cv7 = Conv(2 * c, cout, 1, size=size)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1, *(m(x1) for m in self.m)], dim=1)))
        return self.cv7(torch.cat([y1, self.cv2(x)], dim=1))


class SPPTiny(nn.Module):
    """yolov7-tiny's layers 29-37: ``cv2`` -> SP 5/9/13 -> ``cv3``, beside ``cv1``, fused by ``cv4``."""

    def __init__(self, cin: int, cout: int, size: str = "tiny") -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(cin, cout, 1, size=size), Conv(cin, cout, 1, size=size)
        self.m = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in (5, 9, 13)])
        self.cv3, self.cv4 = Conv(4 * cout, cout, 1, size=size), Conv(2 * cout, cout, 1, size=size)

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(x)
        y = self.cv3(torch.cat([*(m(y) for m in reversed(self.m)), y], dim=1))
        return self.cv4(torch.cat([y, self.cv1(x)], dim=1))


# -- backbone, neck, head ------------------------------------------------------------------------


class ImplicitA(nn.Module):
    """A learnable per-channel bias added to the predictor's input (YOLOR's implicit knowledge)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.implicit = nn.Parameter(torch.empty(1, channels, 1, 1).normal_(0.0, 0.02))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.implicit

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # a pruned checkpoint stores a narrower bias: the layer-width record (checkpoints.py) only
        # covers convs and norms, so this layer takes the stored width itself
        stored = state_dict.get(prefix + "implicit")
        if stored is not None and stored.shape != self.implicit.shape:
            self.implicit = nn.Parameter(torch.empty_like(stored))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ImplicitM(nn.Module):
    """A learnable per-channel scale of the predictor's output (fixed width: never pruned)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.implicit = nn.Parameter(torch.empty(1, channels, 1, 1).normal_(1.0, 0.02))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.implicit
