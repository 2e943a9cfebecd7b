"""YOLOX's box parametrisation, SimOTA assignment and losses (``yolox/models/yolo_head.py``), as
pure functions of ``YOLOX.core``'s outputs.

Locations are flat, in ``core``'s order: level by level, row-major. Location ``(x, y)`` of a
level with stride ``s`` predicts ``((x + dx) s, (y + dy) s, exp(dw) s, exp(dh) s)`` (centre, size)
in input pixels. SimOTA (``simota_assign``) prices every (box, candidate) pair with
``common.ota_cost`` (which YOLOv7's assigner shares) and matches them with
``common.dynamic_k_matching``; the losses (``yolox_loss``) are the IoU loss ``1 - IoU^2``, the
objectness BCE over every location, the classification BCE against IoU-aware targets on the
positives and, when ``use_l1``, an L1 loss on the raw offsets; all are divided by the number of
positives in the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import box_convert

from .common import dynamic_k_matching, ota_cost

MAX_LOG_WH = math.log(1e4)  # numerical guard on exp(dw): inactive for any box under 10^4 strides


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
    centre; only they are costed. The cost of (box, candidate) is ``ota_cost`` (the BCE of the
    joint score ``sqrt(sigmoid(cls) * sigmoid(obj))`` against the box's one-hot class, plus
    ``3 * -log IoU``), plus 1e5 unless the candidate is both inside that box and near its centre.

    Returns ``matched [A]`` (box index, -1 for background) and ``matched_iou [A]`` (the predicted
    box's IoU with its box: the classification target's scale).
    """
    num_anchors = cls_logits.shape[0]
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=cls_logits.device)
    matched_iou = torch.zeros(num_anchors, device=cls_logits.device)
    if gt_boxes.shape[0] == 0:
        return matched, matched_iou
    in_box, in_centre = candidate_regions((cells + 0.5) * strides[:, None], strides, gt_boxes, center_radius)
    candidates = (in_box | in_centre).any(0).nonzero().flatten()
    if candidates.numel() == 0:
        return matched, matched_iou
    cost, ious = ota_cost(
        cls_logits[candidates],
        obj_logits[candidates, 0],
        box_convert(pred_boxes[candidates], "cxcywh", "xyxy"),
        box_convert(gt_boxes, "cxcywh", "xyxy"),
        gt_labels,
    )
    outside = ~(in_box & in_centre)[:, candidates]
    local, local_iou = dynamic_k_matching(cost + 1e5 * outside.float(), ious, candidate_k)
    matched[candidates] = local
    matched_iou[candidates] = local_iou
    return matched, matched_iou


def yolox_loss(
    cls_logits: Tensor,
    reg: Tensor,
    obj_logits: Tensor,
    gts: list[tuple[Tensor, Tensor]],
    cells: Tensor,
    strides: Tensor,
    use_l1: bool,
    iou_weight: float = 5.0,
    center_radius: float = 2.5,
    candidate_k: int = 10,
) -> dict[str, Tensor]:
    """``{"iou": iou_weight * IoU loss, "obj", "cls", "l1"}``, each summed and divided by the
    positives, for ``core``'s outputs and per image ``(boxes (cx, cy, w, h) in input pixels,
    labels)``; ``cells`` and ``strides`` from ``location_grid``. ``"l1"`` is zero unless ``use_l1``."""
    boxes = decode(reg, cells, strides)
    fg_masks, cls_targets, box_targets = [], [], []
    for b, (gt, labels) in enumerate(gts):
        matched, matched_iou = simota_assign(
            cls_logits[b].detach(),
            obj_logits[b].detach(),
            boxes[b].detach(),
            cells,
            strides,
            gt,
            labels,
            center_radius,
            candidate_k,
        )
        fg = matched >= 0
        fg_masks.append(fg)
        onehot = F.one_hot(labels[matched[fg]], cls_logits.shape[-1]).to(cls_logits.dtype)
        cls_targets.append(onehot * matched_iou[fg, None])
        box_targets.append(gt[matched[fg]])
    fg = torch.stack(fg_masks)
    num_fg = max(int(fg.sum()), 1)
    box_targets_ = torch.cat(box_targets)
    loss_iou = iou_loss(boxes[fg], box_targets_).sum() / num_fg
    loss_obj = F.binary_cross_entropy_with_logits(
        obj_logits.squeeze(-1), fg.to(obj_logits.dtype), reduction="sum"
    )
    loss_cls = F.binary_cross_entropy_with_logits(cls_logits[fg], torch.cat(cls_targets), reduction="sum")
    if use_l1:
        positions = fg.nonzero()[:, 1]
        l1_targets = encode(box_targets_, cells[positions], strides[positions])
        loss_l1 = (reg[fg] - l1_targets).abs().sum() / num_fg
    else:
        loss_l1 = reg.new_zeros(())
    return {
        "iou": iou_weight * loss_iou,
        "obj": loss_obj / num_fg,
        "cls": loss_cls / num_fg,
        "l1": loss_l1,
    }
