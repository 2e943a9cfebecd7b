"""YOLOX (Ge et al. 2021, "YOLOX: Exceeding YOLO Series in 2021"), in plain PyTorch.

The network follows the official Megvii-BaseDetection/YOLOX layout, module names included:

* **CSPDarknet** backbone: a Focus stem (space-to-depth, then a 3x3 Conv-BN-SiLU), four stages
  ``dark2..dark5`` of a stride-2 conv and a CSP layer of bottlenecks; ``dark5`` puts an SPP
  bottleneck (max-pools 5/9/13) before its CSP layer. Nano swaps every 3x3 conv of the
  bottlenecks, stage downsamplers, PAN downsamplers and head for depthwise + pointwise pairs.
* **PAFPN** neck: top-down (1x1 lateral, nearest upsample, concatenate, CSP layer) and
  bottom-up (stride-2 conv, concatenate, CSP layer) paths, outputs at strides 8/16/32.
* **Decoupled head** per level: a 1x1 stem, two 3x3 convs to a classification predictor, two
  3x3 convs shared by the box (4) and objectness (1) predictors.

Training is anchor-free: location ``(x, y)`` of a level with stride ``s`` predicts
``((x + dx) s, (y + dy) s, exp(dw) s, exp(dh) s)`` (centre, size) in input pixels. Positives come
from SimOTA; the losses are the IoU loss ``1 - IoU^2`` (weight 5), the objectness BCE over every
location, the classification BCE against IoU-aware targets on the positives, and, in the last
``l1_epochs`` epochs only, an L1 loss on the raw offsets; all are divided by the number of
positives in the batch. The blocks (Focus, CSP layer, SPP, ...) are in ``yolox_blocks.py``; the
box parametrisation, SimOTA and the losses in ``yolox_loss.py``.

Sizes: the depth/width multipliers of the official ``exps/default`` files. The harness's
CPU-trainable size is YOLOX-Tiny itself (depth 0.33, width 0.375).

Deliberate choices (see the report): images stay in ``[0, 1]`` (every conv is followed by batch
norm, so the input's scale is immaterial) and are letterboxed top-left with YOLOX's grey 114 pad;
activations are non-inplace ``nn.SiLU`` modules (the pruning criteria hook them); ``predict``
keeps the best class per location as YOLOX's ``postprocess`` does, with the harness's score
threshold 0.05 (YOLOX evaluates at 0.01; pass ``score_thresh=0.01`` to match); the loss dict
always holds an ``"l1"`` key, zero until the L1 epochs start.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from .base import Detector, register
from .common import (
    PAD_VALUE,
    BaseConv,
    ObjectnessDetector,
    letterbox,
    letterboxed_targets,
)
from .yolox_blocks import CSPLayer, Focus, SPPBottleneck, conv_kind
from .yolox_loss import decode, location_grid, yolox_loss

SIZES: dict[str, dict[str, Any]] = {
    "nano": {"depth": 0.33, "width": 0.25, "depthwise": True},
    # the harness's CPU-trainable size: YOLOX-Tiny proper
    "tiny": {"depth": 0.33, "width": 0.375, "depthwise": False},
    "s": {"depth": 0.33, "width": 0.50, "depthwise": False},
    "m": {"depth": 0.67, "width": 0.75, "depthwise": False},
    "l": {"depth": 1.0, "width": 1.0, "depthwise": False},
    "x": {"depth": 1.33, "width": 1.25, "depthwise": False},
}

PRIOR_PROB = 0.01  # initial foreground probability of the class and objectness predictors
DARK_CHANNELS = (256, 512, 1024)  # dark3, dark4, dark5's widths at width 1.0: the neck's and head's inputs


# -- backbone, neck, head ------------------------------------------------------------------------


class CSPDarknet(nn.Module):
    """CSPDarknet-53 scaled by depth and width; returns dark3, dark4, dark5 (strides 8, 16, 32)."""

    def __init__(self, depth: float, width: float, depthwise: bool = False) -> None:
        super().__init__()
        Conv = conv_kind(depthwise)
        c = int(width * 64)
        n = max(round(depth * 3), 1)
        self.stem = Focus(3, c, ksize=3)
        self.dark2 = nn.Sequential(Conv(c, 2 * c, 3, 2), CSPLayer(2 * c, 2 * c, n, depthwise=depthwise))
        self.dark3 = nn.Sequential(
            Conv(2 * c, 4 * c, 3, 2), CSPLayer(4 * c, 4 * c, 3 * n, depthwise=depthwise)
        )
        self.dark4 = nn.Sequential(
            Conv(4 * c, 8 * c, 3, 2), CSPLayer(8 * c, 8 * c, 3 * n, depthwise=depthwise)
        )
        self.dark5 = nn.Sequential(
            Conv(8 * c, 16 * c, 3, 2),
            SPPBottleneck(16 * c, 16 * c),
            CSPLayer(16 * c, 16 * c, n, shortcut=False, depthwise=depthwise),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        return c3, c4, self.dark5(c4)


class PAFPN(nn.Module):
    """Path aggregation neck: top-down FPN then a bottom-up path, CSP layers without shortcuts."""

    def __init__(self, depth: float, width: float, depthwise: bool = False) -> None:
        super().__init__()
        Conv = conv_kind(depthwise)
        c3, c4, c5 = (int(ch * width) for ch in DARK_CHANNELS)
        n = round(3 * depth)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_conv0 = BaseConv(c5, c4, 1)
        self.C3_p4 = CSPLayer(2 * c4, c4, n, False, depthwise)
        self.reduce_conv1 = BaseConv(c4, c3, 1)
        self.C3_p3 = CSPLayer(2 * c3, c3, n, False, depthwise)
        self.bu_conv2 = Conv(c3, c3, 3, 2)
        self.C3_n3 = CSPLayer(2 * c3, c4, n, False, depthwise)
        self.bu_conv1 = Conv(c4, c4, 3, 2)
        self.C3_n4 = CSPLayer(2 * c4, c5, n, False, depthwise)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        c3, c4, c5 = feats
        fpn_out0 = self.lateral_conv0(c5)  # stride 32
        f_out0 = self.C3_p4(torch.cat([self.upsample(fpn_out0), c4], dim=1))  # stride 16
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(torch.cat([self.upsample(fpn_out1), c3], dim=1))  # stride 8
        pan_out1 = self.C3_n3(torch.cat([self.bu_conv2(pan_out2), fpn_out1], dim=1))  # stride 16
        pan_out0 = self.C3_n4(torch.cat([self.bu_conv1(pan_out1), fpn_out0], dim=1))  # stride 32
        return pan_out2, pan_out1, pan_out0


class DecoupledHead(nn.Module):
    """Per level: 1x1 stem; classification branch (2 convs -> C logits); regression branch
    (2 convs -> 4 box offsets and 1 objectness logit)."""

    def __init__(self, num_classes: int, width: float, depthwise: bool = False) -> None:
        super().__init__()
        Conv = conv_kind(depthwise)
        hidden = int(256 * width)
        self.stems = nn.ModuleList([BaseConv(int(ch * width), hidden, 1) for ch in DARK_CHANNELS])
        self.cls_convs = nn.ModuleList(
            [nn.Sequential(Conv(hidden, hidden, 3), Conv(hidden, hidden, 3)) for _ in DARK_CHANNELS]
        )
        self.reg_convs = nn.ModuleList(
            [nn.Sequential(Conv(hidden, hidden, 3), Conv(hidden, hidden, 3)) for _ in DARK_CHANNELS]
        )
        self.cls_preds = nn.ModuleList([nn.Conv2d(hidden, num_classes, 1) for _ in DARK_CHANNELS])
        self.reg_preds = nn.ModuleList([nn.Conv2d(hidden, 4, 1) for _ in DARK_CHANNELS])
        self.obj_preds = nn.ModuleList([nn.Conv2d(hidden, 1, 1) for _ in DARK_CHANNELS])
        prior_bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for pred in [*self.cls_preds, *self.obj_preds]:
            nn.init.constant_(pred.bias, prior_bias)

    def forward(self, feats: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level ``(cls [B,C,H,W], reg [B,4,H,W], obj [B,1,H,W])``."""
        outputs = []
        for k, feat in enumerate(feats):
            x = self.stems[k](feat)
            cls_feat = self.cls_convs[k](x)
            reg_feat = self.reg_convs[k](x)
            outputs.append(
                (self.cls_preds[k](cls_feat), self.reg_preds[k](reg_feat), self.obj_preds[k](reg_feat))
            )
        return outputs


# -- the detector --------------------------------------------------------------------------------


class YOLOX(ObjectnessDetector):
    """YOLOX behind the harness's Detector contract."""

    family, sizes = "yolox", SIZES

    def __init__(
        self,
        num_classes: int,
        size: str = "tiny",
        input_size: int = 128,
        l1_epochs: int = 15,
        iou_weight: float = 5.0,
        center_radius: float = 2.5,
        candidate_k: int = 10,
        **postprocessing: float,
    ) -> None:
        super().__init__(num_classes, size, input_size, **postprocessing)
        cfg = SIZES[size]
        depth, width, depthwise = cfg["depth"], cfg["width"], cfg["depthwise"]
        self.backbone = CSPDarknet(depth, width, depthwise)
        self.pafpn = PAFPN(depth, width, depthwise)
        self.head = DecoupledHead(num_classes, width, depthwise)
        self.strides = (8, 16, 32)
        self.l1_epochs, self.iou_weight = l1_epochs, iou_weight
        self.center_radius, self.candidate_k = center_radius, candidate_k
        self.use_l1 = False

    # the network -----------------------------------------------------------------------------

    def core(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(cls [B, A, C], reg [B, A, 4], obj [B, A, 1])`` over every location of every level."""
        levels = self.head(self.pafpn(self.backbone(x)))
        return tuple(
            torch.cat([out[i].flatten(2).transpose(1, 2) for out in levels], dim=1) for i in range(3)
        )

    @property
    def neck(self) -> nn.Module:
        return self.pafpn

    def prune_ignored(self) -> list[nn.Module]:
        return [*self.head.cls_preds, *self.head.reg_preds, *self.head.obj_preds]

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """YOLOX adds the L1 loss for its last (no-augmentation) epochs."""
        self.use_l1 = epoch >= epochs - self.l1_epochs

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return location_grid(x.shape[-2], x.shape[-1], self.strides, x.device)

    # training --------------------------------------------------------------------------------

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``{"iou": 5 * IoU loss, "obj", "cls", "l1"}``, each summed and divided by the positives."""
        x, scales = letterbox(images, self.input_size, PAD_VALUE)
        cls_logits, reg, obj_logits = self.core(x)
        cells, strides = self._grid(x)
        return yolox_loss(
            cls_logits, reg, obj_logits, letterboxed_targets(targets, scales, x), cells, strides,
            self.use_l1, self.iou_weight, self.center_radius, self.candidate_k,
        )  # fmt: skip

    # inference -------------------------------------------------------------------------------

    def boxes(self, raw_box: Tensor, x: Tensor) -> Tensor:
        cells, strides = self._grid(x)
        return box_convert(decode(raw_box, cells, strides), "cxcywh", "xyxy")


@register("yolox")
def build_yolox(num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> Detector:
    return YOLOX(num_classes, size, input_size, **options)
