"""PASCAL VOC: the loader on hand-written VOCdevkit trees, VOC's AP on hand-built detections with
known answers, the synthetic VOC copy, and the per-class table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datasets import DatasetError, build_dataset
from datasets.voc import CLASSES, VocDetection
from datasets.voc_eval import average_precision, class_ap, voc_metrics
from results.per_class import per_class_frame, write_per_class
from runners.evaluate import evaluate

# -- VOC's AP on hand-built detections ---------------------------------------------------------

# one image, four boxes of one class and a difficult fifth, far apart
TRUTH = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10]], float)
HARD = np.array([False, False, False, False, True])


def _dets(*pairs: tuple[float, int]) -> list[tuple[int, float, np.ndarray]]:
    """(score, index of the truth box it sits on; -1: on nothing)."""
    far = np.array([200.0, 200, 210, 210])
    return [(1, s, TRUTH[j] + 0.5 if j >= 0 else far) for s, j in pairs]


def test_eleven_point_and_area_ap_have_their_known_values() -> None:
    # TP, duplicate of the first (FP), TP, on the difficult box (neither), TP, nowhere (FP)
    result = class_ap(_dets((0.9, 0), (0.8, 0), (0.7, 1), (0.6, 4), (0.5, 2), (0.4, -1)), {1: (TRUTH, HARD)})
    assert result.num_positives == 4
    # kept detections: TP FP TP TP FP -> recall .25 .25 .5 .75 .75, precision 1 .5 2/3 .75 .6
    # area: envelope 1 up to recall .25, then .75 up to .75, nothing beyond: .25 + .25*.75 + .25*.75
    assert result.ap == pytest.approx(0.625)
    # 11-point: t = 0, .1, .2 -> 1; t = .3 ... .7 -> .75; t = .8, .9, 1 -> 0
    assert result.ap11 == pytest.approx((3 + 5 * 0.75) / 11)


def test_a_difficult_match_neither_counts_nor_penalises() -> None:
    base = _dets((0.9, 0), (0.7, 1), (0.5, 2))
    plain = class_ap(base, {1: (TRUTH, HARD)})
    with_hard = class_ap([*base, *_dets((0.95, 4), (0.6, 4))], {1: (TRUTH, HARD)})
    assert (with_hard.ap, with_hard.ap11) == (plain.ap, plain.ap11)
    assert plain.ap == pytest.approx(0.75)  # 3 of 4 found, precision 1
    # the same box not difficult: found, it is a true positive and a fifth positive to recall
    counted = class_ap([*base, *_dets((0.95, 4))], {1: (TRUTH, np.zeros(5, bool))})
    assert counted.num_positives == 5 and counted.ap == pytest.approx(0.8)
    # and missed, a positive that lowers recall
    assert class_ap(base, {1: (TRUTH, np.zeros(5, bool))}).ap == pytest.approx(0.6)


def test_iou_at_the_threshold_is_a_miss_and_area_ap_is_exact_on_a_staircase() -> None:
    truth = {1: (np.array([[0.0, 0, 10, 10]]), np.zeros(1, bool))}
    half = np.array([0.0, 0, 10, 20]) * np.array([1, 1, 1, 1]) + np.array([0, 0, 0, 0])  # IoU 100/200
    assert class_ap([(1, 0.9, half)], truth).ap == 0.0  # VOC asks IoU > 0.5
    r, p = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert average_precision(r, p, eleven_point=False) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(r, p, eleven_point=True) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_voc_metrics_mean_over_classes_with_ground_truth() -> None:
    truth = {1: (TRUTH[:2], np.array([0, 1]), np.zeros(2, bool))}
    dets = [(1, 0, 0.9, TRUTH[0]), (1, 2, 0.8, TRUTH[1])]  # class 1 missed, class 2 has no box
    out = voc_metrics(dets, truth, ["a", "b", "c"])
    assert out["per_class"]["a"] == {"ap": 1.0, "ap11": 1.0}
    assert out["per_class"]["b"]["ap"] == 0.0 and math.isnan(out["per_class"]["c"]["ap"])
    assert out["voc_ap"] == pytest.approx(0.5) and out["voc_ap11"] == pytest.approx(0.5)


# -- the loader on hand-written trees ------------------------------------------------------------


def _xml(
    objects: str, size: str = "<size><width>40</width><height>30</height><depth>3</depth></size>"
) -> str:
    return f"<annotation><filename>x.jpg</filename>{size}{objects}</annotation>"


def _obj(name: str, box: tuple, difficult: int = 0, truncated: int = 0) -> str:
    coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
    return (
        f"<object><name>{name}</name><truncated>{truncated}</truncated>"
        f"<difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>"
    )


def _year(root: Path, year: str, images: dict[str, str], sets: dict[str, list[str]]) -> None:
    from PIL import Image

    base = root / f"VOC{year}"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for name, xml in images.items():
        (base / "Annotations" / f"{name}.xml").write_text(xml)
        Image.new("RGB", (40, 30), (90, 120, 30)).save(base / "JPEGImages" / f"{name}.jpg")
    for image_set, names in sets.items():
        (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(n + "\n" for n in names))


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit"
    _year(
        root,
        "2007",
        {
            "000001": _xml(_obj("dog", (1, 1, 20, 10)) + _obj("cat", (5, 5, 15, 25), difficult=1)),
            "000002": _xml(_obj("person", (10, 2, 30, 30), truncated=1)),
            "000003": _xml(""),
        },
        {"trainval": ["000001", "000002"], "test": ["000003"]},
    )
    _year(
        root,
        "2012",
        {"2007_000027": _xml(_obj("car", (2, 3, 4, 5))), "2008_000008": _xml(_obj("bus", (1, 1, 40, 30)))},
        {"trainval": ["2007_000027", "2008_000008"], "train": ["2007_000027"], "val": ["2008_000008"]},
    )
    return root


def test_loader_reads_boxes_difficult_and_protocols(devkit: Path) -> None:
    train = build_dataset("voc", "train", root=devkit)  # 07+12
    assert len(train) == 4 and len(CLASSES) == 20 and train.metric == "ap50"
    image, target = train[0]
    assert image.shape == (3, 30, 40)
    # (xmin - 1, ymin - 1, xmax, ymax); the difficult cat is no target but an ignore box
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0, 20, 10]]))
    assert target["labels"].tolist() == [CLASSES.index("dog")]
    torch.testing.assert_close(target["ignore_boxes"], torch.tensor([[4.0, 4, 15, 25]]))
    assert train[1][1]["labels"].tolist() == [CLASSES.index("person")]  # truncated: kept
    assert len({r.image_id for r in train.records}) == 4  # unique across years
    assert [r.path.name for r in build_dataset("voc", "val", root=devkit).records] == ["000003.jpg"]
    assert [r.path.name for r in VocDetection(devkit, "train", "07").records] == ["000001.jpg", "000002.jpg"]
    assert [r.path.name for r in VocDetection(devkit, "val", "12").records] == ["2008_000008.jpg"]
    crowd = [a for a in train.coco.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [4.0, 4.0, 11.0, 21.0]
    with pytest.raises(DatasetError, match="unknown VOC protocol '2007'"):
        build_dataset("voc", "train", root=devkit, protocol="2007")


BAD = {
    "no bndbox": (
        "<object><name>dog</name><difficult>0</difficult></object>",
        "object 1 (dog) has no <bndbox>",
    ),
    "non-numeric": (_obj("dog", (1, "a3", 5, 6)), "<ymin> is not a number: 'a3'"),
    "x2 < x1": (_obj("dog", (9, 1, 5, 6)), "xmax < xmin"),
    "unknown class": (_obj("dogg", (1, 1, 5, 6)), "unknown class 'dogg'"),
    "malformed": ("<object><name>dog</name>", "malformed XML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_xml_is_one_error_naming_the_file(devkit: Path, case: str) -> None:
    objects, expected = BAD[case]
    path = devkit / "VOC2007" / "Annotations" / "000002.xml"
    path.write_text(_xml(objects))
    with pytest.raises(DatasetError) as exc:
        build_dataset("voc", "train", root=devkit, protocol="07")
    message = str(exc.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message
    assert exc.value.__cause__ is None


def test_an_image_set_entry_without_its_image_or_folder_is_named(devkit: Path) -> None:
    (devkit / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"000002\.jpg: image of image set entry '000002' not found"):
        build_dataset("voc", "train", root=devkit, protocol="07")
    with pytest.raises(DatasetError, match=r"VOC2012: VOC directory not found"):
        VocDetection(devkit.parent, "train", "12")


# -- the synthetic copy and evaluation -----------------------------------------------------------

SMALL = {"num_train": 6, "num_val": 12, "image_size": 64}


def test_synthetic_voc_holds_the_coco_copy_s_objects(tmp_path: Path) -> None:
    voc = build_dataset("synthetic-voc", "val", root=tmp_path, **SMALL)
    coco = build_dataset("synthetic-coco", "val", root=tmp_path, **SMALL)
    assert voc.classes == ["car", "person", "bicycle"] and coco.classes == ["car", "pedestrian", "cyclist"]
    assert len(voc) == len(coco)
    for v, c in zip(voc.records, coco.records, strict=True):
        np.testing.assert_array_equal(v.boxes, c.boxes)
        np.testing.assert_array_equal(v.labels, c.labels)
        np.testing.assert_array_equal(voc.difficult[v.image_id][0], c.ignore_boxes)  # crowd = difficult
        assert v.path.suffix == ".jpg" and v.size == c.size


class _Oracle(torch.nn.Module):
    """Predicts a dataset's own boxes (difficult ones too) by image size order: a perfect detector."""

    def __init__(self, dataset: VocDetection) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.queue = []
        for rec in dataset.records:
            hard_boxes, hard_labels = dataset.difficult[rec.image_id]
            boxes, labels = np.concatenate([rec.boxes, hard_boxes]), np.concatenate([rec.labels, hard_labels])
            self.queue.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels)})

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = [self.queue.pop(0) for _ in images]
        return [o | {"scores": torch.linspace(0.9, 0.5, len(o["labels"]))} for o in out]


def test_evaluate_reports_voc_ap_per_class_and_coco_ap(tmp_path: Path) -> None:
    val = build_dataset("synthetic-voc", "val", root=tmp_path, **SMALL)
    metrics = evaluate(_Oracle(val), val, batch_size=4, progress=False)
    assert metrics["voc_ap"] == 1.0 and metrics["voc_ap11"] == 1.0 and metrics["ap50"] == 1.0
    per_class = json.loads(metrics["per_class_ap"])
    assert set(per_class) == set(val.classes)

    frame = pd.DataFrame(
        [
            {
                "detector": "d",
                "regime": "plain",
                "is_base": True,
                "method": "",
                "target_kind": "",
                "target_rate": math.nan,
                "target": "",
                "finetune_epochs": math.nan,
                "seed": s,
                "per_class_ap": json.dumps(
                    {"car": {"ap": a, "ap11": a}, "cyclist": {"ap": 0.5, "ap11": 0.4}}
                ),
            }
            for s, a in ((0, 0.8), (1, 0.6))
        ]  # fmt: skip
    )
    means = per_class_frame(frame).iloc[0]
    assert means["n"] == 2 and means["car"] == pytest.approx(0.7) and means["mAP"] == pytest.approx(0.6)
    written = write_per_class(frame, tmp_path / "voc", "suite", "synthetic-voc")
    text = written[0].read_text()
    rows = [
        [c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| d ")
    ]
    assert rows == [
        ["d", "base", "-", "2", "70.0", "50.0", "60.0"],
        ["d", "base", "-", "2", "70.0", "40.0", "55.0"],
    ]
    assert "area (VOC2010+)" in text and "11-point (VOC2007)" in text
