"""COCO-format detection data (``instances_*.json`` + an image folder), read with pycocotools.

Category ids are mapped to contiguous labels ``0..C-1`` in ascending id order; ``category_ids``
maps back for evaluation. Crowd annotations go to ``ignore_boxes`` (COCOeval ignores detections on
them, so training must not treat them as objects); degenerate boxes are skipped as COCO does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from datasets.base import (
    HEADER_CHECK_LIMIT,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    Transform,
    boxes_array,
    check_header,
    quiet_coco,
)
from datasets.registry import register_dataset


def _read_json(path: Path) -> dict[str, Any]:
    """Load the annotation file, turning every failure into one line naming it."""
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with path.open("rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read annotation file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a COCO instances file (no 'images' list)")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DatasetError(f"{path}: not a COCO instances file (no 'categories' list)")
    data.setdefault("annotations", [])
    return data


def _xyxy(ann: dict[str, Any], path: Path) -> tuple[float, float, float, float]:
    """The box as xyxy; a negative width or height, or a coordinate that is not a finite number,
    is an error naming the annotation (COCO's own files have none: such a box is a broken file)."""
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{path}: annotation {ann.get('id')!r} has no valid 'bbox' [x, y, w, h]") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DatasetError(f"{path}: annotation {ann.get('id')!r}: bbox {ann['bbox']} is not finite")
    if w < 0 or h < 0:
        raise DatasetError(
            f"{path}: annotation {ann.get('id')!r}: bbox {ann['bbox']} has a negative width or height"
        )
    return x, y, x + w, y + h


class CocoDetection(DetectionDataset):
    """Images of ``image_dir`` annotated by ``annotation_file``; every image is kept, with or without objects.

    ``coco`` is the pycocotools object over the file as written (original ids), for COCOeval.
    """

    metric = "ap"

    def __init__(
        self, image_dir: str | Path, annotation_file: str | Path, transform: Transform | None = None
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transform = transform
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image directory not found")
        path = self.annotation_file
        data = _read_json(path)
        try:
            self.coco = quiet_coco(data)
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: malformed COCO entry (missing or bad field {exc})") from None

        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self.classes = [str(c.get("name", c["id"])) for c in cats]
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        dangling = set(self.coco.imgToAnns) - set(self.coco.imgs)
        if dangling:
            raise DatasetError(f"{path}: annotations refer to unknown image id {min(dangling, key=str)!r}")
        present = set(os.listdir(self.image_dir))

        self.records = []
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            name = info.get("file_name")
            if not isinstance(name, str):
                raise DatasetError(f"{path}: image {image_id} has no 'file_name'")
            file = self.image_dir / name
            if name not in present and not file.is_file():
                raise DatasetError(f"{path}: image {image_id} file {name!r} not found in {self.image_dir}")
            try:
                size = (int(info["width"]), int(info["height"])) if info.get("width") else None
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{path}: image {image_id} has a bad 'width'/'height'") from None
            if len(self.coco.imgs) <= HEADER_CHECK_LIMIT:
                check_header(file, size)
            boxes, labels, ignore = [], [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                category = ann.get("category_id")
                if category not in label_of:
                    raise DatasetError(f"{path}: annotation {ann.get('id')!r}: bad category_id {category!r}")
                x1, y1, x2, y2 = _xyxy(ann, path)
                if size is not None:  # clip to the image, as the torchvision reference does
                    x1, x2 = min(max(x1, 0.0), size[0]), min(max(x2, 0.0), size[0])
                    y1, y2 = min(max(y1, 0.0), size[1]), min(max(y2, 0.0), size[1])
                if not (x2 > x1 and y2 > y1):
                    continue  # degenerate: COCO's own loaders skip these silently
                if ann.get("iscrowd", 0):
                    ignore.append((x1, y1, x2, y2))
                else:
                    boxes.append((x1, y1, x2, y2))
                    labels.append(label_of[ann["category_id"]])
            self.records.append(
                ImageRecord(
                    image_id=int(image_id),
                    path=file,
                    boxes=boxes_array(boxes),
                    labels=np.asarray(labels, dtype=np.int64),
                    ignore_boxes=boxes_array(ignore),
                    size=size,
                )
            )

    def __repr__(self) -> str:
        return f"CocoDetection({self.annotation_file}, {len(self)} images, {len(self.classes)} classes)"


@register_dataset("coco", {"year": "2017"})
def _coco(split: str, root: Path, transform: Transform | None, year: str) -> CocoDetection:
    """COCO as published: ``<root>/<split><year>/``, ``<root>/annotations/instances_<split><year>.json``."""
    return CocoDetection(
        root / f"{split}{year}", root / "annotations" / f"instances_{split}{year}.json", transform
    )
