"""GFL, Generalized Focal Loss (Li et al., NeurIPS 2020), on torchvision's one-stage machinery.

GFL is ATSS (same ResNet-FPN, same P3..P7 levels, same adaptive positives) with two new
representations and the losses that train them:

* *Classification-IoU joint score.* The class branch predicts, per class, one logit whose sigmoid
  is trained towards the IoU of the location's predicted box with its ground truth (0 for
  background and for the other classes). There is no separate centerness/IoU branch: the same
  score ranks detections at test time that was trained, so training and inference agree.
  *Quality Focal Loss* (QFL) is focal loss generalised to such soft targets y in [0, 1]:
  ``QFL(σ) = -|y - σ|^β ((1 - y) log(1 - σ) + y log σ)``, β = 2, over all locations and classes,
  divided by the number of positives.
* *General distribution of box sides.* Each of the four distances (left, top, right, bottom, in
  units of the level's stride) is a softmax over the integers 0..n (n = ``reg_max`` = 16); the
  distance is its mean, ``Σ_i P(i) i`` (the integral). *Distribution Focal Loss* (DFL) puts the
  mass on the two integers around the target y: ``DFL = -((y_{i+1} - y) log P(i) + (y - y_i) log
  P(i+1))``, minimised when ``P(i) = y_{i+1} - y`` and ``P(i+1) = y - y_i``, whose mean is y.
  The decoded box also gets a GIoU loss. Both box losses (weights 2.0 for GIoU, 0.25 for DFL)
  weight each positive by its predicted quality (the largest class score, detached) and divide
  by the sum of those weights, as the official code does.

The assigner is ``atss_assign`` and the rest (anchors at the strides, the resize transform, the
loop over levels) is torchvision's ``FCOS`` through ``ATSSDetector``; only the head, its loss
and the decoding of detections are new. The integral and DFL are in ``common`` (YOLOv8's box
branch is the same distribution). BatchNorm replaces the paper's GroupNorm in the towers
(same parameter count: conv-without-bias + an affine norm) so every layer prunes the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.ops import batched_nms, clip_boxes_to_image, generalized_box_iou_loss

from .base import Detector, register
from .common import distribution_focal_loss, integral
from .fcos import ATSSDetector
from .norms import LevelBatchNorm2d, track_levels

REG_MAX = 16
QFL_BETA = 2.0
GIOU_WEIGHT = 2.0
DFL_WEIGHT = 0.25


# -- the paper's math on tensors -----------------------------------------------------------------


def quality_focal_loss(logits: Tensor, target: Tensor, beta: float = QFL_BETA) -> Tensor:
    """Elementwise QFL: binary cross-entropy to the soft target, scaled by ``|target - σ|^β``.

    With 0/1 targets this is exactly sigmoid focal loss with γ = β and no α.
    """
    sigma = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * (target - sigma).abs().pow(beta)


def aligned_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of ``a[k]`` with ``b[k]`` (xyxy boxes), row by row."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter + eps)


# -- the head ------------------------------------------------------------------------------------


class Scale(nn.Module):
    """A learnable scalar per pyramid level on the distribution logits (mmcv's ``Scale``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int, levels: int) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, BatchNorm, ReLU); the conv has no bias, the norm has one and
    keeps its running statistics per level (``norms.LevelBatchNorm2d``)."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        nn.init.normal_(conv.weight, std=0.01)
        layers += [conv, LevelBatchNorm2d(channels, levels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _per_location(x: Tensor) -> Tensor:
    """``[N, K, H, W]`` predictor output -> ``[N, H*W, K]`` (after the predictor, never in the trunk)."""
    n, k = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(n, -1, k)


def _take(values: Tensor, matched: Tensor) -> Tensor:
    """``values[matched]`` with background (-1) read as row 0, or zeros for an image without boxes."""
    if values.shape[0] == 0:
        return values.new_zeros((matched.shape[0], *values.shape[1:]))
    return values[matched.clamp(min=0)]


class GFLHead(nn.Module):
    """Shared over levels: a classification tower -> C joint scores, a regression tower ->
    4 (n + 1) distribution logits (times a per-level ``Scale``).

    ``forward`` returns torchvision's head-output dict, every map flattened to ``[N, A, K]`` and
    the levels concatenated; ``compute_loss`` has the signature ``ATSSDetector`` calls.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_convs: int = 4,
        reg_max: int = REG_MAX,
        num_levels: int = 5,
        prior_probability: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.cls_convs = _tower(in_channels, num_convs, num_levels)
        self.reg_convs = _tower(in_channels, num_convs, num_levels)
        track_levels(self, [self.cls_convs, self.reg_convs])
        self.gfl_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        nn.init.normal_(self.gfl_cls.weight, std=0.01)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - prior_probability) / prior_probability))
        nn.init.normal_(self.gfl_reg.weight, std=0.01)
        nn.init.zeros_(self.gfl_reg.bias)
        # distances in units of the anchor side (= the level's stride) from the anchor centre
        self.box_coder = BoxLinearCoder(normalize_by_size=True)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        scores, distributions = [], []
        for x, scale in zip(features, self.scales, strict=True):
            scores.append(_per_location(self.gfl_cls(self.cls_convs(x))))
            distributions.append(_per_location(scale(self.gfl_reg(self.reg_convs(x)))))
        return {"cls_logits": torch.cat(scores, dim=1), "bbox_regression": torch.cat(distributions, dim=1)}

    def decode(self, distribution_logits: Tensor, anchors: Tensor) -> Tensor:
        """``[..., 4 (n + 1)]`` logits + anchors ``[..., 4]`` -> xyxy boxes in pixels."""
        sides = integral(distribution_logits.unflatten(-1, (4, self.reg_max + 1)))
        return self.box_coder.decode(sides, anchors)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        cls_logits = head_outputs["cls_logits"]  # [N, A, C]
        distributions = head_outputs["bbox_regression"]  # [N, A, 4 (n + 1)]
        matched = torch.stack(matched_idxs)  # [N, A], -1 = background
        image, anchor = torch.nonzero(matched >= 0, as_tuple=True)
        # each anchor's matched box and label (index 0 stands in for background, then dropped)
        gt_boxes = torch.stack([_take(t["boxes"], m) for t, m in zip(targets, matched, strict=True)])
        gt_labels = torch.stack([_take(t["labels"], m) for t, m in zip(targets, matched, strict=True)])
        gt_boxes, gt_labels = gt_boxes[image, anchor], gt_labels[image, anchor]
        pos_anchors = torch.stack(anchors)[image, anchor]
        pos_distributions = distributions[image, anchor]  # [P, 4 (n + 1)]

        # QFL: the target is the IoU of the decoded box at the gt class, 0 everywhere else
        pred_boxes = self.decode(pos_distributions, pos_anchors)
        quality = torch.zeros_like(cls_logits)
        quality[image, anchor, gt_labels] = aligned_iou(pred_boxes.detach(), gt_boxes)
        num_pos = max(1, image.numel())
        loss_qfl = quality_focal_loss(cls_logits, quality).sum() / num_pos

        # box losses weighted by the predicted quality of each positive
        weight = cls_logits.detach()[image, anchor].sigmoid().max(dim=-1).values
        weight_sum = weight.sum().clamp(min=torch.finfo(weight.dtype).eps)
        giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
        sides = self.box_coder.encode(pos_anchors, gt_boxes).clamp(min=0, max=self.reg_max - 0.01)
        dfl = distribution_focal_loss(pos_distributions.reshape(-1, self.reg_max + 1), sides.reshape(-1))
        return {
            "qfl": loss_qfl,
            "giou": GIOU_WEIGHT * (giou * weight).sum() / weight_sum,
            "dfl": DFL_WEIGHT * (dfl.view(-1, 4).mean(dim=1) * weight).sum() / weight_sum,
        }


# -- the detector --------------------------------------------------------------------------------


class GFLDetector(ATSSDetector):
    """ATSS positives, the GFL head and losses; detections ranked by the joint score alone."""

    def build_head(self, in_channels: int, num_classes: int, cfg: dict[str, Any]) -> nn.Module:
        return GFLHead(in_channels, num_classes, cfg["head_convs"], cfg.get("reg_max", REG_MAX))

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"]

    def prune_ignored(self) -> list[nn.Module]:
        return [self.head.gfl_cls, self.head.gfl_reg]

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Per level: sigmoid scores above the threshold, the top ``topk_candidates`` (class, location)
        pairs, decoded; then class-wise NMS over the levels and the best ``detections_per_img``.
        """
        detections = []
        for i, image_shape in enumerate(image_shapes):
            boxes, scores, labels = [], [], []
            levels = zip(head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors[i], strict=True)
            for cls_logits, distributions, level_anchors in levels:
                level_scores = cls_logits[i].sigmoid().flatten()
                candidates = torch.where(level_scores > self.score_thresh)[0]
                top = level_scores[candidates].topk(min(self.topk_candidates, candidates.numel()))
                chosen = candidates[top.indices]
                location = torch.div(chosen, cls_logits.shape[-1], rounding_mode="floor")
                level_boxes = self.head.decode(distributions[i][location], level_anchors[location])
                boxes.append(clip_boxes_to_image(level_boxes, image_shape))
                scores.append(top.values)
                labels.append(chosen % cls_logits.shape[-1])
            image_boxes, image_scores, image_labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)[
                : self.detections_per_img
            ]
            detections.append(
                {"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": image_labels[keep]}
            )
        return detections


@register("gfl")
def build_gfl(num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> Detector:
    return GFLDetector(num_classes, size, input_size, **options)
