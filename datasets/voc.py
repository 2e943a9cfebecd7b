"""PASCAL VOC detection data: a ``VOCdevkit`` with ``VOC2007`` and/or ``VOC2012``, 20 classes.

Each year folder holds ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/<split>.txt``. The protocols the detection literature uses (DCODP included) are
selectable by ``protocol``:

* ``"07+12"``: train on VOC2007 trainval + VOC2012 trainval, evaluate on VOC2007 test;
* ``"07"``: train on VOC2007 trainval, evaluate on VOC2007 test;
* ``"12"``: train on VOC2012 train, evaluate on VOC2012 val (VOC2012's test labels are private).

``difficult`` objects never reach the training targets; they go to ``ignore_boxes`` and to
``difficult``, and evaluation counts a detection on one as neither true nor false positive
(VOC's rule, ``datasets.voc_eval``; in the COCO-style ground truth they are crowd boxes).
``truncated`` objects are kept. Boxes become continuous ``(xmin - 1, ymin - 1, xmax, ymax)``,
VOC's 1-based inclusive pixel indices (torchvision's and MMDetection's reading). Image ids are
positions in the sorted (year, name) list: VOC2012 reuses VOC2007-style names, so names alone
do not make unique numbers.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
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
    coco_ground_truth,
    quiet_coco,
)
from datasets.registry import register_dataset
from datasets.voc_eval import voc_metrics

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
# (year, image set) per split of each protocol
PROTOCOLS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "07+12": {"train": (("2007", "trainval"), ("2012", "trainval")), "val": (("2007", "test"),)},
    "07": {"train": (("2007", "trainval"),), "val": (("2007", "test"),)},
    "12": {"train": (("2012", "train"),), "val": (("2012", "val"),)},
}


def _text(node: ET.Element, tag: str, path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{path}: {where} has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, where: str) -> float:
    token = _text(node, tag, path, where)
    try:
        value = float(token)
    except ValueError:
        raise DatasetError(f"{path}: {where}: <{tag}> is not a number: {token!r}") from None
    if not math.isfinite(value):
        raise DatasetError(f"{path}: {where}: <{tag}> is not finite: {token!r}")
    return value


def parse_annotation(
    path: Path, classes: tuple[str, ...]
) -> tuple[list[tuple[float, ...]], list[int], list[bool], tuple[int, int] | None]:
    """``(boxes, labels, difficult, (width, height) or None)`` of one VOC XML file.

    Every object is checked; a missing ``<bndbox>``, a coordinate that is not a number, ``xmax <
    xmin``, or a class outside ``classes`` is a DatasetError naming the file and the object.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: malformed XML: {exc}") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read annotation: {exc}") from None
    size = None
    size_node = root.find("size")
    if size_node is not None and size_node.find("width") is not None:
        width, height = (int(_number(size_node, t, path, "<size>")) for t in ("width", "height"))
        size = (width, height) if width > 0 and height > 0 else None  # some VOC2012 files say 0
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.iter("object"), start=1):
        where = f"object {k}"
        name = _text(obj, "name", path, where)
        if name not in classes:
            raise DatasetError(f"{path}: {where}: unknown class {name!r}; known: {', '.join(classes)}")
        where = f"object {k} ({name})"
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetError(f"{path}: {where} has no <bndbox>")
        x1, y1, x2, y2 = (_number(bndbox, t, path, where) for t in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise DatasetError(
                f"{path}: {where}: box has xmax < xmin or ymax < ymin: ({x1}, {y1}, {x2}, {y2})"
            )
        flag = obj.find("difficult")
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        labels.append(classes.index(name))
        difficult.append(flag is not None and (flag.text or "0").strip() == "1")
    return boxes, labels, difficult, size


def _image_set(year_root: Path, image_set: str) -> list[str]:
    path = year_root / "ImageSets" / "Main" / f"{image_set}.txt"
    try:
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: VOC image set not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read image set: {exc}") from None


class VocDetection(DetectionDataset):
    """One split of a VOC protocol under ``root`` (the ``VOCdevkit`` folder).

    ``difficult[image_id] = (boxes, labels)``: the difficult objects, for VOC's evaluation.
    """

    metric = "ap50"

    def __init__(
        self,
        root: str | Path,
        split: str,
        protocol: str = "07+12",
        classes: tuple[str, ...] = CLASSES,
        transform: Transform | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise DatasetError(f"unknown VOC protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        self.root, self.split, self.protocol, self.transform = Path(root), split, protocol, transform
        self.classes = list(classes)
        self.category_ids = list(range(1, len(classes) + 1))
        entries = []
        for year, image_set in PROTOCOLS[protocol][split]:
            year_root = self.root / f"VOC{year}"
            if not year_root.is_dir():
                raise DatasetError(f"{year_root}: VOC directory not found (protocol {protocol})")
            entries += [(year_root, name) for name in _image_set(year_root, image_set)]
        self.records, self.difficult = [], {}
        check = len(entries) <= HEADER_CHECK_LIMIT
        for image_id, (year_root, name) in enumerate(entries, start=1):
            xml, image = year_root / "Annotations" / f"{name}.xml", year_root / "JPEGImages" / f"{name}.jpg"
            if not xml.is_file():
                raise DatasetError(f"{xml}: annotation of image set entry {name!r} not found")
            if not image.is_file():
                raise DatasetError(f"{image}: image of image set entry {name!r} not found")
            boxes, labels, difficult, size = parse_annotation(xml, tuple(classes))
            if check:
                size = check_header(image, size)
            hard = np.asarray(difficult, bool)
            boxes_, labels_ = boxes_array(boxes), np.asarray(labels, dtype=np.int64)
            self.records.append(
                ImageRecord(image_id, image, boxes_[~hard], labels_[~hard], boxes_[hard], size)
            )
            self.difficult[image_id] = (boxes_[hard], labels_[hard])
        self.coco = quiet_coco(self._coco_dataset())

    def _coco_dataset(self) -> dict[str, Any]:
        """COCO-form ground truth for pycocotools; difficult objects are crowd boxes of their class
        (COCOeval ignores detections on them, the nearest it has to VOC's rule)."""

        def objects(rec: ImageRecord) -> Iterator[tuple[np.ndarray, int, int]]:
            hard_boxes, hard_labels = self.difficult[rec.image_id]
            rows = [(b, lab, 0) for b, lab in zip(rec.boxes, rec.labels, strict=True)]
            rows += [(b, lab, 1) for b, lab in zip(hard_boxes, hard_labels, strict=True)]
            for box, label, crowd in rows:
                yield box, self.category_ids[int(label)], crowd

        return coco_ground_truth(self, objects)

    def extra_metrics(self, detections: list[dict[str, Any]]) -> dict[str, Any]:
        """VOC's own AP at IoU 0.5 (both definitions, per class and mean) of COCO result records."""
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        dets = [(d["image_id"], label_of[d["category_id"]], d["score"], _xyxy(d["bbox"])) for d in detections]
        truth = {}
        for rec in self.records:
            hard_boxes, hard_labels = self.difficult[rec.image_id]
            boxes = np.concatenate([rec.boxes, hard_boxes])
            labels = np.concatenate([rec.labels, hard_labels])
            flags = np.concatenate([np.zeros(len(rec.boxes), bool), np.ones(len(hard_boxes), bool)])
            truth[rec.image_id] = (boxes, labels, flags)
        return voc_metrics(dets, truth, self.classes)

    def __repr__(self) -> str:
        return f"VocDetection({self.root}, {self.protocol} {self.split}, {len(self)} images)"


def _xyxy(bbox: list[float]) -> np.ndarray:
    x, y, w, h = bbox
    return np.array([x, y, x + w, y + h], float)


@register_dataset("voc", {"protocol": "07+12"})
def _voc(split: str, root: Path, transform: Transform | None, protocol: str) -> VocDetection:
    voc = VocDetection(root, split, protocol, transform=transform)
    voc.table_name = f"voc-{protocol}"  # the protocols are different benchmarks
    return voc
