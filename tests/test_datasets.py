"""Loaders on small hand-written COCO / KITTI files, the registry, the flip, and the synthetic generator."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

import datasets
from datasets import DATASETS, DatasetError, build_dataset
from datasets.coco import CocoDetection
from datasets.kitti import KittiDetection, split_ids
from datasets.registry import dataset_names, register_dataset
from datasets.synthetic import generate
from datasets.synthetic_drawing import CATEGORY_IDS, CLASSES, GENERATOR_VERSION
from methods.engine.training import RandomHorizontalFlip, collate


def write_png(path: Path, size: tuple[int, int] = (16, 12), colour: tuple[int, ...] = (10, 200, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def assert_one_line(exc: pytest.ExceptionInfo, *parts: str) -> None:
    """The error names what it must, on one line, without a chained traceback behind it."""
    message = str(exc.value)
    for part in parts:
        assert part in message, (part, message)
    assert "\n" not in message
    assert exc.value.__cause__ is None


# ----------------------------------------------------------------------------------------------- COCO


def coco_layout(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    for name in ("a.png", "b.png", "c.png"):
        write_png(images / name, (16, 12))
    data = {
        "images": [  # deliberately out of id order
            {"id": 30, "file_name": "c.png", "width": 16, "height": 12},
            {"id": 10, "file_name": "a.png", "width": 16, "height": 12},
            {"id": 20, "file_name": "b.png", "width": 16, "height": 12},
        ],
        "categories": [{"id": 7, "name": "truck"}, {"id": 3, "name": "person"}],  # ids unsorted, sparse
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 5, 4], "area": 20, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 2, 3], "area": 6, "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [4, 4, 0, 3], "area": 0, "iscrowd": 0},
            {"id": 4, "image_id": 30, "category_id": 3, "bbox": [2, 1, 3, 3], "area": 9, "iscrowd": 0},
            {"id": 5, "image_id": 30, "category_id": 7, "bbox": [10, 5, 20, 20], "area": 1, "iscrowd": 0},
        ],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return images, ann


def test_coco_maps_ids_keeps_empty_images_and_ignores_crowd(tmp_path):
    ds = CocoDetection(*coco_layout(tmp_path))
    assert ds.classes == ["person", "truck"] and ds.category_ids == [3, 7] and ds.metric == "ap"
    assert len(ds) == 3 and ds.image_ids == [10, 20, 30]

    image, target = ds[0]
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32 and image.is_contiguous()
    assert torch.allclose(image[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0)
    assert target["image_id"] == 10
    assert target["boxes"].tolist() == [[1, 2, 6, 6]]  # xywh -> xyxy; degenerate one skipped
    assert target["labels"].tolist() == [1] and target["labels"].dtype == torch.int64
    assert target["ignore_boxes"].tolist() == [[0, 0, 2, 3]]  # crowd: never a label

    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["ignore_boxes"].shape == (0, 4)

    _, clipped = ds[2]
    assert clipped["labels"].tolist() == [0, 1]
    assert clipped["boxes"].tolist() == [[2, 1, 5, 4], [10, 5, 16, 12]]  # clipped to the image

    assert sorted(ds.coco.getCatIds()) == [3, 7]  # ground truth keeps the original ids
    assert len(ds.coco.getAnnIds()) == 5


def test_coco_malformed_json(tmp_path):
    images, ann = coco_layout(tmp_path)
    ann.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DatasetError) as exc:
        CocoDetection(images, ann)
    assert_one_line(exc, "instances.json:2", "malformed JSON")


def test_coco_missing_files(tmp_path):
    images, ann = coco_layout(tmp_path)
    with pytest.raises(DatasetError) as exc:
        CocoDetection(images, tmp_path / "nope.json")
    assert_one_line(exc, "nope.json", "not found")
    with pytest.raises(DatasetError) as exc:
        CocoDetection(tmp_path / "no-images", ann)
    assert_one_line(exc, "no-images", "not found")
    (images / "b.png").unlink()
    with pytest.raises(DatasetError) as exc:
        CocoDetection(images, ann)
    assert_one_line(exc, "instances.json", "'b.png'")


def test_coco_unknown_category(tmp_path):
    images, ann = coco_layout(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as exc:
        CocoDetection(images, ann)
    assert_one_line(exc, "instances.json", "99")


def test_coco_undecodable_image_fails_before_training_or_when_read(tmp_path):
    images, ann = coco_layout(tmp_path)
    good = (images / "b.png").read_bytes()
    (images / "b.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError) as exc:  # the header read at construction finds it
        CocoDetection(images, ann)
    assert_one_line(exc, "b.png", "cannot decode")
    (images / "b.png").write_bytes(good[: good.index(b"IDAT") + 6])  # a whole header, pixels cut short
    ds = CocoDetection(images, ann)  # construction decodes no pixels
    ds[0]
    with pytest.raises(DatasetError) as exc:
        ds[1]
    assert_one_line(exc, "b.png", "cannot decode")


def test_coco_negative_box_is_an_error(tmp_path):
    images, ann = coco_layout(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"][2] = -3.0
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as exc:
        CocoDetection(images, ann)
    assert_one_line(exc, "instances.json", "negative width")


# ---------------------------------------------------------------------------------------------- KITTI

KITTI_LINES = {
    "000000": [
        "Car 0.00 0 -1.58 1.00 2.00 9.00 7.00 1.50 1.60 3.90 1.00 1.70 20.00 -1.57",
        "Van 0.00 0 -1.58 3.00 3.00 8.00 8.00 1.50 1.60 3.90 1.00 1.70 20.00 -1.57",
        "Pedestrian 0.10 1 0.20 10.00 1.00 12.00 9.00 1.70 0.60 0.80 -2.00 1.70 15.00 0.10 0.93",
        "DontCare -1 -1 -10 0.00 8.00 4.00 12.00 -1 -1 -1 -1000 -1000 -1000 -10",
        "Misc 0.00 0 0.00 2.00 2.00 3.00 3.00 1.00 1.00 1.00 0.00 0.00 9.00 0.00",
    ],
    "000001": [],
    "000002": [
        "Person_sitting 0.00 0 0.00 1.00 1.00 5.00 5.00 1.00 1.00 1.00 0.00 0.00 9.00 0.00",
        "Cyclist 0.00 2 0.00 4.00 3.00 7.00 11.00 1.70 0.60 1.80 0.00 1.70 12.00 0.00",
        "Tram 0.00 0 0.00 1.00 1.00 5.00 5.00 1.00 1.00 1.00 0.00 0.00 9.00 0.00",
        "Truck 0.00 0 0.00 1.00 1.00 5.00 5.00 1.00 1.00 1.00 0.00 0.00 9.00 0.00",
    ],
}


def kitti_layout(root: Path, lines: dict[str, list[str]] = KITTI_LINES) -> Path:
    for stem, rows in lines.items():
        write_png(root / "training" / "image_2" / f"{stem}.png")
        label = root / "training" / "label_2" / f"{stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(row + "\n" for row in rows))
    return root


def test_kitti_classes_dontcare_and_ignored_types(tmp_path):
    ds = KittiDetection(kitti_layout(tmp_path), "train", val_fraction=0.0)
    assert ds.classes == ["Car", "Pedestrian", "Cyclist"] and ds.category_ids == [1, 2, 3]
    assert ds.metric == "ap50" and ds.image_ids == [0, 1, 2]
    _, first = ds[0]
    assert first["boxes"].tolist() == [[1, 2, 9, 7], [10, 1, 12, 9]]  # Van, Misc dropped entirely
    assert first["labels"].tolist() == [0, 1]
    assert first["ignore_boxes"].tolist() == [[0, 8, 4, 12]]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["ignore_boxes"].shape == (0, 4)
    _, third = ds[2]
    assert third["labels"].tolist() == [2] and third["boxes"].tolist() == [[4, 3, 7, 11]]

    gt = ds.coco
    assert sorted(gt.getImgIds()) == [0, 1, 2] and gt.imgs[0]["width"] == 16
    crowd = gt.loadAnns(gt.getAnnIds(imgIds=[0], iscrowd=True))
    assert sorted(a["category_id"] for a in crowd if a["iscrowd"]) == [1, 2, 3]  # one per category
    assert [a["category_id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[2]))] == [3]


def quiet_eval(gt, results: list[dict]) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def test_kitti_detections_inside_dontcare_are_not_false_positives(tmp_path):
    ds = KittiDetection(kitti_layout(tmp_path), "train", val_fraction=0.0)

    def det(box, cat, score):
        x1, y1, x2, y2 = box
        return {"image_id": 0, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}

    truth = [det((1, 2, 9, 7), 1, 0.5), det((10, 1, 12, 9), 2, 0.5), det((4, 3, 7, 11), 3, 0.5)]
    truth[2]["image_id"] = 2
    in_dontcare = [det((0, 8, 4, 12), 1, 0.9), det((0.5, 8.5, 3.5, 11.5), 2, 0.9)]
    elsewhere = [det((12, 0, 16, 4), 1, 0.9)]
    assert quiet_eval(ds.coco, truth + in_dontcare) == pytest.approx(1.0)  # Car and Pedestrian ignored
    assert quiet_eval(ds.coco, truth + elsewhere) < 0.9


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("Car 0.00 0 -1.58 1.00 2.00 9.00 7.00 1.50 1.60 3.90 1.00 1.70 20.00", "expected 15 fields"),
        ("Car 0.00 0 -1.58 1 2 9 7 1.5 1.6 3.9 1 1.7 20 -1.57 0.9 7", "got 17"),
        ("Car 0.00 0 -1.58 1.00 2.00 nine 7.00 1.50 1.60 3.90 1.00 1.70 20.00 -1.57", "'x2' is not a number"),
        ("Car 0.00 0 -1.58 9.00 2.00 1.00 7.00 1.50 1.60 3.90 1.00 1.70 20.00 -1.57", "x2 < x1"),
        ("Car 0.00 0 -1.58 1.00 7.00 9.00 2.00 1.50 1.60 3.90 1.00 1.70 20.00 -1.57", "y2 < y1"),
        ("car 0.00 0 -1.58 1.00 2.00 9.00 7.00 1.50 1.60 3.90 1.00 1.70 20.00 -1.57", "unknown object type"),
    ],
)
def test_kitti_bad_label_line_names_file_and_line(tmp_path, line, why):
    good = KITTI_LINES["000002"][0]
    kitti_layout(tmp_path, {**KITTI_LINES, "000003": [good, "", line]})
    with pytest.raises(DatasetError) as exc:
        KittiDetection(tmp_path, "val")  # every file is checked, whichever split it falls in
    assert_one_line(exc, "000003.txt:3", why)


def test_kitti_missing_pairs_and_dirs(tmp_path):
    with pytest.raises(DatasetError) as exc:
        KittiDetection(tmp_path / "absent", "train")
    assert_one_line(exc, "absent", "not found")
    (tmp_path / "training" / "image_2").mkdir(parents=True)
    with pytest.raises(DatasetError) as exc:
        KittiDetection(tmp_path, "train")
    assert_one_line(exc, "label_2", "not found")

    kitti_layout(tmp_path)
    (tmp_path / "training" / "label_2" / "000007.txt").write_text("")
    with pytest.raises(DatasetError) as exc:
        KittiDetection(tmp_path, "train")
    assert_one_line(exc, "000007.txt", "no image")
    (tmp_path / "training" / "label_2" / "000007.txt").unlink()
    write_png(tmp_path / "training" / "image_2" / "000009.png")
    with pytest.raises(DatasetError) as exc:
        KittiDetection(tmp_path, "train")
    assert_one_line(exc, "000009.png", "no label file")


def test_kitti_undecodable_image(tmp_path):
    kitti_layout(tmp_path)
    image = tmp_path / "training" / "image_2" / "000002.png"
    image.write_bytes(image.read_bytes()[:45])  # valid header, truncated data: fails on decode
    ds = KittiDetection(tmp_path, "train", val_fraction=0.0)
    with pytest.raises(DatasetError) as exc:
        ds[2]
    assert_one_line(exc, "000002.png", "cannot decode")
    image.write_bytes(b"garbage")  # not an image at all: the header read at construction says so
    with pytest.raises(DatasetError) as exc:
        KittiDetection(tmp_path, "train", val_fraction=0.0)
    assert_one_line(exc, "000002.png")


def test_kitti_split_is_deterministic_disjoint_and_80_20(tmp_path):
    ids = list(range(100, 150))
    train, val = split_ids(ids, "train"), split_ids(ids, "val")
    assert len(train) == 40 and len(val) == 10
    assert not set(train) & set(val) and sorted(train + val) == ids
    assert split_ids(ids[::-1], "train") == train  # the permutation is of the sorted ids
    assert split_ids(ids, "train", seed=1) != train
    assert len(split_ids(ids, "val", val_fraction=0.5)) == 25

    kitti_layout(tmp_path, {f"{i:06d}": [] for i in range(10)})
    a, b = KittiDetection(tmp_path, "train"), KittiDetection(tmp_path, "val")
    assert len(a) == 8 and len(b) == 2 and sorted(a.image_ids + b.image_ids) == list(range(10))
    assert KittiDetection(tmp_path, "train").image_ids == a.image_ids
    assert sorted(b.coco.getImgIds()) == b.image_ids  # the ground truth covers exactly the split
    with pytest.raises(DatasetError):
        KittiDetection(tmp_path, "test")


# ------------------------------------------------------------------------------------ registry, transforms


def test_registry_names_and_errors(tmp_path):
    assert set(DATASETS) == {"synthetic-coco", "synthetic-kitti", "synthetic-voc", "coco", "kitti", "voc"}
    with pytest.raises(DatasetError) as exc:
        build_dataset("vox", "train")
    assert_one_line(exc, "unknown dataset 'vox'", "did you mean 'voc'")
    for name in ("coco", "kitti", "voc"):
        with pytest.raises(DatasetError, match="root"):
            build_dataset(name, "train")
        with pytest.raises(DatasetError, match="not found"):
            build_dataset(name, "train", root=tmp_path / "missing")
    with pytest.raises(DatasetError, match="unknown option"):
        build_dataset("kitti", "train", root=tmp_path, colour="red")
    with pytest.raises(DatasetError, match="unknown split"):
        build_dataset("synthetic-coco", "test", root=tmp_path)
    assert {"DatasetError", "DetectionDataset", "build_dataset", "DATASETS"} <= set(dir(datasets))


def test_registry_lists_generated_sets_first_and_refuses_a_second_registration(tmp_path):
    generated_first = tuple(sorted(DATASETS, key=lambda n: (not n.startswith("synthetic-"), n)))
    assert DATASETS == dataset_names() == generated_first and set(datasets.DEFAULTS) == set(DATASETS)
    with pytest.raises(DatasetError, match="registered twice"):
        register_dataset("coco", {})(lambda split, root, transform: None)
    # a generated set's identity carries its generator's version, real data's does not
    assert datasets.resolved_options("synthetic-voc", {"seed": 3})["generator_version"] == GENERATOR_VERSION
    assert datasets.resolved_options("voc", {}) == {"protocol": "07+12"}
    cached = datasets.data_path("synthetic-coco", tmp_path, {"seed": 1})
    assert cached == tmp_path / "synthetic-s1-n512-v128-i128"
    assert (
        datasets.data_path("kitti", tmp_path, {}) == tmp_path
        and datasets.data_path("kitti", None, {}) is None
    )


def test_registry_real_layouts(tmp_path):
    images, ann = coco_layout(tmp_path / "work")
    coco_root = tmp_path / "coco"
    (coco_root / "annotations").mkdir(parents=True)
    ann.rename(coco_root / "annotations" / "instances_val2017.json")
    images.rename(coco_root / "val2017")
    ds = build_dataset("coco", "val", root=coco_root)
    assert isinstance(ds, CocoDetection) and len(ds) == 3

    kitti = kitti_layout(tmp_path / "kitti")
    ds = build_dataset("kitti", "train", root=kitti, split_seed=3, val_fraction=0.0)
    assert isinstance(ds, KittiDetection) and len(ds) == 3


def test_flip_moves_pixels_and_boxes():
    image = torch.zeros(3, 4, 10)
    image[:, :, 1] = 1.0
    boxes = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    target = {"boxes": boxes, "labels": torch.tensor([0]), "ignore_boxes": torch.zeros(0, 4), "image_id": 5}
    flipped, out = RandomHorizontalFlip(1.0)(image, target)
    assert flipped[0, 0].tolist() == image[0, 0].flip(0).tolist()
    assert out["boxes"].tolist() == [[7.0, 0.0, 9.0, 2.0]]
    assert out["ignore_boxes"].shape == (0, 4) and out["image_id"] == 5
    assert target["boxes"] is boxes and boxes.tolist() == [[1.0, 0.0, 3.0, 2.0]]  # caller's untouched
    same, kept = RandomHorizontalFlip(0.0)(image, target)
    assert same is image and kept is target


def test_collate_keeps_lists():
    batch = [(torch.zeros(3, 2, 2), {"image_id": 1}), (torch.ones(3, 4, 4), {"image_id": 2})]
    images, targets = collate(batch)
    assert [i.shape[-1] for i in images] == [2, 4] and [t["image_id"] for t in targets] == [1, 2]


# ------------------------------------------------------------------------------------------- generator

SMALL = {"seed": 0, "num_train": 6, "num_val": 2, "image_size": 64}


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def modest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "set"
    return generate(root, seed=3, num_train=30, num_val=10, image_size=96)


def test_generator_is_byte_identical_per_seed(tmp_path):
    a, b, c = (generate(tmp_path / n, **{**SMALL, "seed": s}) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    files = digest(a)
    # 2 json, 8 coco png, 8 kitti png + 8 txt, 8 voc jpg + 8 xml + 2 image sets, manifest
    assert len(files) == 2 + 8 + 8 + 8 + 8 + 8 + 2 + 1
    assert files == digest(b)
    assert files.keys() == digest(c).keys() and files != digest(c)
    before = (a / "coco" / "train" / "000000.png").stat().st_mtime_ns
    assert generate(a, **SMALL) == a  # finished: returned as is
    assert (a / "coco" / "train" / "000000.png").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_generator_refuses_foreign_or_different_sets(tmp_path):
    generate(tmp_path / "a", **SMALL)
    with pytest.raises(DatasetError, match="made with"):
        generate(tmp_path / "a", **{**SMALL, "seed": 5})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a synthetic set"):
        generate(tmp_path / "other", **SMALL)
    (tmp_path / "empty").mkdir()
    assert generate(tmp_path / "empty", **SMALL) == tmp_path / "empty"


def test_generated_coco_form(modest):
    data = json.loads((modest / "coco" / "annotations" / "instances_train.json").read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == list(zip(CATEGORY_IDS, CLASSES, strict=True))
    assert len(data["images"]) == 30
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w >= 3 and h >= 3 and x + w <= 96 and y + h <= 96
    counts = np.bincount([CATEGORY_IDS.index(a["category_id"]) for a in data["annotations"]], minlength=3)
    assert (counts > 0).all()
    ds = CocoDetection(modest / "coco" / "train", modest / "coco" / "annotations" / "instances_train.json")
    image, target = ds[0]
    assert image.shape == (3, 96, 96) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    sizes = np.concatenate([r.boxes[:, 2:] - r.boxes[:, :2] for r in ds.records])
    assert sizes.min() < 14 and sizes.max() > 40  # small and large objects both occur


def test_generated_kitti_and_coco_forms_describe_the_same_objects(modest):
    coco = {
        r.path.name: r
        for split in ("train", "val")
        for r in CocoDetection(
            modest / "coco" / split, modest / "coco" / "annotations" / f"instances_{split}.json"
        ).records
    }
    kitti = {r.path.name: r for s in ("train", "val") for r in KittiDetection(modest / "kitti", s).records}
    assert coco.keys() == kitti.keys() and len(coco) == 40
    names = [c.lower() for c in KittiDetection(modest / "kitti", "val").classes]
    assert names == list(CLASSES)
    for name, c in coco.items():
        k = kitti[name]
        objects = [sorted(zip(r.boxes.tolist(), r.labels.tolist(), strict=True)) for r in (c, k)]
        assert objects[0] == objects[1]
        assert sorted(c.ignore_boxes.tolist()) == sorted(k.ignore_boxes.tolist())
        assert (modest / "coco" / c.path.parent.name / name).read_bytes() == k.path.read_bytes()
    lines = [ln.split() for p in (modest / "kitti" / "training" / "label_2").glob("*.txt") for ln in p.open()]
    assert all(len(fields) == 15 for fields in lines)
    assert {"Car", "Pedestrian", "Cyclist"} <= {f[0] for f in lines}
    assert {f[0] for f in lines} - {"Car", "Pedestrian", "Cyclist", "DontCare"}  # distractors, ignored types


def test_build_synthetic_through_real_loaders(tmp_path):
    ds = build_dataset("synthetic-coco", "val", root=tmp_path, **SMALL)
    assert isinstance(ds, CocoDetection) and len(ds) == 2 and ds.classes == list(CLASSES)
    assert ds.category_ids == list(CATEGORY_IDS) and ds.metric == "ap"
    assert (tmp_path / "synthetic-s0-n6-v2-i64" / "synthetic.json").is_file()
    flip = RandomHorizontalFlip(0.5)
    kt = build_dataset("synthetic-kitti", "train", root=tmp_path, split_seed=1, transform=flip, **SMALL)
    kv = build_dataset("synthetic-kitti", "val", root=tmp_path, split_seed=1, **SMALL)
    assert isinstance(kt, KittiDetection) and kt.metric == "ap50" and kt.transform is flip
    assert len(kt) + len(kv) == 8 and not set(kt.image_ids) & set(kv.image_ids)
    assert len(list(tmp_path.iterdir())) == 1  # both forms come from the one cached set


def test_default_cache_follows_detprune_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DETPRUNE_HOME", str(tmp_path / "home"))
    ds = build_dataset("synthetic-kitti", "val", **SMALL)
    assert ds.root == tmp_path / "home" / "data" / "synthetic-s0-n6-v2-i64" / "kitti"


def test_kept_decoded_images_equal_disk_and_stay_within_their_bytes(tmp_path):
    ds = build_dataset("synthetic-coco", "train", root=tmp_path, **SMALL)
    fresh = [ds[i][0] for i in range(len(ds))]
    one_image = fresh[0].numel()  # uint8 bytes of one decoded image
    ds.keep_decoded(2 * one_image + one_image // 2)  # room for two images, not three
    for _ in range(2):  # the first pass fills the cache, the second reads it
        for i, image in enumerate(fresh):
            assert torch.equal(ds[i][0], image)
    assert sorted(ds._decoded) == [0, 1]  # the rest still comes from disk
    for path in {ds.records[i].path for i in (0, 2)}:
        path.write_bytes(b"not an image")
    assert torch.equal(ds[0][0], fresh[0])  # a kept image is not read again
    with pytest.raises(DatasetError, match="cannot decode"):
        ds[2]


def test_a_damaged_synthetic_set_is_generated_again(tmp_path, capsys):
    root = generate(tmp_path / "s", **SMALL)
    image = root / "coco" / "train" / "000001.png"
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])  # truncated by a full disk, say
    assert generate(root, **SMALL) == root
    assert "coco/train/000001.png failed its checksum" in capsys.readouterr().err
    assert image.read_bytes() == whole  # the same seeded bytes again
    (root / "kitti" / "training" / "label_2" / "000003.txt").unlink()
    generate(root, **SMALL)
    assert "label_2/000003.txt is missing" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left aside
    manifest = json.loads((root / "synthetic.json").read_text())
    assert len(manifest["files"]) == len([p for p in root.rglob("*") if p.is_file()]) - 1
