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
from SimOTA (``simota_assign``); the losses are the IoU loss ``1 - IoU^2`` (weight 5), the
objectness BCE over every location, the classification BCE against IoU-aware targets on the
positives, and, in the last ``l1_epochs`` epochs only, an L1 loss on the raw offsets; all are
divided by the number of positives in the batch.

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
from torch.nn import functional as F
from torchvision.ops import batched_nms, box_convert, box_iou

from .base import Detector, DetectorError, letterbox, register

SIZES: dict[str, dict[str, Any]] = {
    "nano": {"depth": 0.33, "width": 0.25, "depthwise": True},
    # the harness's CPU-trainable size: YOLOX-Tiny proper
    "tiny": {"depth": 0.33, "width": 0.375, "depthwise": False},
    "s": {"depth": 0.33, "width": 0.50, "depthwise": False},
    "m": {"depth": 0.67, "width": 0.75, "depthwise": False},
    "l": {"depth": 1.0, "width": 1.0, "depthwise": False},
    "x": {"depth": 1.33, "width": 1.25, "depthwise": False},
}

BN_EPS, BN_MOMENTUM = 1e-3, 0.03  # YOLOX's init_yolo
PRIOR_PROB = 0.01  # initial foreground probability of the class and objectness predictors
PAD_VALUE = 114 / 255  # YOLOX's letterbox grey
MAX_LOG_WH = math.log(1e4)  # numerical guard on exp(dw): inactive for any box under 10^4 strides


def _size(size: str) -> dict[str, Any]:
    if size not in SIZES:
        raise DetectorError(f"unknown size '{size}'; known: {', '.join(SIZES)}")
    return SIZES[size]


# -- building blocks -----------------------------------------------------------------------------


class BaseConv(nn.Module):
    """Conv (same padding, no bias) -> BatchNorm -> SiLU: every conv of YOLOX but the predictors."""

    def __init__(self, cin: int, cout: int, ksize: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ksize, stride, (ksize - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


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

    def __init__(
        self,
        depth: float,
        width: float,
        depthwise: bool = False,
        in_channels: tuple[int, ...] = (256, 512, 1024),
    ) -> None:
        super().__init__()
        Conv = conv_kind(depthwise)
        c3, c4, c5 = (int(ch * width) for ch in in_channels)
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

    def __init__(
        self,
        num_classes: int,
        width: float,
        depthwise: bool = False,
        in_channels: tuple[int, ...] = (256, 512, 1024),
    ) -> None:
        super().__init__()
        Conv = conv_kind(depthwise)
        hidden = int(256 * width)
        self.stems = nn.ModuleList([BaseConv(int(ch * width), hidden, 1) for ch in in_channels])
        self.cls_convs = nn.ModuleList(
            [nn.Sequential(Conv(hidden, hidden, 3), Conv(hidden, hidden, 3)) for _ in in_channels]
        )
        self.reg_convs = nn.ModuleList(
            [nn.Sequential(Conv(hidden, hidden, 3), Conv(hidden, hidden, 3)) for _ in in_channels]
        )
        self.cls_preds = nn.ModuleList([nn.Conv2d(hidden, num_classes, 1) for _ in in_channels])
        self.reg_preds = nn.ModuleList([nn.Conv2d(hidden, 4, 1) for _ in in_channels])
        self.obj_preds = nn.ModuleList([nn.Conv2d(hidden, 1, 1) for _ in in_channels])
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


# -- the anchor-free box parametrisation ---------------------------------------------------------


def location_grid(
    height: int, width: int, strides: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Every location of every level, in ``core``'s order: cell coordinates ``[A, 2]`` as
    ``(x, y)`` and the level's stride ``[A]``.

    The Focus slice and each stride-2 conv round up, so a level of stride ``s`` is ``ceil(H / s)``.
    """
    cells, level_strides = [], []
    for s in strides:
        h, w = math.ceil(height / s), math.ceil(width / s)
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        cells.append(torch.stack([xs.flatten(), ys.flatten()], dim=1).float())
        level_strides.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(cells), torch.cat(level_strides)


def decode(reg: Tensor, cells: Tensor, strides: Tensor) -> Tensor:
    """Raw offsets ``(dx, dy, dw, dh)`` -> boxes ``(cx, cy, w, h)`` in input pixels."""
    s = strides.unsqueeze(-1)
    centre = (reg[..., :2] + cells) * s
    size = torch.exp(reg[..., 2:].clamp(max=MAX_LOG_WH)) * s
    return torch.cat([centre, size], dim=-1)


def encode(boxes: Tensor, cells: Tensor, strides: Tensor, eps: float = 1e-8) -> Tensor:
    """The inverse of ``decode``: the L1 loss's targets for boxes ``(cx, cy, w, h)``."""
    s = strides.unsqueeze(-1)
    return torch.cat([boxes[..., :2] / s - cells, torch.log(boxes[..., 2:] / s + eps)], dim=-1)


def iou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """YOLOX's IoU loss ``1 - IoU^2`` per aligned pair of ``(cx, cy, w, h)`` boxes."""
    p, t = box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy")
    wh = (torch.min(p[:, 2:], t[:, 2:]) - torch.max(p[:, :2], t[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = pred[:, 2] * pred[:, 3] + target[:, 2] * target[:, 3] - inter
    iou = inter / (union + 1e-16)
    return 1 - iou**2


# -- SimOTA --------------------------------------------------------------------------------------


def candidate_regions(
    centres: Tensor, strides: Tensor, gt_boxes: Tensor, center_radius: float = 2.5
) -> tuple[Tensor, Tensor]:
    """``in_box [M, A]``: the location's centre lies inside the box; ``in_centre [M, A]``: it
    lies within ``center_radius`` strides of the box centre (both strict, as in YOLOX)."""
    xy = centres.unsqueeze(0)  # [1, A, 2]
    half = gt_boxes[:, None, 2:] / 2
    in_box = ((xy - (gt_boxes[:, None, :2] - half)).min(-1).values > 0) & (
        ((gt_boxes[:, None, :2] + half) - xy).min(-1).values > 0
    )
    radius = center_radius * strides[None, :, None]
    in_centre = ((xy - gt_boxes[:, None, :2]).abs() - radius).max(-1).values < 0
    return in_box, in_centre


def dynamic_k_matching(cost: Tensor, ious: Tensor, candidate_k: int = 10) -> tuple[Tensor, Tensor]:
    """SimOTA's matching on ``[M, K]`` costs and IoUs: each box takes its ``k`` cheapest
    candidates with ``k = max(1, int(sum of its top-``candidate_k`` IoUs))``; a candidate taken by
    several boxes stays with the cheapest. Returns the box index per candidate (-1: none) and
    the IoU with it."""
    num_gt, num_cand = cost.shape
    matching = torch.zeros_like(cost, dtype=torch.bool)
    top_ious = ious.topk(min(candidate_k, num_cand), dim=1).values
    dynamic_ks = top_ious.sum(1).int().clamp(min=1).tolist()
    for g, k in enumerate(dynamic_ks):
        matching[g, cost[g].topk(k, largest=False).indices] = True
    shared = matching.sum(0) > 1
    if shared.any():
        cheapest = cost[:, shared].argmin(0)
        matching[:, shared] = False
        matching[cheapest, shared] = True
    taken = matching.any(0)
    matched = torch.where(taken, matching.float().argmax(0), torch.full_like(taken, -1, dtype=torch.long))
    return matched, (matching * ious).sum(0)


@torch.no_grad()
def simota_assign(
    cls_logits: Tensor,
    obj_logits: Tensor,
    pred_boxes: Tensor,
    cells: Tensor,
    strides: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    center_radius: float = 2.5,
    candidate_k: int = 10,
) -> tuple[Tensor, Tensor]:
    """SimOTA for one image. Boxes are ``(cx, cy, w, h)`` in input pixels; ``cls_logits [A, C]``,
    ``obj_logits [A, 1]``, ``pred_boxes [A, 4]``, ``gt_boxes [M, 4]``.

    Candidates are the locations inside some box or within ``center_radius`` strides of its
    centre; only they are costed. The cost of (box, candidate) is the BCE of the joint score
    ``sqrt(sigmoid(cls) * sigmoid(obj))`` against the box's one-hot class, plus ``3 * -log IoU``,
    plus 1e5 unless the candidate is both inside that box and near its centre.

    Returns ``matched [A]`` (box index, -1 for background) and ``matched_iou [A]`` (the predicted
    box's IoU with its box: the classification target's scale).
    """
    num_anchors, num_classes = cls_logits.shape
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=cls_logits.device)
    matched_iou = torch.zeros(num_anchors, device=cls_logits.device)
    if gt_boxes.shape[0] == 0:
        return matched, matched_iou
    in_box, in_centre = candidate_regions((cells + 0.5) * strides[:, None], strides, gt_boxes, center_radius)
    candidates = (in_box | in_centre).any(0).nonzero().flatten()
    if candidates.numel() == 0:
        return matched, matched_iou
    ious = box_iou(
        box_convert(gt_boxes, "cxcywh", "xyxy"), box_convert(pred_boxes[candidates], "cxcywh", "xyxy")
    )
    joint = (cls_logits[candidates].float().sigmoid() * obj_logits[candidates].float().sigmoid()).sqrt()
    onehot = F.one_hot(gt_labels, num_classes).float()
    num_gt, num_cand = ious.shape
    cls_cost = F.binary_cross_entropy(
        joint.unsqueeze(0).expand(num_gt, -1, -1),
        onehot.unsqueeze(1).expand(-1, num_cand, -1),
        reduction="none",
    ).sum(-1)
    outside = ~(in_box & in_centre)[:, candidates]
    cost = cls_cost + 3.0 * -torch.log(ious + 1e-8) + 1e5 * outside.float()
    local, local_iou = dynamic_k_matching(cost, ious, candidate_k)
    matched[candidates] = local
    matched_iou[candidates] = local_iou
    return matched, matched_iou


# -- the detector --------------------------------------------------------------------------------


class YOLOX(Detector):
    """YOLOX behind the harness's Detector contract."""

    def __init__(
        self,
        num_classes: int,
        size: str = "tiny",
        input_size: int = 128,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.65,
        detections_per_img: int = 100,
        l1_epochs: int = 15,
        iou_weight: float = 5.0,
        center_radius: float = 2.5,
        candidate_k: int = 10,
    ) -> None:
        super().__init__()
        cfg = _size(size)
        if input_size % 32:
            raise DetectorError(f"yolox needs an input size divisible by 32, got {input_size}")
        depth, width, depthwise = cfg["depth"], cfg["width"], cfg["depthwise"]
        self.backbone = CSPDarknet(depth, width, depthwise)
        self.pafpn = PAFPN(depth, width, depthwise)
        self.head = DecoupledHead(num_classes, width, depthwise)
        self.num_classes = num_classes
        self.input_size = input_size
        self.strides = (8, 16, 32)
        self.score_thresh, self.nms_thresh, self.detections_per_img = (
            score_thresh,
            nms_thresh,
            detections_per_img,
        )
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

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return letterbox(images, self.input_size, PAD_VALUE)[0]

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
        boxes = decode(reg, cells, strides)
        fg_masks, cls_targets, box_targets = [], [], []
        for b, (target, scale) in enumerate(zip(targets, scales, strict=True)):
            gt = box_convert(target["boxes"].to(x) * scale, "xyxy", "cxcywh")
            valid = (gt[:, 2] > 0) & (gt[:, 3] > 0)
            gt, labels = gt[valid], target["labels"][valid].to(x.device)
            matched, matched_iou = simota_assign(
                cls_logits[b].detach(),
                obj_logits[b].detach(),
                boxes[b].detach(),
                cells,
                strides,
                gt,
                labels,
                self.center_radius,
                self.candidate_k,
            )
            fg = matched >= 0
            fg_masks.append(fg)
            onehot = F.one_hot(labels[matched[fg]], self.num_classes).to(x.dtype)
            cls_targets.append(onehot * matched_iou[fg, None])
            box_targets.append(gt[matched[fg]])
        fg = torch.stack(fg_masks)
        num_fg = max(int(fg.sum()), 1)
        box_targets_ = torch.cat(box_targets)
        loss_iou = iou_loss(boxes[fg], box_targets_).sum() / num_fg
        loss_obj = F.binary_cross_entropy_with_logits(obj_logits.squeeze(-1), fg.to(x.dtype), reduction="sum")
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits[fg], torch.cat(cls_targets), reduction="sum")
        if self.use_l1:
            positions = fg.nonzero()[:, 1]
            l1_targets = encode(box_targets_, cells[positions], strides[positions])
            loss_l1 = (reg[fg] - l1_targets).abs().sum() / num_fg
        else:
            loss_l1 = reg.new_zeros(())
        return {
            "iou": self.iou_weight * loss_iou,
            "obj": loss_obj / num_fg,
            "cls": loss_cls / num_fg,
            "l1": loss_l1,
        }

    # inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Score = sigmoid(obj) * best sigmoid(cls); threshold, class-aware NMS, top detections,
        boxes mapped back to each image's pixels. Leaves the model in eval mode."""
        self.eval()
        x, scales = letterbox(images, self.input_size, PAD_VALUE)
        cls_logits, reg, obj_logits = self.core(x)
        cells, strides = self._grid(x)
        boxes = box_convert(decode(reg, cells, strides), "cxcywh", "xyxy")
        class_scores, labels = cls_logits.sigmoid().max(-1)
        scores = class_scores * obj_logits.squeeze(-1).sigmoid()
        results = []
        for b, (image, scale) in enumerate(zip(images, scales, strict=True)):
            keep = scores[b] >= self.score_thresh
            img_boxes, img_scores, img_labels = boxes[b][keep], scores[b][keep], labels[b][keep]
            keep = batched_nms(img_boxes, img_scores, img_labels, self.nms_thresh)[: self.detections_per_img]
            h, w = image.shape[-2:]
            img_boxes = img_boxes[keep] / scale
            img_boxes[:, 0::2] = img_boxes[:, 0::2].clamp(0, w)
            img_boxes[:, 1::2] = img_boxes[:, 1::2].clamp(0, h)
            results.append({"boxes": img_boxes, "scores": img_scores[keep], "labels": img_labels[keep]})
        return results


@register("yolox")
def build_yolox(num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> Detector:
    return YOLOX(num_classes, size, input_size, **options)
