"""YOLOv8 (Ultralytics, 2023), in plain PyTorch.

The network is ``ultralytics/cfg/models/v8/yolov8.yaml`` written out as modules with readable
names instead of a yaml parser:

* **Backbone**: a stride-2 Conv stem, then four stages (``stage1..stage4``) of a stride-2 Conv and
  a C2f with shortcuts (3, 6, 6, 3 bottlenecks before depth scaling); ``stage4`` ends in SPPF
  (one 5x5 max-pool applied three times in a row, the four maps concatenated). Outputs at
  strides 8, 16, 32. Conv = conv (no bias) -> BatchNorm (eps 1e-3, momentum 0.03) -> SiLU,
  which is YOLOX's too (``common.BaseConv``). C2f and SPPF are in ``yolov8_blocks.py``.
* **C2f**: a 1x1 Conv ``cv1`` to ``2c`` channels cut in two halves; the second half feeds a chain
  of bottlenecks (two 3x3 Convs each), and both halves plus every bottleneck's output are
  concatenated into the 1x1 Conv ``cv2``. The two halves of ``cv1`` are coupled to different
  consumers, which is what a pruning graph must cope with. Ultralytics cuts them with
  ``chunk(2)`` (or ``split``); torch-pruning 1.6 cannot trace that: its split node assumes the
  i-th consumer takes the i-th piece, while here ``cv2``'s concatenation takes both pieces and the
  first bottleneck the second again (``split``: IndexError in ``infer_out_channels_recursively``;
  ``chunk``: the graph builds with wrong offsets and pruning fails). So ``cv2`` gets ``cv1``'s
  output whole (it *is* the concatenation of the halves) and the bottlenecks a slice of its last
  ``kept`` channels, ``kept`` being the input width of the first bottleneck, read from its weight:
  the same network, a graph torch-pruning maps exactly, and a split that stays right when pruning
  keeps more channels of one half than of the other (``chunk(2)`` would not).
* **Neck**: the yaml's PAN-FPN: upsample P5, concatenate P4, C2f (no shortcut); upsample,
  concatenate P3, C2f -> out P3; stride-2 Conv, concatenate, C2f -> out P4; stride-2 Conv,
  concatenate P5, C2f -> out P5.
* **Detect head**, decoupled per level: a box branch (two 3x3 Convs of ``max(16, ch0 / 4, 4 R)``
  channels, then a 1x1 conv to ``4 R`` logits: a distribution over ``R = reg_max = 16`` bins per
  box side) and a class branch (two 3x3 Convs of ``max(ch0, min(C, 100))`` channels, then a 1x1
  conv to ``C`` logits), with Ultralytics' ``bias_init``.

Decoding is anchor-free: location ``(x, y)`` of a level of stride ``s`` has its anchor point at
``((x + 0.5) s, (y + 0.5) s)``; each side's distance is the expectation of its softmax over the
bins (DFL's integral, ``common.integral``) times ``s``; the box is the point minus/plus those
distances. Training: ``yolov8_loss`` (task-aligned assignment, BCE, CIoU, DFL).

Sizes: yolov8.yaml's ``n``/``s``/``m`` scales; channels ``ceil(min(c, max_channels) * width / 8) * 8``,
repeats ``max(round(n * depth), 1)``. The harness's CPU-trainable size ``tiny`` is YOLOv8-n itself.

Deliberate choices: the DFL projection is a fixed ``arange`` (GFL's ``integral``), not a frozen
1x1 conv, so nothing the optimiser or the pruner could touch sits in the model; Ultralytics'
frozen conv holds 16 weights that its summaries count, so our parameter counts are the published
ones minus 16 (3,157,200 -> 3,157,184 for n, which is exactly Ultralytics' "gradients" count).
Images stay in ``[0, 1]`` and are letterboxed top-left (Ultralytics centres them) with the grey
114 pad. ``predict`` takes every (location, class) pair over the score threshold as a candidate,
as Ultralytics' validator does (``multi_label``), with the harness's threshold 0.05 (Ultralytics
evaluates at 0.001: pass ``score_thresh=0.001`` to match), class-aware NMS at IoU 0.7 (DCODP's
suite passes 0.6) and at most 300 detections. The loss terms are per-batch averages (see
``yolov8_loss``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Detector, DetectorError, register
from .common import (
    PAD_VALUE,
    BaseConv,
    LetterboxDetector,
    centred_placement,
    detections,
    integral,
    letterbox,
    letterbox_centered,
    xyxy,
)
from .yolov8_blocks import SPPF, C2f
from .yolov8_loss import task_aligned_assign, yolov8_loss

SIZES: dict[str, dict[str, float]] = {
    "n": {"depth": 0.33, "width": 0.25, "max_channels": 1024},
    "s": {"depth": 0.33, "width": 0.50, "max_channels": 1024},
    "m": {"depth": 0.67, "width": 0.75, "max_channels": 768},
    "l": {"depth": 1.00, "width": 1.00, "max_channels": 512},
    "x": {"depth": 1.00, "width": 1.25, "max_channels": 512},
    # the harness's CPU-trainable size: YOLOv8-n proper
    "tiny": {"depth": 0.33, "width": 0.25, "max_channels": 1024},
}
REG_MAX = 16
ULTRALYTICS_MAX_WH = 7680  # Ultralytics' NMS: each class's boxes moved this far from the others


def make_divisible(x: float, divisor: int = 8) -> int:
    return math.ceil(x / divisor) * divisor


# -- backbone, neck, head ------------------------------------------------------------------------


class Backbone(nn.Module):
    """Layers 0-9 of yolov8.yaml; returns P3, P4, P5 (strides 8, 16, 32)."""

    def __init__(self, widths: tuple[int, ...], n3: int, n6: int) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.stem = BaseConv(3, c1, 3, 2)
        self.stage1 = nn.Sequential(BaseConv(c1, c2, 3, 2), C2f(c2, c2, n3, True))
        self.stage2 = nn.Sequential(BaseConv(c2, c3, 3, 2), C2f(c3, c3, n6, True))
        self.stage3 = nn.Sequential(BaseConv(c3, c4, 3, 2), C2f(c4, c4, n6, True))
        self.stage4 = nn.Sequential(BaseConv(c4, c5, 3, 2), C2f(c5, c5, n3, True), SPPF(c5, c5))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        return p3, p4, self.stage4(p4)


class Neck(nn.Module):
    """Layers 10-21 of yolov8.yaml: top-down then bottom-up, C2f without shortcuts."""

    def __init__(self, c3: int, c4: int, c5: int, n: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down_p4 = C2f(c5 + c4, c4, n)
        self.top_down_p3 = C2f(c4 + c3, c3, n)
        self.down_p3 = BaseConv(c3, c3, 3, 2)
        self.bottom_up_p4 = C2f(c3 + c4, c4, n)
        self.down_p4 = BaseConv(c4, c4, 3, 2)
        self.bottom_up_p5 = C2f(c4 + c5, c5, n)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        p3, p4, p5 = feats
        t4 = self.top_down_p4(torch.cat([self.upsample(p5), p4], dim=1))
        out3 = self.top_down_p3(torch.cat([self.upsample(t4), p3], dim=1))
        out4 = self.bottom_up_p4(torch.cat([self.down_p3(out3), t4], dim=1))
        out5 = self.bottom_up_p5(torch.cat([self.down_p4(out4), p5], dim=1))
        return out3, out4, out5


class DetectHead(nn.Module):
    """Ultralytics' ``Detect``: per level a box branch to ``4 * reg_max`` distribution logits and a
    class branch to ``num_classes`` logits, neither sharing convs with the other or across levels."""

    def __init__(
        self, num_classes: int, in_channels: tuple[int, ...], strides: tuple[int, ...], reg_max: int
    ) -> None:
        super().__init__()
        box_ch = max(16, in_channels[0] // 4, 4 * reg_max)
        cls_ch = max(in_channels[0], min(num_classes, 100))
        self.box_convs = nn.ModuleList(
            nn.Sequential(BaseConv(c, box_ch, 3), BaseConv(box_ch, box_ch, 3)) for c in in_channels
        )
        self.cls_convs = nn.ModuleList(
            nn.Sequential(BaseConv(c, cls_ch, 3), BaseConv(cls_ch, cls_ch, 3)) for c in in_channels
        )
        self.box_preds = nn.ModuleList(nn.Conv2d(box_ch, 4 * reg_max, 1) for _ in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(cls_ch, num_classes, 1) for _ in in_channels)
        # Ultralytics' bias_init: flat distributions; about 5 objects of each class per 640 image
        with torch.no_grad():
            for box, cls, s in zip(self.box_preds, self.cls_preds, strides, strict=True):
                box.bias.fill_(1.0)
                cls.bias.fill_(math.log(5 / num_classes / (640 / s) ** 2))

    def forward(self, feats: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor]]:
        """Per level ``(cls [B, C, H, W], box [B, 4 R, H, W])``."""
        return [
            (self.cls_preds[k](self.cls_convs[k](f)), self.box_preds[k](self.box_convs[k](f)))
            for k, f in enumerate(feats)
        ]


# -- the anchor-free box parametrisation ---------------------------------------------------------


def anchor_points(
    height: int, width: int, strides: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Every location of every level in ``core``'s order: its anchor point ``[A, 2]`` (x, y) at
    the cell centre, in input pixels, and its level's stride ``[A]``."""
    points, level_strides = [], []
    for s in strides:
        h, w = math.ceil(height / s), math.ceil(width / s)
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        points.append((torch.stack([xs.flatten(), ys.flatten()], dim=1).float() + 0.5) * s)
        level_strides.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(points), torch.cat(level_strides)


def decode(dist_logits: Tensor, points: Tensor, strides: Tensor) -> Tensor:
    """Distribution logits ``[..., A, 4 R]`` (side-major: ``l, t, r, b`` of R bins each) -> xyxy
    boxes ``[..., A, 4]`` in input pixels."""
    ltrb = integral(dist_logits.unflatten(-1, (4, -1))) * strides[:, None]
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


# -- the detector --------------------------------------------------------------------------------


class YOLOv8(LetterboxDetector):
    """YOLOv8 behind the harness's Detector contract."""

    family, sizes = "yolov8", SIZES
    postprocessing = {"score_thresh": 0.05, "nms_thresh": 0.7, "detections_per_img": 300}
    # pipeline "ultralytics": Ultralytics' validator's pre- and post-processing (centred
    # LetterBox; conf 0.001 unless score_thresh says otherwise), so an unpruned model's
    # predictions are the ones `yolo val` scores
    PIPELINES = ("detprune", "ultralytics")

    def __init__(
        self,
        num_classes: int,
        size: str = "tiny",
        input_size: int = 128,
        max_candidates: int = 30000,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        pipeline: str = "detprune",
        **postprocessing: float,
    ) -> None:
        if pipeline not in self.PIPELINES:
            raise DetectorError(f"unknown yolov8 pipeline '{pipeline}'; known: {', '.join(self.PIPELINES)}")
        if pipeline == "ultralytics":
            postprocessing = {"score_thresh": 0.001, **postprocessing}
        super().__init__(num_classes, size, input_size, **postprocessing)
        self.pipeline = pipeline
        cfg = SIZES[size]
        depth, width, max_ch = cfg["depth"], cfg["width"], cfg["max_channels"]
        widths = tuple(make_divisible(min(c, max_ch) * width) for c in (64, 128, 256, 512, 1024))
        n3, n6 = (max(round(n * depth), 1) for n in (3, 6))
        self.strides = (8, 16, 32)
        self.backbone = Backbone(widths, n3, n6)
        # nn.Module.__setattr__ files a module under _modules, past the contract's ``neck`` property
        self.neck = Neck(*widths[2:], n3)
        self.head = DetectHead(num_classes, widths[2:], self.strides, REG_MAX)
        self.reg_max, self.max_candidates = REG_MAX, max_candidates
        self.topk, self.alpha, self.beta = topk, alpha, beta

    # the network -----------------------------------------------------------------------------

    def core(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(cls [B, A, C], box distribution logits [B, A, 4 * reg_max])`` over every location
        of every level (level by level, row-major)."""
        levels = self.head(self.neck(self.backbone(x)))
        return tuple(
            torch.cat([out[i].flatten(2).transpose(1, 2) for out in levels], dim=1) for i in range(2)
        )

    @property
    def neck(self) -> nn.Module:
        return self._modules["neck"]

    def prune_ignored(self) -> list[nn.Module]:
        return [*self.head.cls_preds, *self.head.box_preds]

    def _letterbox(self, images: list[Tensor]) -> tuple[Tensor, list, list[tuple[float, float]]]:
        """The batch ``core`` takes, each image's scale (one, or per axis) and its offset in the
        batch's pixels."""
        if self.pipeline == "ultralytics":
            return letterbox_centered(images, self.input_size, PAD_VALUE)
        x, scales = letterbox(images, self.input_size, PAD_VALUE)
        return x, scales, [(0.0, 0.0)] * len(images)

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return self._letterbox(images)[0]

    def input_offsets(self, images: list[Tensor]) -> list[tuple[float, float]]:
        if self.pipeline != "ultralytics":
            return super().input_offsets(images)
        placed = (centred_placement(*im.shape[-2:], self.input_size) for im in images)
        return [(float(left), float(top)) for _, _, left, top in placed]

    def ultralytics_output(self, x: Tensor) -> Tensor:
        """What Ultralytics' ``Detect`` returns in inference (and ``yolo export format=onnx``
        writes): ``[B, 4 + C, A]``, each location's box as centre x, centre y, width, height in
        the input's pixels, then its sigmoid class scores."""
        cls_logits, dist_logits = self.core(x)
        points, strides = self._grid(x)
        boxes = decode(dist_logits, points, strides)
        xywh = torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)
        return torch.cat([xywh, cls_logits.sigmoid()], dim=-1).transpose(1, 2)

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return anchor_points(x.shape[-2], x.shape[-1], self.strides, x.device)

    # training --------------------------------------------------------------------------------

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``{"box": 7.5 CIoU, "cls": 0.5 BCE, "dfl": 1.5 DFL}``, each over the target-score sum."""
        x, scales, offsets = self._letterbox(images)
        cls_logits, dist_logits = self.core(x)
        points, strides = self._grid(x)
        pred_boxes = decode(dist_logits, points, strides)
        gt_boxes, gt_labels, gt_mask = self._pad_targets(targets, scales, offsets, x)
        _, target_boxes, target_scores, fg, _ = task_aligned_assign(
            cls_logits.detach().sigmoid(),
            pred_boxes.detach(),
            points,
            gt_labels,
            gt_boxes,
            gt_mask,
            self.topk,
            self.alpha,
            self.beta,
        )
        return yolov8_loss(
            cls_logits, dist_logits, pred_boxes, points, strides, target_scores, target_boxes, fg, REG_MAX
        )

    @staticmethod
    def _pad_targets(
        targets: list[dict[str, Tensor]], scales: list, offsets: list[tuple[float, float]], x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes in letterboxed pixels, padded to the batch's largest count, and the real-box mask
        (degenerate boxes are dropped: they contain no anchor point)."""
        kept = []
        for target, scale, offset in zip(targets, scales, offsets, strict=True):
            boxes = target["boxes"].to(x) * xyxy(scale, x) + xyxy(offset, x)
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            kept.append((boxes[valid], target["labels"].to(x.device)[valid]))
        most = max(len(b) for b, _ in kept)
        gt_boxes = x.new_zeros(len(kept), most, 4)
        gt_labels = torch.zeros(len(kept), most, dtype=torch.long, device=x.device)
        gt_mask = torch.zeros(len(kept), most, dtype=torch.bool, device=x.device)
        for i, (boxes, labels) in enumerate(kept):
            gt_boxes[i, : len(boxes)], gt_labels[i, : len(boxes)] = boxes, labels
            gt_mask[i, : len(boxes)] = True
        return gt_boxes, gt_labels, gt_mask

    # inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Every (location, class) with sigmoid score over the threshold is a candidate (at most
        ``max_candidates``, best first); class-aware NMS; the top detections, boxes mapped back to
        each image's pixels and clamped to it. The Ultralytics pipeline keeps Ultralytics' order
        (location-major, sorted only when over ``max_candidates``) and its NMS, so that tied
        scores break as they do there. Leaves the model in eval mode."""
        ultralytics = self.pipeline == "ultralytics"
        self.eval()
        x, scales, offsets = self._letterbox(images)
        cls_logits, dist_logits = self.core(x)
        points, strides = self._grid(x)
        boxes = decode(dist_logits, points, strides)
        scores = cls_logits.sigmoid()
        results = []
        for b, (image, scale, offset) in enumerate(zip(images, scales, offsets, strict=True)):
            anchor, label = (scores[b] > self.score_thresh).nonzero(as_tuple=True)
            score = scores[b, anchor, label]
            if not ultralytics or len(score) > self.max_candidates:
                order = score.argsort(descending=True)[: self.max_candidates]
                anchor, label, score = anchor[order], label[order], score[order]
            results.append(
                detections(
                    boxes[b, anchor],
                    score,
                    label,
                    image,
                    scale,
                    self.nms_thresh,
                    self.detections_per_img,
                    offset,
                    ULTRALYTICS_MAX_WH if ultralytics else None,
                )
            )
        return results


@register("yolov8")
def build_yolov8(num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> Detector:
    return YOLOv8(num_classes, size, input_size, **options)
