"""The sample format every dataset yields (DESIGN.md §3) and the one error type for bad input.

A sample is ``(image, target)``: ``image`` float ``[3, H, W]`` in ``[0, 1]``; ``target`` a dict with
``boxes`` float ``[K, 4]`` xyxy pixels, ``labels`` int64 ``[K]`` in ``0..C-1``, ``image_id`` int and
``ignore_boxes`` float ``[M, 4]`` (crowd / DontCare regions, carried for evaluation only).

Loaders parse every annotation once at construction into :class:`ImageRecord` rows, so that bad
annotations fail before any training starts and ``__getitem__`` only decodes the image.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

Sample = tuple[torch.Tensor, dict[str, Any]]
Transform = Callable[[torch.Tensor, dict[str, Any]], Sample]


class DatasetError(ValueError):
    """Bad dataset input, raised with one line naming the file (and line) at fault."""


@dataclass(frozen=True)
class ImageRecord:
    """One image's parsed annotations; ``size`` is the expected ``(width, height)`` or None."""

    image_id: int
    path: Path
    boxes: np.ndarray  # float32 [K, 4] xyxy
    labels: np.ndarray  # int64 [K]
    ignore_boxes: np.ndarray  # float32 [M, 4] xyxy
    size: tuple[int, int] | None = None


class DetectionDataset(Dataset):
    """Common attributes of every detection dataset in the harness.

    ``classes[label]`` is the name of contiguous label ``label``; ``category_ids[label]`` is the
    original COCO category id of that label in ``coco`` (the ground truth used by COCOeval).
    ``metric`` names the headline number the reporters show: ``"ap"`` (AP@[.5:.95], COCO-style)
    or ``"ap50"`` (AP@0.5, KITTI-style). ``transform(image, target)`` runs after decoding.
    """

    classes: list[str]
    category_ids: list[int]
    coco: COCO
    metric: str
    records: list[ImageRecord]
    transform: Transform | None = None
    # what the result tables call this data when the registry name alone is ambiguous (VOC's
    # protocols: "voc-07+12" and "voc-12" are different benchmarks); None: the registry name
    table_name: str | None = None
    _decoded: dict[int, np.ndarray] | None = None  # see keep_decoded
    _decoded_room: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def keep_decoded(self, max_bytes: int) -> None:
        """Keep decoded images in memory (as uint8) while they fit in ``max_bytes``.

        Why: a small set is read every epoch of every baseline and fine-tuning; decoding its
        PNGs again each time was 8% of a training step on the smoke suite. Images past the limit
        are decoded from disk as before, so a large set costs at most ``max_bytes``.
        """
        self._decoded = {}
        self._decoded_room = int(max_bytes)

    def _image(self, index: int) -> torch.Tensor:
        decoded = self._decoded
        if decoded is not None and index in decoded:
            return to_float(decoded[index])
        rec = self.records[index]
        pixels = decode_rgb(rec.path, rec.size)
        if decoded is not None and pixels.nbytes <= self._decoded_room:
            decoded[index] = pixels
            self._decoded_room -= pixels.nbytes
        return to_float(pixels)

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        image = self._image(index)
        target = {
            "boxes": torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(rec.labels, dtype=torch.int64).reshape(-1),
            "image_id": rec.image_id,
            "ignore_boxes": torch.tensor(rec.ignore_boxes, dtype=torch.float32).reshape(-1, 4),
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    @property
    def image_ids(self) -> list[int]:
        """Image ids in dataset order (the ids of ``coco`` that this dataset yields)."""
        return [rec.image_id for rec in self.records]


def to_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[3, H, W]`` to float in [0, 1], in numpy, not torch: torch's intra-op threads make
    this small op ~50x slower on a busy 2-core machine (DataLoader workers next to training)."""
    return torch.from_numpy(np.divide(pixels, np.float32(255), dtype=np.float32))


def decode_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode ``path`` to a contiguous uint8 ``[3, H, W]`` array, checking its size against ``size``."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image: {exc}") from None
    if size is not None and rgb.size != tuple(size):
        actual, expected = "x".join(map(str, rgb.size)), "x".join(map(str, size))
        raise DatasetError(f"{path}: image is {actual}, annotations say {expected}")
    return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))


# Sets up to this many images have every image's header read before training (a few ms per
# thousand): a file that is not an image, or of another size, fails before any training starts.
# Larger sets (COCO's 118k training images) are checked as they are read, naming the file.
HEADER_CHECK_LIMIT = 20_000


def check_header(path: Path, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Read ``path``'s image header only (no decoding) and return its ``(width, height)``; a
    DatasetError naming the file when it is not an image or not of the annotated ``size``."""
    try:
        with Image.open(path) as img:
            found = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image: {exc}") from None
    if size is not None and found != tuple(size):
        actual, expected = "x".join(map(str, found)), "x".join(map(str, size))
        raise DatasetError(f"{path}: image is {actual}, annotations say {expected}")
    return found


def boxes_array(rows: list[list[float]] | list[tuple[float, ...]]) -> np.ndarray:
    """``[K, 4]`` float32 array, also for K = 0 (so empty targets keep their shape)."""
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def coco_ground_truth(
    dataset: DetectionDataset, objects: Callable[[ImageRecord], Iterable[tuple[np.ndarray, int, int]]]
) -> dict[str, Any]:
    """COCO-form ground truth of ``dataset``'s records, for the loaders whose files are not COCO's
    (KITTI, VOC): COCOeval is the one evaluator. ``objects(record)`` yields each annotation as
    ``(xyxy box, category id, iscrowd)``; annotation ids count from 1 in that order."""
    images, annotations = [], []
    for rec in dataset.records:
        width, height = rec.size if rec.size else (0, 0)
        images.append({"id": rec.image_id, "file_name": rec.path.name, "width": width, "height": height})
        for box, category_id, crowd in objects(rec):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": rec.image_id,
                    "category_id": category_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": crowd,
                }
            )
    pairs = zip(dataset.category_ids, dataset.classes, strict=True)
    categories = [{"id": cid, "name": name} for cid, name in pairs]
    return {"images": images, "annotations": annotations, "categories": categories}


def quiet_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` built from an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
