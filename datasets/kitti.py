"""KITTI 2D object data (``training/image_2/*.png`` + ``training/label_2/*.txt``), three classes.

KITTI ships no validation split, so one is drawn here: a permutation of the sorted image ids by
``numpy.random.default_rng(seed)``, the first ``1 - val_fraction`` of it for training. Car,
Pedestrian and Cyclist are the classes (the LDT paper's convention); DontCare regions become
``ignore_boxes`` and crowd annotations of every category in ``coco``, so COCOeval does not count
detections there as false positives; every other type is dropped entirely.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from datasets.base import (
    DatasetError,
    DetectionDataset,
    ImageRecord,
    Transform,
    boxes_array,
    check_header,
    coco_ground_truth,
    quiet_coco,
)
from datasets.registry import register_dataset

CLASSES = ["Car", "Pedestrian", "Cyclist"]
IGNORED_TYPES = frozenset({"Van", "Truck", "Person_sitting", "Tram", "Misc"})
DONT_CARE = "DontCare"
KNOWN_TYPES = frozenset(CLASSES) | IGNORED_TYPES | {DONT_CARE}
SPLIT_DEFAULTS = {"split_seed": 0, "val_fraction": 0.2}  # the drawn validation split's options
FIELDS = "type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry score".split()

Box = tuple[float, float, float, float]


def parse_label_file(path: Path) -> tuple[list[Box], list[int], list[Box]]:
    """``(boxes, labels, dontcare_boxes)`` of one label file; any bad line is a DatasetError ``file:line``.

    Every line is checked in full, also for types that are then dropped: a corrupt line means a
    corrupt file. Zero-area boxes are kept out of the targets, as degenerate COCO boxes are.
    """
    boxes: list[Box] = []
    labels: list[int] = []
    dont_care: list[Box] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read label file: {exc}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) not in (15, 16):
            raise DatasetError(f"{where}: expected 15 fields (16 with a score), got {len(fields)}")
        kind = fields[0]
        if kind not in KNOWN_TYPES:
            known = ", ".join(sorted(KNOWN_TYPES))
            raise DatasetError(f"{where}: unknown object type {kind!r}; known: {known}")
        values = []
        for name, token in zip(FIELDS[1:], fields[1:], strict=False):
            try:
                values.append(float(token))
            except ValueError:
                raise DatasetError(f"{where}: field '{name}' is not a number: {token!r}") from None
        x1, y1, x2, y2 = values[3:7]
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise DatasetError(f"{where}: box ({x1}, {y1}, {x2}, {y2}) is not finite")
        if x2 < x1 or y2 < y1:
            raise DatasetError(f"{where}: box has x2 < x1 or y2 < y1: ({x1}, {y1}, {x2}, {y2})")
        if x2 == x1 or y2 == y1:
            continue
        if kind == DONT_CARE:
            dont_care.append((x1, y1, x2, y2))
        elif kind in CLASSES:
            boxes.append((x1, y1, x2, y2))
            labels.append(CLASSES.index(kind))
    return boxes, labels, dont_care


def split_ids(ids: list[int], split: str, seed: int = 0, val_fraction: float = 0.2) -> list[int]:
    """The ids of ``split``: a seeded permutation of the sorted ids, first ``1 - val_fraction`` train."""
    if split not in ("train", "val"):
        raise DatasetError(f"unknown KITTI split {split!r}; known: train, val")
    if not 0.0 <= val_fraction <= 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1], got {val_fraction}")
    ordered = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(ordered))
    num_train = len(ordered) - round(len(ordered) * val_fraction)
    chosen = order[:num_train] if split == "train" else order[num_train:]
    return sorted(ordered[i] for i in chosen)


class KittiDetection(DetectionDataset):
    """One split of ``root/training``; images without any object are kept (they count for evaluation)."""

    metric = "ap50"

    def __init__(
        self,
        root: str | Path,
        split: str,
        seed: int = 0,
        val_fraction: float = 0.2,
        transform: Transform | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.classes = list(CLASSES)
        self.category_ids = [1, 2, 3]
        image_dir, label_dir = self.root / "training" / "image_2", self.root / "training" / "label_2"
        for folder in (self.root, image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: KITTI directory not found")
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix == ".png"}
        labels = {p.stem: p for p in label_dir.iterdir() if p.suffix == ".txt"}
        orphans = sorted(labels.keys() - images.keys())
        if orphans:
            raise DatasetError(f"{labels[orphans[0]]}: label file has no image {orphans[0]}.png")
        orphans = sorted(images.keys() - labels.keys())
        if orphans:
            raise DatasetError(f"{images[orphans[0]]}: image has no label file {orphans[0]}.txt")
        by_id: dict[int, str] = {}
        for stem in sorted(labels):
            if not stem.isdigit():
                raise DatasetError(f"{labels[stem]}: KITTI file names must be numeric ids")
            if int(stem) in by_id:
                raise DatasetError(f"{labels[stem]}: image id {int(stem)} is also {by_id[int(stem)]}.txt")
            by_id[int(stem)] = stem
        parsed = {i: parse_label_file(labels[stem]) for i, stem in by_id.items()}  # all: fail early

        self.records = []
        for image_id in split_ids(list(by_id), split, seed, val_fraction):
            path = images[by_id[image_id]]
            boxes, labs, dont_care = parsed[image_id]
            self.records.append(
                ImageRecord(
                    image_id=image_id,
                    path=path,
                    boxes=boxes_array(boxes),
                    labels=np.asarray(labs, dtype=np.int64),
                    ignore_boxes=boxes_array(dont_care),
                    size=check_header(path),
                )
            )
        self.coco = quiet_coco(self._coco_dataset())

    def _coco_dataset(self) -> dict[str, Any]:
        """Ground truth in COCO form; a DontCare box becomes one crowd box per category.

        COCOeval matches crowd regions per category, so a single crowd box would only hide
        detections of its own category.
        """

        def objects(rec: ImageRecord) -> Iterator[tuple[np.ndarray, int, int]]:
            for box, label in zip(rec.boxes, rec.labels, strict=True):
                yield box, self.category_ids[int(label)], 0
            for box in rec.ignore_boxes:
                for category_id in self.category_ids:
                    yield box, category_id, 1

        return coco_ground_truth(self, objects)

    def __repr__(self) -> str:
        return f"KittiDetection({self.root}, split={self.split!r}, {len(self)} images)"


@register_dataset("kitti", SPLIT_DEFAULTS)
def _kitti(
    split: str, root: Path, transform: Transform | None, split_seed: int, val_fraction: float
) -> KittiDetection:
    return KittiDetection(root, split, transform=transform, seed=split_seed, val_fraction=val_fraction)
