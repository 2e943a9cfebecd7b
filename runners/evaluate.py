"""mAP with pycocotools' COCOeval on the dataset's own COCO ground truth (DESIGN.md §6), plus the
dataset's own metrics where it defines them (VOC: per-class AP at IoU 0.5, 11-point and area)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from datasets.base import DetectionDataset
from detectors.base import Detector
from methods.engine.training import collate

METRICS = ("map", "ap50", "ap75", "aps", "apm", "apl")


def coco_metrics(coco_gt: COCO, detections: list[dict[str, Any]]) -> dict[str, float]:
    """COCOeval's first six stats; -1 (no ground truth in that size range) becomes NaN."""
    if not detections:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        name: (float(v) if v >= 0 else math.nan) for name, v in zip(METRICS, evaluator.stats[:6], strict=True)
    }


def to_coco_detections(
    predictions: list[dict[str, torch.Tensor]], image_ids: list[int], category_ids: list[int]
) -> list[dict[str, Any]]:
    """xyxy boxes and contiguous labels -> COCO result records (xywh, original category ids)."""
    records = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        boxes = pred["boxes"].detach().cpu().double()
        for (x1, y1, x2, y2), score, label in zip(
            boxes.tolist(), pred["scores"].tolist(), pred["labels"].tolist(), strict=True
        ):
            records.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_ids[int(label)]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return records


@torch.no_grad()
def evaluate(
    model: Detector, dataset: DetectionDataset, batch_size: int = 16, progress: bool = True
) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    records: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        predictions = model.predict([im.to(device) for im in images])
        image_ids = [int(t["image_id"]) for t in targets]
        records += to_coco_detections(predictions, image_ids, dataset.category_ids)
    metrics = coco_metrics(dataset.coco, records)
    extra = getattr(dataset, "extra_metrics", None)
    if extra is not None:  # VOC: {"voc_ap", "voc_ap11", "per_class": {name: {"ap", "ap11"}}}
        voc = extra(records)
        metrics |= {"voc_ap": voc["voc_ap"], "voc_ap11": voc["voc_ap11"]}
        metrics["per_class_ap"] = json.dumps(voc["per_class"], sort_keys=True)
    return metrics
