"""What the detector families share, in one place (as torchvision's ``models/detection/_utils.py``).

The families are written from their papers' code, and the papers' code shares more than its
authors' repositories show: YOLOv7 and YOLOv8 build on YOLOX's Conv-BN-SiLU and BatchNorm
constants, YOLOv7's assigner is SimOTA's dynamic-k matching, YOLOv8's box branch is GFL's
distribution, and every letterboxing family post-processes the same way. Each family file imports
from here, never from another family, so a family reads as its own network and nothing else:

* the size checks every builder makes (a size of the family's table, an input size its strides
  divide);
* ``BaseConv`` and its BatchNorm constants;
* ``letterbox`` and its inverse, and the predict tail after it: class-aware NMS, the top
  ``detections_per_img``, boxes mapped back to each image's pixels (``detections``), with
  YOLOX's and YOLOv7's best-class scoring over a ``score_thresh`` in front (``best_class_detections``);
* SimOTA's cost and dynamic-k matching (YOLOX, YOLOv7);
* DFL's integral and loss (GFL, YOLOv8).

``base.py`` stays the contract and the registry: this module depends on it, never the reverse.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import batched_nms, box_convert, box_iou, nms

from .base import Detector, DetectorError

BN_EPS, BN_MOMENTUM = 1e-3, 0.03  # YOLOX's init_yolo, yolov7's initialize_weights, Ultralytics
PAD_VALUE = 114 / 255  # the YOLO letterbox grey (YOLOX, YOLOv7, Ultralytics)


# -- the size checks -----------------------------------------------------------------------------


def check_size(size: str, sizes: Collection[str]) -> None:
    """Refuse a size the family's table does not name, listing the ones it does."""
    if size not in sizes:
        raise DetectorError(f"unknown size '{size}'; known: {', '.join(sizes)}")


def check_input_size(name: str, input_size: int, divisor: int = 32) -> None:
    """Refuse an input size the deepest stride does not divide: the top-down merges of the
    YOLO necks concatenate an upsampled map with the next one, which must then have twice its size."""
    if input_size % divisor:
        raise DetectorError(f"{name} needs an input size divisible by {divisor}, got {input_size}")


# -- the conv block ------------------------------------------------------------------------------


class BaseConv(nn.Module):
    """Conv (same padding, no bias) -> BatchNorm -> SiLU: every conv of YOLOX and YOLOv8 but the
    predictors (Ultralytics' ``Conv`` is the same block)."""

    def __init__(self, cin: int, cout: int, ksize: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ksize, stride, (ksize - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


# -- letterbox and its inverse -------------------------------------------------------------------


def letterbox(images: list[Tensor], size: int, pad: float = 0.0) -> tuple[Tensor, list[float]]:
    """Resize each image by ``min(size / H, size / W)`` and pad it, top-left, to ``size x size``.

    The pure-PyTorch detectors (YOLOX, YOLOF, ...) preprocess this way: a box scales by the
    returned factor, which is the mapping LDT assumes (``methods.ldt.map_instances``).
    """
    batch = images[0].new_full((len(images), 3, size, size), pad)
    scales = []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        scale = min(size / h, size / w)
        nh, nw = min(size, round(h * scale)), min(size, round(w * scale))
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        batch[i, :, :nh, :nw] = image
        scales.append(scale)
    return batch, scales


def centred_placement(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where Ultralytics' ``LetterBox(new_shape=size, auto=False)`` puts an ``h x w`` image:
    resized by ``r = min(size / h, size / w)`` to ``round(w r) x round(h r)`` and centred, the
    left and top padding ``round(d / 2 - 0.1)`` of the ``d`` pixels to fill (Ultralytics'
    rounding). Returns ``(new_h, new_w, left, top)``."""
    r = min(size / h, size / w)
    nh, nw = max(round(h * r), 1), max(round(w * r), 1)
    return nh, nw, round((size - nw) / 2 - 0.1), round((size - nh) / 2 - 0.1)


def letterbox_centered(
    images: list[Tensor], size: int, pad: float = PAD_VALUE
) -> tuple[Tensor, list[tuple[float, float]], list[tuple[float, float]]]:
    """Ultralytics' letterbox (``centred_placement``). Returns the batch, each image's scale per
    axis ``(x, y)`` (the resized side over the original: what Ultralytics' ``scale_boxes``
    divides by) and its ``(left, top)`` offset in the batch."""
    batch = images[0].new_full((len(images), 3, size, size), pad)
    scales, offsets = [], []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        nh, nw, left, top = centred_placement(h, w, size)
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        batch[i, :, top : top + nh, left : left + nw] = image
        scales.append((nw / w, nh / h))
        offsets.append((float(left), float(top)))
    return batch, scales, offsets


def xyxy(pair: float | tuple[float, float], like: Tensor) -> Tensor:
    """A scale or offset, one value or ``(x, y)``, as the ``[4]`` factor of xyxy boxes."""
    x, y = (pair, pair) if isinstance(pair, int | float) else pair
    return like.new_tensor([x, y, x, y])


def letterboxed_targets(
    targets: list[dict[str, Tensor]], scales: list[float], like: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """Per image, its boxes in letterboxed pixels as ``(cx, cy, w, h)`` and their labels, on
    ``like``'s device and dtype; boxes without area are dropped (no location can match them)."""
    gts = []
    for target, scale in zip(targets, scales, strict=True):
        gt = box_convert(target["boxes"].to(like) * scale, "xyxy", "cxcywh")
        valid = (gt[:, 2] > 0) & (gt[:, 3] > 0)
        gts.append((gt[valid], target["labels"][valid].to(like.device)))
    return gts


def unletterbox(
    boxes: Tensor, scale: float | tuple[float, float], image: Tensor, offset: tuple[float, float] = (0.0, 0.0)
) -> Tensor:
    """The inverse of ``letterbox`` (or, with its per-axis scale and ``offset``,
    ``letterbox_centered``) for xyxy boxes: back to ``image``'s pixels, clamped to it."""
    h, w = image.shape[-2:]
    boxes = (boxes - xyxy(offset, boxes)) / xyxy(scale, boxes)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes


# -- the predict tail ----------------------------------------------------------------------------


def detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    image: Tensor,
    scale: float | tuple[float, float],
    nms_thresh: float,
    detections_per_img: int,
    offset: tuple[float, float] = (0.0, 0.0),
    class_offset: float | None = None,
) -> dict[str, Tensor]:
    """One image's candidates (xyxy in letterboxed pixels, already over the score threshold) ->
    its detections: class-aware NMS at ``nms_thresh``, the best ``detections_per_img``, boxes in
    the image's own pixels (``offset``: where a centred letterbox put the image; ``class_offset``:
    Ultralytics' NMS, whose ties break as its own do, instead of torchvision's ``batched_nms``)."""
    if class_offset is None:
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    else:  # Ultralytics' way: each class's boxes moved apart by a fixed offset, then one NMS
        keep = nms(boxes + labels[:, None].to(boxes) * class_offset, scores, nms_thresh)[:detections_per_img]
    boxes = unletterbox(boxes[keep], scale, image, offset)
    return {"boxes": boxes, "scores": scores[keep], "labels": labels[keep]}


def best_class_detections(
    boxes: Tensor,
    cls_logits: Tensor,
    obj_logits: Tensor,
    images: list[Tensor],
    scales: list[float],
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
) -> list[dict[str, Tensor]]:
    """YOLOX's and YOLOv7's post-processing: each location keeps its best class, scored
    ``sigmoid(obj) * sigmoid(cls)``, and is a candidate when that is at least ``score_thresh``.
    ``boxes [B, A, 4]`` xyxy, ``cls_logits [B, A, C]``, ``obj_logits [B, A, 1]``."""
    class_scores, labels = cls_logits.sigmoid().max(-1)
    scores = class_scores * obj_logits.squeeze(-1).sigmoid()
    results = []
    for b, (image, scale) in enumerate(zip(images, scales, strict=True)):
        keep = scores[b] >= score_thresh
        results.append(
            detections(
                boxes[b][keep], scores[b][keep], labels[b][keep], image, scale, nms_thresh, detections_per_img
            )
        )
    return results


class LetterboxDetector(Detector):
    """A YOLO-style detector: letterboxed input (YOLO's grey pad) and NMS post-processing.

    What YOLOX, YOLOv7 and YOLOv8 take alike lives here once: the size checks, and the
    post-processing options ``score_thresh``, ``nms_thresh`` and ``detections_per_img``, with the
    defaults in ``postprocessing`` (a family whose reference code differs declares its own). A
    family's constructor names only its own options and hands these on as keywords."""

    family: ClassVar[str] = ""
    sizes: ClassVar[Collection[str]] = ()
    # YOLOX's and YOLOv7's NMS IoU and detection count; their code scores at 0.01 and 0.001 for a
    # leaderboard's mAP, the harness at 0.05 (pass score_thresh to match them); YOLOv8 has its own
    postprocessing: ClassVar[dict[str, float]] = {
        "score_thresh": 0.05,
        "nms_thresh": 0.65,
        "detections_per_img": 100,
    }

    def __init__(self, num_classes: int, size: str, input_size: int, **postprocessing: float) -> None:
        super().__init__()
        check_size(size, self.sizes)
        check_input_size(self.family, input_size)
        unknown = sorted(set(postprocessing) - set(self.postprocessing))
        if unknown:  # a TypeError, as for any other option the builder does not take
            names = ", ".join(unknown)
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {names}")
        options = {**self.postprocessing, **postprocessing}
        self.num_classes, self.input_size = num_classes, input_size
        self.score_thresh, self.nms_thresh = options["score_thresh"], options["nms_thresh"]
        self.detections_per_img = options["detections_per_img"]

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return letterbox(images, self.input_size, PAD_VALUE)[0]


class ObjectnessDetector(LetterboxDetector):
    """YOLOX's and YOLOv7's inference: ``core`` gives ``(cls [B, A, C], box [B, A, 4], obj [B, A, 1])``
    and a location scores ``sigmoid(obj) * its best sigmoid(cls)``; the families differ only in
    how they decode a box (``boxes``)."""

    def boxes(self, raw_box: Tensor, x: Tensor) -> Tensor:
        """``raw_box`` of the letterboxed batch ``x`` -> ``[B, A, 4]`` xyxy in its pixels."""
        raise TypeError(f"{type(self).__name__} does not define boxes()")

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Score = sigmoid(obj) * best sigmoid(cls); threshold, class-aware NMS, top detections,
        boxes mapped back to each image's pixels. Leaves the model in eval mode."""
        self.eval()
        x, scales = letterbox(images, self.input_size, PAD_VALUE)
        cls_logits, raw_box, obj_logits = self.core(x)
        return best_class_detections(
            self.boxes(raw_box, x), cls_logits, obj_logits, images, scales,
            self.score_thresh, self.nms_thresh, self.detections_per_img,
        )  # fmt: skip


# -- SimOTA (YOLOX; YOLOv7's ComputeLossOTA) -------------------------------------------------------


def ota_cost(
    cls_logits: Tensor, obj_logits: Tensor, pred_xyxy: Tensor, gt_xyxy: Tensor, gt_labels: Tensor
) -> tuple[Tensor, Tensor]:
    """``(cost [M, P], IoU [M, P])`` of boxes against candidates: the BCE of the joint score
    ``sqrt(sigmoid(cls) * sigmoid(obj))`` against the box's one-hot class, summed over classes,
    plus ``3 * -log(IoU + 1e-8)``. ``cls_logits [P, C]``, ``obj_logits [P]``."""
    ious = box_iou(gt_xyxy, pred_xyxy)
    joint = (cls_logits.float().sigmoid() * obj_logits.float().sigmoid()[:, None]).sqrt()
    onehot = F.one_hot(gt_labels, cls_logits.shape[1]).float()
    num_gt, num_pred = ious.shape
    cls_cost = F.binary_cross_entropy(
        joint.unsqueeze(0).expand(num_gt, -1, -1),
        onehot.unsqueeze(1).expand(-1, num_pred, -1),
        reduction="none",
    ).sum(-1)
    return cls_cost + 3.0 * -torch.log(ious + 1e-8), ious


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


# -- DFL (GFL; YOLOv8's box branch) --------------------------------------------------------------


def integral(logits: Tensor) -> Tensor:
    """``Σ_i softmax(logits)_i · i`` over the last dim (size n + 1): the expected distance."""
    support = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return (logits.softmax(dim=-1) * support).sum(dim=-1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL per row of ``logits`` ``[K, n + 1]`` for continuous targets ``[K]`` in ``[0, n)``.

    Cross-entropy to the two integers around the target, each weighted by its nearness.
    """
    left = target.floor().long()
    right = left + 1
    weight_left = right.to(target.dtype) - target
    weight_right = target - left.to(target.dtype)
    return (
        F.cross_entropy(logits, left, reduction="none") * weight_left
        + F.cross_entropy(logits, right, reduction="none") * weight_right
    )
