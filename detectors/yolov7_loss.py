"""YOLOv7's box decode, assigner and losses (``utils/loss.py``'s ComputeLossOTA) as pure functions.

Locations are flat, in ``YOLOv7.core``'s order: level, anchor, row, column. The assigner:

1. ``find_3_positive``: per level, every anchor whose width and height are both within a factor
   ``anchor_t`` of the box's nominates the box centre's cell and the two nearest neighbour cells
   (one in x, one in y; none across the grid's first cell or past its last);
2. per image, ``common.ota_cost`` prices each (box, candidate) pair by the BCE of
   ``sqrt(sigmoid(cls) * sigmoid(obj))`` against the box's one-hot class plus ``3 * -log IoU``;
   every box takes its ``k`` cheapest candidates with ``k = max(1, int(sum of its top-10
   IoUs))``, a candidate taken by several boxes goes to the cheapest (SimOTA's matching:
   ``common.dynamic_k_matching``, the one YOLOX uses). As in yolov7, a candidate nominated by
   two boxes is two entries, and every box is costed against every entry.

Losses per level: ``1 - CIoU`` averaged over the positives; objectness BCE over every anchor
of every cell against the detached CIoU (clamped at 0) at the positives, weighted by the level
balance 4.0 / 1.0 / 0.4; classification BCE over the positives (only when C > 1, as yolov7).
Each term is multiplied by its gain and the three are returned separately, per batch: yolov7
returns ``(box + obj + cls) * batch_size``, which changes only the effective learning rate.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import box_convert, complete_box_iou_loss

from .common import dynamic_k_matching, ota_cost

# hyp.scratch.tiny.yaml (tiny) and hyp.scratch.p5.yaml (base); train.py then scales them by
# 3 / nl (= 1 here), cls by C / 80 and obj by (image size / 640)^2 (see YOLOv7.__init__)
HYPS: dict[str, dict[str, float]] = {
    "tiny": {"box": 0.05, "obj": 1.0, "cls": 0.5},
    "base": {"box": 0.05, "obj": 0.7, "cls": 0.3},
}
BALANCE = (4.0, 1.0, 0.4)  # objectness weight of P3, P4, P5
# the neighbour offsets, in cells: centre, left, up, right, down (times g = 0.5)
OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)

__all__ = [
    "HYPS",
    "anchor_grid",
    "decode",
    "find_3_positive",
    "yolov7_loss",
]


def anchor_grid(
    height: int, width: int, strides: tuple[int, ...], anchors: Tensor
) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int]]]:
    """Every anchor of every location of every level, in ``core``'s order: cell ``(x, y)``
    ``[A, 2]``, stride ``[A]``, anchor ``(w, h)`` in pixels ``[A, 2]``, and each level's
    ``(h, w)``. ``anchors [L, na, 2]`` in pixels."""
    cells, level_strides, sizes, shapes = [], [], [], []
    device = anchors.device
    for s, level_anchors in zip(strides, anchors, strict=True):
        h, w = height // s, width // s
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        xy = torch.stack([xs.flatten(), ys.flatten()], dim=1).float()
        na = len(level_anchors)
        cells.append(xy.repeat(na, 1))
        level_strides.append(torch.full((na * h * w,), float(s), device=device))
        sizes.append(level_anchors.repeat_interleave(h * w, dim=0))
        shapes.append((h, w))
    return torch.cat(cells), torch.cat(level_strides), torch.cat(sizes), shapes


def decode(raw: Tensor, cells: Tensor, strides: Tensor, anchor_wh: Tensor) -> Tensor:
    """Raw ``(tx, ty, tw, th)`` -> ``(cx, cy, w, h)`` in pixels: ``xy = (2 sigmoid(t) - 0.5 +
    cell) * stride`` (a centre may move half a cell beyond its own, to a neighbour's: why the
    assigner also nominates neighbours), ``wh = (2 sigmoid(t))^2 * anchor`` (at most 4 anchors:
    why ``anchor_t`` is 4)."""
    xy = (raw[..., :2].sigmoid() * 2 - 0.5 + cells) * strides.unsqueeze(-1)
    wh = (raw[..., 2:4].sigmoid() * 2) ** 2 * anchor_wh
    return torch.cat([xy, wh], dim=-1)


def find_3_positive(
    gt: Tensor, anchors: Tensor, grid_w: int, grid_h: int, anchor_t: float = 4.0, g: float = 0.5
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level's candidates for boxes ``gt [M, 4]`` ``(cx, cy, w, h)`` and ``anchors [na, 2]``,
    both in that level's cells. An anchor is kept for a box when ``max(r, 1/r) < anchor_t`` for
    both its width and height ratios ``r``; it then nominates the centre cell, the left or right
    neighbour (whichever side of the cell's middle the centre lies, and not past the grid's first
    or last cell), and the upper or lower one likewise.

    Returns ``(box index, anchor index, row gj, column gi)``, one entry per nomination, in
    yolov7's order (offset, then anchor, then box).
    """
    empty = gt.new_zeros(0, dtype=torch.long)
    if gt.shape[0] == 0:
        return empty, empty, empty, empty
    ratio = gt[None, :, 2:4] / anchors[:, None]  # [na, M, 2]
    fits = torch.max(ratio, 1 / ratio).max(2).values < anchor_t
    anchor_idx, box_idx = fits.nonzero(as_tuple=True)
    gxy = gt[box_idx, :2]
    gxi = gxy.new_tensor([grid_w, grid_h]) - gxy
    left, up = ((gxy % 1 < g) & (gxy > 1)).T
    right, down = ((gxi % 1 < g) & (gxi > 1)).T
    mask = torch.stack([torch.ones_like(left), left, up, right, down])  # [5, P]
    offset_idx, entry = mask.nonzero(as_tuple=True)
    gij = (gxy[entry] - OFFSETS.to(gt)[offset_idx] * g).long()
    gi, gj = gij[:, 0].clamp(0, grid_w - 1), gij[:, 1].clamp(0, grid_h - 1)
    return box_idx[entry], anchor_idx[entry], gj, gi


def yolov7_loss(
    cls_logits: Tensor,
    raw_box: Tensor,
    obj_logits: Tensor,
    gts: list[tuple[Tensor, Tensor]],
    grid: tuple[Tensor, Tensor, Tensor, list[tuple[int, int]]],
    anchors: Tensor,
    strides: tuple[int, ...],
    gains: dict[str, float],
    anchor_t: float = 4.0,
    candidate_k: int = 10,
) -> dict[str, Tensor]:
    """``{"box", "obj", "cls"}`` for ``core``'s outputs and per image ``(boxes (cx, cy, w, h) in
    input pixels, labels)``; ``grid`` from ``anchor_grid``, ``anchors [L, na, 2]`` in pixels."""
    cells, level_strides, anchor_wh, shapes = grid
    batch, _, num_classes = cls_logits.shape
    na = anchors.shape[1]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + na * h * w)
    pos_img, pos_loc, pos_box, pos_label = [], [], [], []
    for b, (gt, labels) in enumerate(gts):
        if gt.shape[0] == 0:
            continue
        flat = []
        for i, (h, w) in enumerate(shapes):
            s = strides[i]
            _, a, gj, gi = find_3_positive(gt / s, anchors[i] / s, w, h, anchor_t)
            flat.append(starts[i] + a * h * w + gj * w + gi)
        loc = torch.cat(flat)
        if loc.numel() == 0:
            continue
        with torch.no_grad():
            pred = decode(raw_box[b, loc], cells[loc], level_strides[loc], anchor_wh[loc])
            cost, ious = ota_cost(
                cls_logits[b, loc],
                obj_logits[b, loc, 0],
                box_convert(pred, "cxcywh", "xyxy"),
                box_convert(gt, "cxcywh", "xyxy"),
                labels,
            )
            matched, _ = dynamic_k_matching(cost, ious, candidate_k)
        fg = matched >= 0
        pos_img.append(torch.full((int(fg.sum()),), b, dtype=torch.long, device=loc.device))
        pos_loc.append(loc[fg])
        pos_box.append(gt[matched[fg]])
        pos_label.append(labels[matched[fg]])

    zero = raw_box.sum() * 0  # keeps every output in the graph when a level has no positive
    loss_box, loss_obj, loss_cls = zero, zero, zero
    if pos_loc:
        img, loc = torch.cat(pos_img), torch.cat(pos_loc)
        tbox, tlabel = torch.cat(pos_box), torch.cat(pos_label)
    for i in range(len(shapes)):
        lo, hi = starts[i], starts[i + 1]
        tobj = torch.zeros_like(obj_logits[:, lo:hi, 0])  # one per level: BCE keeps its target
        if pos_loc:
            sel = (loc >= lo) & (loc < hi)
            if sel.any():
                bi, li = img[sel], loc[sel]
                pred = decode(raw_box[bi, li], cells[li], level_strides[li], anchor_wh[li])
                ciou_loss = complete_box_iou_loss(
                    box_convert(pred, "cxcywh", "xyxy"), box_convert(tbox[sel], "cxcywh", "xyxy")
                )
                loss_box = loss_box + ciou_loss.mean()
                tobj[bi, li - lo] = (1 - ciou_loss).detach().clamp(min=0).to(tobj.dtype)
                if num_classes > 1:
                    onehot = F.one_hot(tlabel[sel], num_classes).to(cls_logits.dtype)
                    loss_cls = loss_cls + F.binary_cross_entropy_with_logits(cls_logits[bi, li], onehot)
        obj_level = F.binary_cross_entropy_with_logits(obj_logits[:, lo:hi, 0], tobj)
        loss_obj = loss_obj + BALANCE[i] * obj_level
    return {"box": gains["box"] * loss_box, "obj": gains["obj"] * loss_obj, "cls": gains["cls"] * loss_cls}
