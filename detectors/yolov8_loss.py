"""YOLOv8's training targets and loss (Ultralytics' ``TaskAlignedAssigner`` and ``v8DetectionLoss``).

* **Task-aligned assignment** (TOOD, Feng et al. 2021): a location is a candidate for a ground-truth
  box when its anchor point lies inside the box; its alignment with the box is
  ``t = s^α · u^β``, ``s`` the predicted score of the box's class, ``u`` the CIoU of the predicted
  box with it (clamped at 0: Ultralytics' assigner uses CIoU, not plain IoU). Each box takes its
  ``topk`` best-aligned candidates; a location taken by several boxes goes to the box its
  prediction overlaps most. The classification target of a positive is the one-hot of its box's
  class scaled to ``t / max t (over the box's positives) · max u (over them)``: the best-aligned
  positive of each box is trained towards the best IoU reached on that box, the others below it.
* **Loss**: BCE on every location and class against those soft targets; ``1 - CIoU`` on the
  positives and DFL (``common.distribution_focal_loss`` on the four sides, mean over sides), both
  weighted by the positive's target score. All three are divided by the sum of the target scores
  over the batch, then scaled by the gains box 7.5, cls 0.5, dfl 1.5 (Ultralytics' defaults, which
  DCODP keeps).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import complete_box_iou, complete_box_iou_loss

from .common import distribution_focal_loss

BOX_GAIN, CLS_GAIN, DFL_GAIN = 7.5, 0.5, 1.5


def inside_boxes(points: Tensor, boxes: Tensor, eps: float = 1e-9) -> Tensor:
    """``[B, M, A]``: anchor point ``a`` (``points [A, 2]``) lies strictly inside box ``m``
    (``boxes [B, M, 4]`` xyxy), by more than ``eps`` on every side as in Ultralytics."""
    lt = points[None, None] - boxes[:, :, None, :2]
    rb = boxes[:, :, None, 2:] - points[None, None]
    return torch.cat([lt, rb], dim=-1).amin(dim=-1) > eps


@torch.no_grad()
def task_aligned_assign(
    scores: Tensor,
    pred_boxes: Tensor,
    points: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Task-aligned assignment for a padded batch (one image: ``B = 1``).

    ``scores [B, A, C]`` are probabilities (sigmoid), ``pred_boxes [B, A, 4]`` and
    ``gt_boxes [B, M, 4]`` xyxy in the same units as ``points [A, 2]``; ``gt_labels [B, M]``
    int64, ``gt_mask [B, M]`` marks real (not padding) boxes.

    Returns ``labels [B, A]``, ``boxes [B, A, 4]`` (the assigned box per location, meaningful on
    positives), ``target_scores [B, A, C]`` (zero off the positives), ``fg [B, A]`` and
    ``gt_index [B, A]``.
    """
    batch, num_anchors, num_classes = scores.shape
    num_gt = gt_boxes.shape[1]
    device = scores.device
    if num_gt == 0:
        return (
            torch.zeros(batch, num_anchors, dtype=torch.long, device=device),
            scores.new_zeros(batch, num_anchors, 4),
            torch.zeros_like(scores),
            torch.zeros(batch, num_anchors, dtype=torch.bool, device=device),
            torch.zeros(batch, num_anchors, dtype=torch.long, device=device),
        )
    valid = inside_boxes(points, gt_boxes, eps) & gt_mask[:, :, None]  # [B, M, A]
    # CIoU of every (box, prediction) pair; padding boxes are degenerate (NaN), masked out here
    ciou = torch.stack([complete_box_iou(gt_boxes[b], pred_boxes[b]) for b in range(batch)])
    overlaps = torch.where(valid, torch.nan_to_num(ciou, nan=0.0).clamp(min=0), 0.0)
    class_scores = scores.gather(2, gt_labels[:, None, :].expand(-1, num_anchors, -1)).transpose(1, 2)
    metric = torch.where(valid, class_scores.pow(alpha) * overlaps.pow(beta), 0.0)

    top = metric.topk(min(topk, num_anchors), dim=-1).indices  # [B, M, k]
    positive = torch.zeros_like(valid).scatter_(-1, top, True) & valid
    shared = positive.sum(1) > 1  # [B, A]
    if shared.any():  # keep the box the prediction overlaps most (argmax over all boxes, as Ultralytics)
        best = F.one_hot(overlaps.argmax(1), num_gt).transpose(1, 2).bool()  # [B, M, A]
        positive = torch.where(shared[:, None, :], best, positive)
    fg = positive.any(1)
    gt_index = positive.float().argmax(1)  # [B, A]

    labels = gt_labels.gather(1, gt_index)
    boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))
    metric = metric * positive
    best_metric = metric.amax(-1, keepdim=True)  # [B, M, 1]
    best_overlap = (overlaps * positive).amax(-1, keepdim=True)
    norm = (metric * best_overlap / (best_metric + eps)).amax(1)  # [B, A]
    target_scores = F.one_hot(labels, num_classes).to(scores.dtype) * (norm * fg)[..., None]
    return labels, boxes, target_scores, fg, gt_index


def box_distances(points: Tensor, boxes: Tensor, strides: Tensor, reg_max: int) -> Tensor:
    """DFL targets: ``(left, top, right, bottom)`` from each point to its box, in strides, clamped
    to ``[0, reg_max - 1 - 0.01]`` so the right-hand bin exists (Ultralytics' ``bbox2dist``)."""
    ltrb = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1) / strides[..., None]
    return ltrb.clamp(0, reg_max - 1 - 0.01)


def yolov8_loss(
    cls_logits: Tensor,
    dist_logits: Tensor,
    pred_boxes: Tensor,
    points: Tensor,
    strides: Tensor,
    target_scores: Tensor,
    target_boxes: Tensor,
    fg: Tensor,
    reg_max: int,
) -> dict[str, Tensor]:
    """``{"box", "cls", "dfl"}`` with their gains, for a batch already assigned.

    ``cls_logits [B, A, C]``, ``dist_logits [B, A, 4 * reg_max]``, ``pred_boxes [B, A, 4]`` (xyxy,
    decoded from ``dist_logits``), ``points [A, 2]`` and ``strides [A]`` in pixels.

    Ultralytics returns ``sum * batch_size`` (its optimiser step then sees a loss that grows with
    the batch); here the terms are the per-batch averages themselves, like every other family of
    the harness, so a learning rate means the same whatever the batch.
    """
    normaliser = target_scores.sum().clamp(min=1)
    loss_cls = F.binary_cross_entropy_with_logits(cls_logits, target_scores, reduction="sum") / normaliser
    weight = target_scores.sum(-1)[fg]  # [P]
    ciou = complete_box_iou_loss(pred_boxes[fg], target_boxes[fg], reduction="none")
    loss_box = (ciou * weight).sum() / normaliser
    anchor = fg.nonzero()[:, 1]
    target = box_distances(points[anchor], target_boxes[fg], strides[anchor], reg_max)  # [P, 4]
    dfl = distribution_focal_loss(dist_logits[fg].reshape(-1, reg_max), target.reshape(-1))
    loss_dfl = (dfl.reshape(-1, 4).mean(-1) * weight).sum() / normaliser
    return {"box": BOX_GAIN * loss_box, "cls": CLS_GAIN * loss_cls, "dfl": DFL_GAIN * loss_dfl}
