"""COCOeval wiring: ground truth fed back as predictions scores AP = 1.0."""

from __future__ import annotations

import math

import pytest
import torch
from pycocotools.coco import COCO

from runners.evaluate import coco_metrics, to_coco_detections


def _gt() -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [5, 5, 60, 70], "area": 4200, "iscrowd": 0},
        ],
    }
    coco.createIndex()
    return coco


def _predictions(shift: float = 0.0) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[10.0 + shift, 10.0, 30.0 + shift, 40.0], [50.0, 50.0, 90.0, 90.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 1]),
        },
        {
            "boxes": torch.tensor([[5.0, 5.0, 65.0, 75.0]]),
            "scores": torch.tensor([0.7]),
            "labels": torch.tensor([1]),
        },
    ]


def test_ground_truth_as_predictions_scores_one() -> None:
    records = to_coco_detections(_predictions(), [1, 2], category_ids=[3, 7])
    assert records[0]["bbox"] == [10.0, 10.0, 20.0, 30.0] and records[0]["category_id"] == 3
    metrics = coco_metrics(_gt(), records)
    for name in ("map", "ap50", "ap75", "aps", "apm", "apl"):
        assert math.isnan(metrics[name]) or metrics[name] == pytest.approx(1.0, abs=1e-9), name
    assert metrics["map"] == pytest.approx(1.0, abs=1e-9)


def test_shifted_and_missing_predictions_score_less() -> None:
    shifted = coco_metrics(_gt(), to_coco_detections(_predictions(shift=8.0), [1, 2], [3, 7]))
    assert shifted["map"] < 1.0
    assert coco_metrics(_gt(), [])["map"] == 0.0
