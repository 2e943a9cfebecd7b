"""YOLOF's anchors, box coder, uniform matching and losses, as pure functions of ``YOLOF.core``'s
outputs (flattened per anchor by ``yolof.per_anchor``: location-major, anchor-minor).

*Uniform matching*: every ground truth takes the ``k`` nearest anchors and the ``k`` nearest
predicted boxes (L1 distance of centre-size boxes) as positives, so large and small objects get
the same number of positives even though one level has few anchors; IoU thresholds then drop
weak positives and ignore negatives that already overlap an object well. The losses
(``yolof_loss``): focal loss on classes over the non-ignored anchors, GIoU on decoded boxes over
the kept pairs, both divided by the number of positive anchors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

SCALE_CLAMP = math.log(1000.0 / 16)  # the largest log-scale a delta may apply (detectron2's default)


# -- anchors and the box coder ---------------------------------------------------------------------


def make_anchors(
    height: int, width: int, stride: int, sizes: tuple[float, ...], offset: float = 0.0
) -> Tensor:
    """Square anchors of every size at every C5 location: ``[H*W*A, 4]`` xyxy.

    Centres sit at ``(x + offset) * stride`` with offset 0, as the official configuration
    (detectron2 ``ANCHOR_GENERATOR.OFFSET = 0.0``, mmdetection's default centre offset).
    """
    ys = (torch.arange(height, dtype=torch.float32) + offset) * stride
    xs = (torch.arange(width, dtype=torch.float32) + offset) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    half = torch.tensor(sizes, dtype=torch.float32) / 2
    extents = torch.stack([-half, -half, half, half], dim=-1).reshape(1, -1, 4)
    return (centres + extents).reshape(-1, 4)


def _centre_size(boxes: Tensor) -> Tensor:
    """xyxy -> (cx, cy, w, h)."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def encode(anchors: Tensor, boxes: Tensor, weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """R-CNN deltas that turn ``anchors`` into ``boxes``: centre shift over size, log size ratio."""
    a, g = _centre_size(anchors), _centre_size(boxes)
    w = anchors.new_tensor(weights)
    shift = (g[..., :2] - a[..., :2]) / a[..., 2:]
    scale = torch.log(g[..., 2:] / a[..., 2:])
    return torch.cat([shift, scale], dim=-1) * w


def decode(
    anchors: Tensor,
    deltas: Tensor,
    weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
    ctr_clamp: float = 32.0,
    scale_clamp: float = SCALE_CLAMP,
) -> Tensor:
    """Inverse of :func:`encode`, with YOLOF's clamps.

    The centre moves at most ``ctr_clamp`` pixels (``add_ctr_clamp``: a sparse single-level
    anchor set must not chase far objects early in training) and the log-scale is capped above.
    """
    d = deltas / deltas.new_tensor(weights)
    a = _centre_size(anchors)
    shift = (d[..., :2] * a[..., 2:]).clamp(-ctr_clamp, ctr_clamp)
    size = a[..., 2:] * d[..., 2:].clamp(max=scale_clamp).exp()
    centre = a[..., :2] + shift
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


# -- uniform matching ------------------------------------------------------------------------------


def uniform_match(pred_boxes: Tensor, anchors: Tensor, gt_boxes: Tensor, k: int = 4) -> tuple[Tensor, Tensor]:
    """Each gt's ``k`` nearest anchors and ``k`` nearest predicted boxes, by L1 on (cx, cy, w, h).

    Returns ``(anchor_index, gt_index)`` pairs, ``2 k`` per gt; an anchor may appear twice (in both
    lists, or for two gts), as in the official matcher.
    """
    num_gt = gt_boxes.shape[0]
    k = min(k, anchors.shape[0])
    gt = _centre_size(gt_boxes)
    nearest_pred = torch.cdist(_centre_size(pred_boxes), gt, p=1).topk(k, dim=0, largest=False).indices
    nearest_anchor = torch.cdist(_centre_size(anchors), gt, p=1).topk(k, dim=0, largest=False).indices
    anchor_index = torch.cat([nearest_pred, nearest_anchor], dim=0).flatten()  # [2k * M], gt index fastest
    gt_index = torch.arange(num_gt, device=gt_boxes.device).repeat(2 * k)
    return anchor_index, gt_index


def uniform_assign(
    pred_boxes: Tensor,
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    k: int = 4,
    pos_ignore: float = 0.15,
    neg_ignore: float = 0.7,
) -> tuple[Tensor, Tensor, Tensor]:
    """Class targets per anchor and the (anchor, gt) pairs the box loss uses.

    ``labels[a]`` is the class of anchor ``a``, ``num_classes`` for background, -1 for ignored:
    a negative whose *predicted* box has IoU > ``neg_ignore`` with a gt is ignored (it already
    fits an object); a matched pair whose *anchor* has IoU < ``pos_ignore`` with its gt is
    ignored, not positive. An anchor matched to several gts takes the class of the gt its anchor
    overlaps most (the official code lets the last write win); every kept pair enters the box loss.
    """
    labels = torch.full((anchors.shape[0],), num_classes, dtype=torch.int64, device=anchors.device)
    if gt_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=anchors.device)
        return labels, empty, empty
    labels[box_iou(pred_boxes, gt_boxes).max(dim=1).values > neg_ignore] = -1

    anchor_index, gt_index = uniform_match(pred_boxes, anchors, gt_boxes, k)
    pair_iou = box_iou(anchors, gt_boxes)[anchor_index, gt_index]
    kept = pair_iou >= pos_ignore

    # per anchor, the best kept pair's IoU (an ignored pair scores -1; unmatched anchors -inf)
    score = torch.full((anchors.shape[0], gt_boxes.shape[0]), -math.inf, device=anchors.device)
    score[anchor_index, gt_index] = torch.where(kept, pair_iou, torch.full_like(pair_iou, -1.0))
    best, best_gt = score.max(dim=1)
    labels[best > -math.inf] = -1
    positive = best >= 0
    labels[positive] = gt_labels[best_gt[positive]]
    return labels, anchor_index[kept], gt_index[kept]


# -- the losses ------------------------------------------------------------------------------------


def yolof_loss(
    logits: Tensor,
    pred_boxes: Tensor,
    anchors: Tensor,
    gts: list[tuple[Tensor, Tensor]],
    topk: int = 4,
    pos_ignore: float = 0.15,
    neg_ignore: float = 0.7,
) -> dict[str, Tensor]:
    """``{"loss_cls", "loss_box_reg"}``: focal loss (alpha 0.25, gamma 2) over the non-ignored
    anchors and GIoU over the kept pairs, both summed and divided by the positive anchors.
    ``logits [B, N, C]`` (implicit objectness applied), ``pred_boxes [B, N, 4]`` xyxy, and per
    image ``(boxes xyxy in input pixels, labels)``."""
    num_classes = logits.shape[-1]
    cls_losses, box_losses, num_pos = [], [], 0
    for i, (gt_boxes, gt_labels) in enumerate(gts):
        labels, anchor_index, gt_index = uniform_assign(
            pred_boxes[i].detach(), anchors, gt_boxes, gt_labels, num_classes, topk, pos_ignore, neg_ignore
        )
        valid = labels >= 0
        onehot = torch.zeros_like(logits[i])
        foreground = valid & (labels < num_classes)
        onehot[foreground, labels[foreground]] = 1.0
        cls_losses.append(sigmoid_focal_loss(logits[i][valid], onehot[valid], 0.25, 2.0, reduction="sum"))
        box_losses.append(
            generalized_box_iou_loss(pred_boxes[i][anchor_index], gt_boxes[gt_index], reduction="sum")
        )
        num_pos += int(foreground.sum())
    norm = max(1, num_pos)
    return {
        "loss_cls": torch.stack(cls_losses).sum() / norm,
        "loss_box_reg": torch.stack(box_losses).sum() / norm,
    }
