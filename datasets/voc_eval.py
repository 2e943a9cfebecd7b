"""PASCAL VOC's detection AP at IoU 0.5: the VOC2007 11-point and the VOC2010+ area definitions.

This is the devkit's ``VOCevalDet`` (and its Python port ``voc_eval.py``) restated on arrays:
per class, detections are taken in decreasing score; each is matched to the unclaimed ground-truth
box of its image with the largest IoU; IoU > 0.5 with a non-difficult box is a true positive
(a second detection of a claimed box is a false positive); the best match being ``difficult``
makes the detection count as neither; below 0.5 it is a false positive. Recall is over the
non-difficult boxes only. Boxes here are continuous ``xyxy``: the loader maps VOC's 1-based
inclusive pixel indices to ``(xmin - 1, ymin - 1, xmax, ymax)``, for which the continuous IoU
equals the devkit's ``+1`` one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class ClassAP:
    """One class's result: both AP definitions, and the curve they were read from."""

    ap: float  # area under the interpolated precision envelope (VOC2010 and later)
    ap11: float  # mean interpolated precision at recall 0, 0.1, ..., 1 (VOC2007)
    recall: np.ndarray
    precision: np.ndarray
    num_positives: int  # non-difficult ground-truth boxes


def average_precision(recall: np.ndarray, precision: np.ndarray, eleven_point: bool) -> float:
    """AP of one precision/recall curve (detections in decreasing score order).

    ``eleven_point``: the mean over ``t = 0, 0.1, ..., 1`` of the largest precision at recall
    ``>= t`` (0 where recall never reaches ``t``). Otherwise the area under the precision envelope
    (each precision raised to the largest one at any higher recall), summed where recall changes.
    """
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if eleven_point:
        points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the envelope: max precision at this recall or more
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``xyxy`` box with each of ``boxes [K, 4]``."""
    wh = np.clip(np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(float).eps)


def class_ap(
    detections: Iterable[tuple[int, float, np.ndarray]],
    ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = IOU_THRESHOLD,
) -> ClassAP:
    """AP of one class. ``detections``: ``(image_id, score, xyxy box)``; ``ground_truth``:
    ``image_id -> (boxes [K, 4], difficult [K] bool)`` of this class (absent: no box there).

    Ties in score keep the detections' given order (a stable sort), as the devkit's does."""
    dets = sorted(detections, key=lambda d: -d[1])
    claimed = {i: np.zeros(len(b), bool) for i, (b, _) in ground_truth.items()}
    num_positives = int(sum(int((~np.asarray(d, bool)).sum()) for _, d in ground_truth.values()))
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for k, (image_id, _, box) in enumerate(dets):
        boxes, difficult = ground_truth.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(boxes) == 0:
            fp[k] = 1
            continue
        ious = box_iou(np.asarray(box, float), np.asarray(boxes, float))
        j = int(ious.argmax())
        if ious[j] <= iou_threshold:
            fp[k] = 1
        elif difficult[j]:
            continue  # neither: a difficult box may be found, and need not be
        elif not claimed[image_id][j]:
            tp[k], claimed[image_id][j] = 1, True
        else:
            fp[k] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / num_positives if num_positives else np.full_like(tp, math.nan)
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    if num_positives == 0:
        return ClassAP(math.nan, math.nan, recall, precision, 0)
    return ClassAP(
        average_precision(recall, precision, eleven_point=False),
        average_precision(recall, precision, eleven_point=True),
        recall,
        precision,
        num_positives,
    )


def voc_metrics(
    detections: Iterable[tuple[int, int, float, np.ndarray]],
    ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    classes: list[str],
) -> dict[str, object]:
    """Per-class and mean AP of both definitions.

    ``detections``: ``(image_id, label, score, xyxy)``; ``ground_truth``: ``image_id -> (boxes,
    labels, difficult)``, difficult boxes included. The means are over the classes that have a
    non-difficult box (a class with none has no AP: NaN, left out of the mean).
    """
    by_class: list[list[tuple[int, float, np.ndarray]]] = [[] for _ in classes]
    for image_id, label, score, box in detections:
        by_class[int(label)].append((int(image_id), float(score), np.asarray(box, float)))
    per_class: dict[str, dict[str, float]] = {}
    for label, name in enumerate(classes):
        truth = {}
        for image_id, (boxes, labels, difficult) in ground_truth.items():
            mine = np.asarray(labels) == label
            if mine.any():
                truth[image_id] = (np.asarray(boxes, float)[mine], np.asarray(difficult, bool)[mine])
        result = class_ap(by_class[label], truth)
        per_class[name] = {"ap": result.ap, "ap11": result.ap11}
    scored = [v for v in per_class.values() if not math.isnan(v["ap"])]
    mean = {key: float(np.mean([v[key] for v in scored])) if scored else math.nan for key in ("ap", "ap11")}
    return {"voc_ap": mean["ap"], "voc_ap11": mean["ap11"], "per_class": per_class}
