"""The embedded default data: a seeded synthetic detection set, written as COCO, KITTI and VOC files.

No real data exists where the harness is developed, and the default suite must still exercise the
real loaders, so this writes files exactly like the real sets and the loaders read them back.
Three classes differ in shape and colour (car: wide rectangle, reddish; pedestrian: tall
ellipse, bluish; cyclist: upright triangle, greenish), with colour jitter, sizes from ~8 px to
half the image, partial overlap and truncation at the border. Clutter keeps the task from
saturating: a gradient + blotchy + noisy background and distractors that are not classes (crosses,
stars, diamonds, rings, thin lines), half of them in class-like colours.

Every image comes from its own ``numpy.random.default_rng([seed, split, index])``, PNGs carry no
metadata and JSON is written with sorted keys, so one seed gives byte-identical files anywhere.
The VOC copy (``voc/VOCdevkit/VOC2007``: JPEG, XML, ``trainval``/``test`` image sets) marks as
``difficult`` exactly the objects that COCO marks ``iscrowd`` and KITTI ``DontCare``; JPEG is lossy,
so its pixels differ slightly from the PNGs'.

This module draws and writes a set's files; ``datasets.synthetic`` keeps the finished sets (cached,
checksummed, published whole) and registers them as datasets.
"""

from __future__ import annotations

import io
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 2  # bump when the content changes: part of what a cached baseline depends on
CLASSES = ("car", "pedestrian", "cyclist")
CATEGORY_IDS = (2, 5, 7)  # non-contiguous on purpose, so the id <-> label mapping is exercised
KITTI_TYPES = ("Car", "Pedestrian", "Cyclist")
VOC_NAMES = ("car", "person", "bicycle")  # VOC's names of the three: the real `voc` loader reads it

EMPTY_FRACTION = 0.06  # images with no object at all
CROWD_FRACTION = 0.03  # objects marked iscrowd (COCO) / DontCare (KITTI)
MAX_IOU = 0.4  # pairwise, between placed shapes
MAX_COVER = 0.6  # intersection / smaller box: stops a small shape hiding inside a big one

_CLASS_COLOURS = ((205, 45, 40), (45, 75, 210), (50, 180, 60))
_OTHER_COLOURS = (
    (225, 205, 60),
    (150, 60, 170),
    (60, 195, 205),
    (230, 230, 230),
    (35, 35, 35),
    (235, 135, 40),
)
_ASPECTS = {  # width / height ranges
    "car": (1.5, 2.6),
    "pedestrian": (1 / 3.0, 1 / 1.8),
    "cyclist": (0.8, 1.25),
    "cross": (0.7, 1.4),
    "star": (0.8, 1.25),
    "diamond": (0.6, 1.6),
    "ring": (0.6, 1.6),
}
_DISTRACTOR_KINDS = ("cross", "star", "diamond", "ring", "line")
_DISTRACTOR_TYPES = {"cross": "Misc", "star": "Tram", "diamond": "Van", "ring": "Truck", "line": "Misc"}
_DIMENSIONS = {"Car": (1.53, 1.63, 3.88), "Pedestrian": (1.76, 0.66, 0.84), "Cyclist": (1.74, 0.60, 1.76)}
_DONT_CARE = "-1 -1 -10.00 {} -1 -1 -1 -1000 -1000 -1000 -10"


@dataclass
class _Shape:
    """One drawn shape: its tight visible box and what the two label formats say about it."""

    kind: str
    box: tuple[int, int, int, int]  # tight xyxy of the drawn pixels, clipped to the image
    label: int | None  # class index, None for a distractor
    crowd: bool
    truncated: float
    occluded: int = 0


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)  # no info dict: no metadata chunks
    return buf.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)  # VOC's images are JPEG; no EXIF written
    return buf.getvalue()


def _voc_xml(name: str, shapes: list[_Shape], size: int) -> bytes:
    """A VOC annotation: 1-based inclusive pixel indices, so a drawn box (x1, y1, x2, y2) with
    exclusive ends is written as (x1 + 1, y1 + 1, x2, y2); distractors are not objects."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    dims = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(dims, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for s in shapes:
        if s.label is None:
            continue
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = VOC_NAMES[s.label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(s.truncated > 0))
        ET.SubElement(obj, "difficult").text = str(int(s.crowd))
        box = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = s.box
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float HxWx3: a tinted grey, a linear gradient in a random direction and low-frequency blotches."""
    base = rng.uniform(55, 195) + rng.uniform(-25, 25, 3)
    angle, amp = rng.uniform(0, 2 * math.pi), rng.uniform(10, 70)
    ramp = np.linspace(-0.5, 0.5, size)
    gradient = amp * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None])
    cells = max(2, size // 12)
    coarse = np.clip(128 + 45 * rng.standard_normal((cells, cells, 3)), 0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32) - 128
    return base + gradient[:, :, None] + rng.uniform(0.2, 0.8) * blotches


def _colour(rng: np.random.Generator, label: int | None) -> tuple[int, int, int]:
    if label is not None:
        base = _CLASS_COLOURS[label]
    elif rng.random() < 0.5:  # class-like colour on a non-class shape: colour alone must not suffice
        base = _CLASS_COLOURS[rng.integers(len(_CLASS_COLOURS))]
    else:
        base = _OTHER_COLOURS[rng.integers(len(_OTHER_COLOURS))]
    return tuple(int(v) for v in np.clip(np.asarray(base) + rng.integers(-35, 36, 3), 0, 255))


def _draw(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, x1: int, y1: int) -> None:
    """Draw ``kind`` filling the inclusive pixel box ``(x0, y0)-(x1, y1)`` into a mask."""
    w, h = x1 - x0 + 1, y1 - y0 + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "car":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif kind == "pedestrian":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif kind == "cyclist":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=255)
    elif kind == "cross":
        tx, ty = max(1, w // 8), max(1, h // 8)
        draw.rectangle((x0, cy - ty, x1, cy + ty), fill=255)
        draw.rectangle((cx - tx, y0, cx + tx, y1), fill=255)
    elif kind == "star":
        points = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * (w / 2) * math.cos(a), cy + r * (h / 2) * math.sin(a)))
        draw.polygon(points, fill=255)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif kind == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=255, width=max(2, min(w, h) // 5))
    else:  # pragma: no cover - kinds are fixed above
        raise ValueError(kind)


def _overlaps(box: tuple[float, ...], placed: list[tuple[float, ...]]) -> bool:
    """True when ``box`` overlaps a placed box beyond MAX_IOU, or covers / hides inside one."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        other_area = (other[2] - other[0]) * (other[3] - other[1])
        if inter / (area + other_area - inter) > MAX_IOU or inter / min(area, other_area) > MAX_COVER:
            return True
    return False


def _image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[_Shape]]:
    """One image and its shapes (classes and distractors) in drawing order."""
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    num_objects = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, 7))
    items: list[tuple[str, int | None]] = [
        (CLASSES[c], int(c)) for c in rng.integers(len(CLASSES), size=num_objects)
    ] + [(_DISTRACTOR_KINDS[k], None) for k in rng.integers(len(_DISTRACTOR_KINDS), size=rng.integers(0, 5))]
    order = rng.permutation(len(items))
    owner = np.full((size, size), -1, dtype=np.int16)  # who is visible at each pixel, for `occluded`
    shapes: list[_Shape] = []
    placed: list[tuple[float, ...]] = []
    masks: list[np.ndarray] = []
    for i in order:
        kind, label = items[i]
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        if kind == "line":  # thin and sparse: exempt from the overlap rule
            xy = rng.uniform(0, size, 4)
            draw.line(tuple(xy), fill=255, width=int(rng.integers(1, 3)))
            truncated = 0.0
        else:
            for _ in range(30):
                lo, hi = _ASPECTS[kind]
                aspect = math.exp(rng.uniform(math.log(lo), math.log(hi)))
                scale = math.exp(rng.uniform(math.log(size / 16), math.log(size / 2.5)))
                w = min(max(scale * math.sqrt(aspect), 4.0), 0.7 * size)
                h = min(max(scale / math.sqrt(aspect), 4.0), 0.7 * size)
                x0, y0 = rng.uniform(-0.2 * w, size - 0.8 * w), rng.uniform(-0.2 * h, size - 0.8 * h)
                clipped = (max(x0, 0.0), max(y0, 0.0), min(x0 + w, size), min(y0 + h, size))
                if not _overlaps(clipped, placed):
                    break
            else:
                continue  # no room left for this one
            placed.append(clipped)
            truncated = max(0.0, 1 - (clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) / (w * h))
            _draw(draw, kind, round(x0), round(y0), round(x0 + w) - 1, round(y0 + h) - 1)
        box = mask.getbbox()
        if box is None or box[2] - box[0] < 3 or box[3] - box[1] < 3:
            continue
        crowd = label is not None and rng.random() < CROWD_FRACTION
        canvas.paste(_colour(rng, label), mask=mask)
        pixels = np.asarray(mask) > 0
        owner[pixels] = len(shapes)
        masks.append(pixels)
        shapes.append(_Shape(kind, box, label, crowd, round(truncated, 2)))
    for k, (shape, pixels) in enumerate(zip(shapes, masks, strict=True)):
        visible = np.count_nonzero(owner[pixels] == k) / np.count_nonzero(pixels)
        shape.occluded = 0 if visible > 0.95 else 1 if visible > 0.6 else 2
    noise = rng.normal(0.0, rng.uniform(4, 12), (size, size, 3))
    pixels = np.clip(np.asarray(canvas, np.float32) * rng.uniform(0.85, 1.15) + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8)), shapes


def _kitti_line(shape: _Shape, size: int, rng: np.random.Generator) -> str:
    """A 15-field KITTI line; 3D fields are plausible values from a pinhole camera with f = 0.6 W."""
    x1, y1, x2, y2 = shape.box
    box = f"{x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}"
    if shape.crowd:
        return f"DontCare {_DONT_CARE.format(box)}"
    kind = KITTI_TYPES[shape.label] if shape.label is not None else _DISTRACTOR_TYPES[shape.kind]
    h3, w3, l3 = _DIMENSIONS.get(kind, (1.0, 1.0, 1.0))
    focal = 0.6 * size
    z = focal * h3 / (y2 - y1)
    x, y = ((x1 + x2) / 2 - size / 2) * z / focal, (y2 - size / 2) * z / focal
    ry = rng.uniform(-math.pi, math.pi)
    alpha = (ry - math.atan2(x, z) + math.pi) % (2 * math.pi) - math.pi
    return (
        f"{kind} {shape.truncated:.2f} {shape.occluded} {alpha:.2f} {box} "
        f"{h3:.2f} {w3:.2f} {l3:.2f} {x:.2f} {y:.2f} {z:.2f} {ry:.2f}"
    )


def _coco_json(images: list[dict], annotations: list[dict], seed: int) -> bytes:
    categories = [
        {"id": cid, "name": name, "supercategory": "object"}
        for cid, name in zip(CATEGORY_IDS, CLASSES, strict=True)
    ]
    data = {
        "info": {
            "description": "detprune synthetic detection set",
            "version": str(GENERATOR_VERSION),
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def write_set(out: Path, seed: int, num_train: int, num_val: int, size: int) -> None:
    """Write the COCO, KITTI and VOC forms under ``out``; KITTI numbers train images first, then
    val; VOC's ``trainval`` set is the train split and its ``test`` set the val split."""
    (out / "coco" / "annotations").mkdir(parents=True)
    voc = out / "voc" / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    kitti_images, kitti_labels = (
        out / "kitti" / "training" / "image_2",
        out / "kitti" / "training" / "label_2",
    )
    kitti_images.mkdir(parents=True)
    kitti_labels.mkdir(parents=True)
    index = 0
    for split_code, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        (out / "coco" / split).mkdir()
        images, annotations, names = [], [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_code, i])
            image, shapes = _image(rng, size)
            name = f"{index:06d}.png"
            data = _png(image)
            (out / "coco" / split / name).write_bytes(data)
            try:  # the KITTI copy is the same bytes: a hard link halves the disk space
                os.link(out / "coco" / split / name, kitti_images / name)
            except OSError:
                (kitti_images / name).write_bytes(data)
            names.append(f"{index:06d}")
            (voc / "JPEGImages" / f"{names[-1]}.jpg").write_bytes(_jpeg(image))
            (voc / "Annotations" / f"{names[-1]}.xml").write_bytes(_voc_xml(names[-1], shapes, size))
            lines = [_kitti_line(s, size, rng) for s in shapes]
            (kitti_labels / f"{index:06d}.txt").write_text("".join(line + "\n" for line in lines))
            images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
            for s in shapes:
                if s.label is None:
                    continue
                x1, y1, x2, y2 = (float(v) for v in s.box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": CATEGORY_IDS[s.label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": int(s.crowd),
                        "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                    }
                )
            index += 1
        (out / "coco" / "annotations" / f"instances_{split}.json").write_bytes(
            _coco_json(images, annotations, seed)
        )
        image_set = "trainval" if split == "train" else "test"
        (voc / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(n + "\n" for n in names))
