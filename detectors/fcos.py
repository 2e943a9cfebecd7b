"""FCOS (Tian et al., ICCV 2019) and ATSS (Zhang et al., CVPR 2020) on ResNet-18/50 FPN.

Both are torchvision's ``FCOS``: same head (classification, box regression, centerness), same
losses (focal, GIoU, centerness BCE). ATSS differs only in which locations are positives: per
level the ``topk`` anchors nearest the box centre are candidates, the IoU threshold is the mean
plus the standard deviation of the candidates' IoUs, and the anchor centre must lie in the box.
BatchNorm replaces the heads' GroupNorm so every layer prunes the same way (DESIGN.md §5), with
running statistics per pyramid level (``norms.LevelBatchNorm2d``: the towers are shared by levels).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import box_iou

from .backbones import ResNetFPN
from .base import Detector, register
from .common import check_size
from .norms import LevelBatchNorm2d, track_levels

SIZES: dict[str, dict[str, Any]] = {
    # trains on the synthetic set in a few CPU minutes
    "tiny": {"width": 0.25, "fpn_channels": 64, "head_convs": 2, "depth": 18},
    # the papers' head and neck on ResNet-18
    "r18": {"width": 1.0, "fpn_channels": 256, "head_convs": 4, "depth": 18},
    # the papers' full configuration: ResNet-50 FPN, four head convs, 256 channels
    "r50": {"width": 1.0, "fpn_channels": 256, "head_convs": 4, "depth": 50},
}


class FCOSDetector(Detector, FCOS):
    """torchvision FCOS behind the harness's Detector contract."""

    def __init__(self, num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> None:
        check_size(size, SIZES)
        cfg = {**SIZES[size], **options}
        backbone = ResNetFPN(cfg["width"], cfg["fpn_channels"], depth=cfg["depth"])
        FCOS.__init__(
            self,
            backbone,
            num_classes,
            min_size=input_size,
            max_size=input_size,
            head=self.build_head(backbone.out_channels, num_classes, cfg),
            score_thresh=0.05,
            detections_per_img=100,
        )
        self.input_size = input_size
        self.strides = ResNetFPN.strides

    def build_head(self, in_channels: int, num_classes: int, cfg: dict[str, Any]) -> nn.Module:
        """FCOS's head with BatchNorm in its towers; subclasses with another head override this.

        Called before ``nn.Module.__init__``, so it must not set attributes on ``self``.
        """
        num_convs = cfg["head_convs"]
        head = FCOSHead(in_channels, 1, num_classes, num_convs=num_convs)
        bn = partial(LevelBatchNorm2d, levels=len(ResNetFPN.strides))  # statistics per level
        head.classification_head = FCOSClassificationHead(
            in_channels, 1, num_classes, num_convs, norm_layer=bn
        )
        head.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=bn)
        track_levels(head, [head.classification_head.conv, head.regression_head.conv])
        return head

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Post-processed detections in each image's own pixels; leaves the model in eval mode."""
        self.eval()
        return self(images)

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return self.transform(images)[0].tensors

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]

    @property
    def neck(self) -> nn.Module:
        return self.backbone.fpn

    def prune_ignored(self) -> list[nn.Module]:
        return [
            self.head.classification_head.cls_logits,
            self.head.regression_head.bbox_reg,
            self.head.regression_head.bbox_ctrness,
        ]


def atss_assign(
    anchors: Tensor,
    num_anchors_per_level: list[int],
    gt_boxes: Tensor,
    topk: int = 9,
    anchor_scale: float = 8.0,
) -> Tensor:
    """ATSS positives: ``matched[a]`` is the gt index of anchor ``a``, or -1 for background.

    ``anchors`` are torchvision FCOS's per-location boxes of side = stride; ATSS scores IoU
    against a square of side ``anchor_scale * stride`` at the same centre (the paper's anchor).
    """
    num_gt = gt_boxes.shape[0]
    matched = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    if num_gt == 0:
        return matched
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    half = (anchors[:, 2:3] - anchors[:, 0:1]) * anchor_scale / 2
    anchor_boxes = torch.cat([centres - half, centres + half], dim=1)
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distances = torch.cdist(centres, gt_centres)  # [A, M]

    candidates, start = [], 0
    for n in num_anchors_per_level:
        k = min(topk, n)
        candidates.append(distances[start : start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    candidates = torch.cat(candidates, dim=0)  # [K, M]

    ious = box_iou(anchor_boxes, gt_boxes)  # [A, M]
    candidate_ious = ious.gather(0, candidates)
    spread = candidate_ious.std(0) if candidates.shape[0] > 1 else torch.zeros_like(candidate_ious[0])
    threshold = candidate_ious.mean(0) + spread
    cand_centres = centres[candidates]  # [K, M, 2]
    inside = (
        (cand_centres[..., 0] > gt_boxes[:, 0])
        & (cand_centres[..., 0] < gt_boxes[:, 2])
        & (cand_centres[..., 1] > gt_boxes[:, 1])
        & (cand_centres[..., 1] < gt_boxes[:, 3])
    )
    positive = (candidate_ious >= threshold) & inside

    # an anchor positive for several boxes goes to the one it overlaps most
    assigned_iou = torch.full_like(ious, -1.0)
    gt_index = torch.arange(num_gt, device=anchors.device).expand_as(candidates)
    assigned_iou[candidates[positive], gt_index[positive]] = ious[candidates[positive], gt_index[positive]]
    best_iou, best_gt = assigned_iou.max(dim=1)
    matched[best_iou >= 0] = best_gt[best_iou >= 0]
    return matched


class ATSSDetector(FCOSDetector):
    """FCOS with the ATSS sample assignment."""

    def __init__(self, *args: Any, topk: int = 9, anchor_scale: float = 8.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topk = topk
        self.anchor_scale = anchor_scale

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        num_anchors_per_level: list[int],
    ) -> dict[str, Tensor]:
        matched = [
            atss_assign(a, num_anchors_per_level, t["boxes"], self.topk, self.anchor_scale)
            for a, t in zip(anchors, targets, strict=True)
        ]
        return self.head.compute_loss(targets, head_outputs, anchors, matched)


@register("fcos")
def build_fcos(num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> Detector:
    return FCOSDetector(num_classes, size, input_size, **options)


@register("atss")
def build_atss(num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any) -> Detector:
    return ATSSDetector(num_classes, size, input_size, **options)
