"""YOLOv7 (Wang, Bochkovskiy & Liao 2022, "YOLOv7: Trainable bag-of-freebies ..."), in plain PyTorch.

The network follows WongKinYiu/yolov7's training configs layer for layer (order, sources and
channel counts of ``cfg/training/yolov7.yaml`` and ``yolov7-tiny.yaml``), written out as modules:

* **base** (``yolov7.yaml``): a stem of four convs, then stages of an **ELAN** block (two 1x1
  branches, a chain of four 3x3 convs, the 1x1 branches and every second 3x3 output
  concatenated and fused by a 1x1 conv), separated by **MP** downsamplers (a 2x2 max-pool then
  1x1 conv, beside a 1x1 then stride-2 3x3 conv, concatenated); **SPPCSPC** on stride 32; a PAN
  neck of **ELAN-H** blocks (every 3x3 output concatenated); a **RepConv** per level before the
  detect layer. SiLU, BatchNorm eps 1e-3 momentum 0.03 (yolov7's ``initialize_weights``).
* **tiny** (``yolov7-tiny.yaml``): LeakyReLU(0.1), two-conv ELANs, plain max-pool downsampling,
  the small SPP ("SP" pools inside a CSP split), and a plain 3x3 conv before the detect layer.

The **IDetect** head: per level ``ImplicitM(conv1x1(ImplicitA(x)))``, ``na = 3`` anchors of
``5 + C`` outputs each. Box decode: ``xy = (2 sigmoid - 0.5 + cell) * stride``,
``wh = (2 sigmoid)^2 * anchor``. Assignment and losses (YOLOv7's ComputeLossOTA) are in
``yolov7_loss.py``.

Deliberate choices: RepConv keeps its training-time branches (3x3+BN, 1x1+BN, identity BN
when shapes allow), so pruning, FLOPs and the parameter count see the real training graph;
``deployed()`` returns the deploy model (every Conv+BN folded, every RepConv one 3x3
conv, the implicit layers folded into the predictors) for latency measurements. ``ImplicitA``
is a learnable per-channel bias on the predictor's input: torch-pruning sees its parameter as
an "unwrapped" parameter in the same dependency group as the channels it is added to and prunes
it with them; it adopts a checkpoint's (pruned) width when loaded. Images stay in ``[0, 1]``
and are letterboxed top-left with YOLO's grey 114; activations are non-inplace modules (the
criteria hook them). ``predict`` keeps the best class per location (YOLOv7 evaluates
multi-label at 0.001; the harness's threshold is 0.05, ``score_thresh=0.001`` to match).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from .base import Detector, DetectorError, register
from .common import (
    PAD_VALUE,
    ObjectnessDetector,
    letterbox,
    letterboxed_targets,
)
from .yolov7_blocks import ELAN, SPPCSPC, Conv, ImplicitA, ImplicitM, MPDown, RepConv, SPPTiny
from .yolov7_loss import HYPS, anchor_grid, decode, yolov7_loss

# anchors in input pixels, (w, h) per anchor, P3/P4/P5; tiny: the set yolov7-tiny.yaml names
# (one revision of that file carries auto-anchored values, with these commented out beside them)
ANCHORS_BASE = ((12, 16, 19, 36, 40, 28), (36, 75, 76, 55, 72, 146), (142, 110, 192, 243, 459, 401))
ANCHORS_TINY = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
SIZES = ("tiny", "base")


class Backbone(nn.Module):
    """Returns the stride 8/16/32 outputs (base layers 24/37/50, tiny 14/21/28)."""

    def __init__(self, size: str) -> None:
        super().__init__()
        if size == "tiny":
            elan = lambda cin, c: ELAN(cin, 2 * c, c, c, 2, (1, 2), size)  # noqa: E731
            self.stem = nn.Sequential(Conv(3, 32, 3, 2, size), Conv(32, 64, 3, 2, size), elan(64, 32))
            self.stage3 = nn.Sequential(nn.MaxPool2d(2, 2), elan(64, 64))
            self.stage4 = nn.Sequential(nn.MaxPool2d(2, 2), elan(128, 128))
            self.stage5 = nn.Sequential(nn.MaxPool2d(2, 2), elan(256, 256))
        else:
            elan = lambda cin, c, cout: ELAN(cin, cout, c, c, 4, (2, 4), size)  # noqa: E731
            self.stem = nn.Sequential(
                Conv(3, 32, 3, 1, size),
                Conv(32, 64, 3, 2, size),
                Conv(64, 64, 3, 1, size),
                Conv(64, 128, 3, 2, size),
                elan(128, 64, 256),
            )
            self.stage3 = nn.Sequential(MPDown(256, 128, size), elan(256, 128, 512))
            self.stage4 = nn.Sequential(MPDown(512, 256, size), elan(512, 256, 1024))
            self.stage5 = nn.Sequential(MPDown(1024, 512, size), elan(1024, 256, 1024))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c3 = self.stage3(self.stem(x))
        c4 = self.stage4(c3)
        return c3, c4, self.stage5(c4)


class Neck(nn.Module):
    """SPP, then the PAN: top-down (1x1, upsample, concat with a 1x1 lateral, ELAN) and bottom-up
    (downsample, concat, ELAN); returns the three maps the head's RepConv/Conv take (stride 8/16/32:
    base layers 75/88/101, tiny 57/65/73)."""

    def __init__(self, size: str) -> None:
        super().__init__()
        self.tiny = size == "tiny"
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        if self.tiny:
            elan = lambda cin, c: ELAN(cin, 2 * c, c, c, 2, (1, 2), size)  # noqa: E731
            self.spp = SPPTiny(512, 256, size)
            self.reduce5, self.lateral4 = Conv(256, 128, 1, size=size), Conv(256, 128, 1, size=size)
            self.td4 = elan(256, 64)
            self.reduce4, self.lateral3 = Conv(128, 64, 1, size=size), Conv(128, 64, 1, size=size)
            self.td3 = elan(128, 32)
            self.down3, self.bu4 = Conv(64, 128, 3, 2, size), elan(256, 64)
            self.down4, self.bu5 = Conv(128, 256, 3, 2, size), elan(512, 128)
        else:
            elan = lambda cin, c: ELAN(cin, c, c, c // 2, 4, (1, 2, 3, 4), size)  # noqa: E731
            self.spp = SPPCSPC(1024, 512, size)
            self.reduce5, self.lateral4 = Conv(512, 256, 1, size=size), Conv(1024, 256, 1, size=size)
            self.td4 = elan(512, 256)
            self.reduce4, self.lateral3 = Conv(256, 128, 1, size=size), Conv(512, 128, 1, size=size)
            self.td3 = elan(256, 128)
            self.down3, self.bu4 = MPDown(128, 128, size), elan(512, 256)
            self.down4, self.bu5 = MPDown(256, 256, size), elan(1024, 512)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        c3, c4, c5 = feats
        p5 = self.spp(c5)
        p4 = self.td4(torch.cat([self.lateral4(c4), self.up(self.reduce5(p5))], dim=1))
        p3 = self.td3(torch.cat([self.lateral3(c3), self.up(self.reduce4(p4))], dim=1))
        n4 = self.bu4(torch.cat([self.down3(p3), p4], dim=1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], dim=1))
        return p3, n4, n5


class IDetect(nn.Module):
    """Per level: the pre-detect conv (RepConv for base, Conv for tiny), then
    ``ImplicitM(conv1x1(ImplicitA(x)))`` with ``na * (5 + C)`` outputs, anchor-major."""

    def __init__(self, num_classes: int, size: str, in_channels: tuple[int, ...], na: int = 3) -> None:
        super().__init__()
        widths = (256, 512, 1024) if size == "base" else (128, 256, 512)
        pairs = zip(in_channels, widths, strict=True)
        self.convs = nn.ModuleList(
            [RepConv(ci, co, size=size) if size == "base" else Conv(ci, co, 3, size=size) for ci, co in pairs]
        )
        self.no = 5 + num_classes
        self.ia = nn.ModuleList([ImplicitA(c) for c in widths])
        self.m = nn.ModuleList([nn.Conv2d(c, na * self.no, 1) for c in widths])
        self.im = nn.ModuleList([ImplicitM(na * self.no) for _ in widths])
        with torch.no_grad():  # yolov7's _initialize_biases: ~8 objects per 640 image, class prior 0.6/C
            for pred, stride in zip(self.m, (8, 16, 32), strict=True):
                bias = pred.bias.view(na, self.no)
                bias[:, 4] += math.log(8 / (640 / stride) ** 2)
                bias[:, 5:] += math.log(0.6 / (num_classes - 0.99))

    def forward(self, feats: tuple[Tensor, ...]) -> list[Tensor]:
        return [self.im[i](self.m[i](self.ia[i](self.convs[i](f)))) for i, f in enumerate(feats)]

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold ImplicitA into the bias (``b += W a``) and ImplicitM into weight and bias."""
        for i, pred in enumerate(self.m):
            if isinstance(self.ia[i], ImplicitA):
                pred.bias += (pred.weight.flatten(1) @ self.ia[i].implicit.flatten()).flatten()
                scale = self.im[i].implicit.flatten()
                pred.bias *= scale
                pred.weight *= scale[:, None, None, None]
                self.ia[i], self.im[i] = nn.Identity(), nn.Identity()


# -- the detector --------------------------------------------------------------------------------


class YOLOv7(ObjectnessDetector):
    """YOLOv7 (tiny/base) behind the harness's Detector contract. ``box_gain``, ``obj_gain`` and
    ``cls_gain`` override the loss gains of the size's hyperparameter file."""

    family, sizes = "yolov7", SIZES

    def __init__(
        self,
        num_classes: int,
        size: str = "tiny",
        input_size: int = 128,
        anchor_t: float = 4.0,
        candidate_k: int = 10,
        box_gain: float | None = None,
        obj_gain: float | None = None,
        cls_gain: float | None = None,
        anchors: list[list[float]] | None = None,
        **postprocessing: float,
    ) -> None:
        super().__init__(num_classes, size, input_size, **postprocessing)
        self.backbone = Backbone(size)
        self.pan = Neck(size)
        self.head = IDetect(num_classes, size, (64, 128, 256) if size == "tiny" else (128, 256, 512))
        self.strides = (8, 16, 32)
        # the yaml's anchors, or a checkpoint's own (auto-anchored ones; ``yolov7_files``)
        anchors = anchors or (ANCHORS_TINY if size == "tiny" else ANCHORS_BASE)
        if torch.tensor(anchors).numel() != 18:
            raise DetectorError(f"yolov7 anchors: 3 levels of 3 (w, h) pairs in pixels, got {anchors!r}")
        self.register_buffer("anchors", torch.tensor(anchors).float().view(3, 3, 2), persistent=False)
        self.anchor_t, self.candidate_k = anchor_t, candidate_k
        # hyp.scratch.tiny / hyp.scratch.p5 gains, scaled by train.py's rules (nl = 3 levels)
        given = {"box": box_gain, "obj": obj_gain, "cls": cls_gain}
        hyp = {**HYPS[size], **{k: v for k, v in given.items() if v is not None}}
        obj, cls = hyp["obj"] * (input_size / 640) ** 2, hyp["cls"] * num_classes / 80
        self.gains = {"box": hyp["box"], "obj": obj, "cls": cls}

    # the network -----------------------------------------------------------------------------

    def core(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(cls [B, A, C], box [B, A, 4], obj [B, A, 1])`` raw, over every anchor of every
        location of every level (level, anchor, row, column order)."""
        levels = self.head(self.pan(self.backbone(x)))
        flat = []
        for out in levels:
            b, _, h, w = out.shape
            flat.append(
                out.view(b, 3, self.head.no, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, self.head.no)
            )
        out = torch.cat(flat, dim=1)
        return out[..., 5:], out[..., :4], out[..., 4:5]

    @property
    def neck(self) -> nn.Module:
        return self.pan

    def prune_ignored(self) -> list[nn.Module]:
        return list(self.head.m)

    def deployed(self) -> YOLOv7:
        """A fused copy in eval mode (YOLOv7's deploy model: Conv+BN folded, each RepConv one 3x3
        conv, implicit layers folded into the predictors), for latency; same eval outputs."""
        fused = copy.deepcopy(self).eval()
        for module in list(fused.modules()):
            if isinstance(module, (Conv, RepConv, IDetect)):
                module.fuse()
        return fused

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int]]]:
        return anchor_grid(x.shape[-2], x.shape[-1], self.strides, self.anchors)

    # training --------------------------------------------------------------------------------

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``{"box", "obj", "cls"}`` as ComputeLossOTA computes them, *not* multiplied by the batch
        size (yolov7 returns ``loss * bs``; the harness's losses are per batch)."""
        x, scales = letterbox(images, self.input_size, PAD_VALUE)
        cls_logits, raw_box, obj_logits = self.core(x)
        gts = letterboxed_targets(targets, scales, x)
        return yolov7_loss(
            cls_logits, raw_box, obj_logits, gts, self._grid(x), self.anchors, self.strides,
            self.gains, self.anchor_t, self.candidate_k,
        )  # fmt: skip

    # inference -------------------------------------------------------------------------------

    def boxes(self, raw_box: Tensor, x: Tensor) -> Tensor:
        cells, strides, anchor_wh, _ = self._grid(x)
        return box_convert(decode(raw_box, cells, strides, anchor_wh), "cxcywh", "xyxy")


@register("yolov7", default_size="tiny")
def build_yolov7(num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> Detector:
    return YOLOv7(num_classes, size, input_size, **options)
