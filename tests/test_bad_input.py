# ruff: noqa: E501  (the table of cases reads best one case per line)
"""Every user-supplied input that cannot work ends in one line on stderr, exit status 2, no
traceback, and nothing written: no store (or the store untouched), no pruned checkpoint.

One table, one row per bad input, each naming what the message must name (the file, the key, the
value, the nearest valid key). The inputs are built here by hand from a small generated set.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from datasets.synthetic import generate
from detectors import build_detector, save_checkpoint
from runners.cli import main

SUITE = """name = "bad"
methods = {methods}
targets = {targets}
input_size = {input_size}
{top}
[train]
epochs = 1
{train}
[[experiments]]
detector = "{detector}"
dataset = "{dataset}"
{experiment}
"""
SMALL = "data = { num_train = 8, num_val = 4, image_size = 64 }"


@dataclass
class Case:
    """``argv(paths)`` is the command; ``must`` the texts its one line names."""

    name: str
    argv: Callable[[dict[str, Path]], list[str]]
    must: list[str]
    prepare: Callable[[dict[str, Path]], None] = field(default=lambda paths: None)


def suite(top: str = "", train: str = "", detector: str = "fcos", dataset: str = "synthetic-coco",
          experiment: str = SMALL, extra: list[str] | None = None, methods: str = '["l1"]',
          targets: str = '["params:0.3"]', input_size: str = "64") -> Callable[[dict[str, Path]], list[str]]:  # fmt: skip
    """``detprune run`` on a suite file written from the template with these parts."""

    def argv(paths: dict[str, Path]) -> list[str]:
        text = SUITE.format(top=top, train=train, detector=detector, dataset=dataset, experiment=experiment,
                            methods=methods, targets=targets, input_size=input_size)  # fmt: skip
        paths["suite"].write_text(
            text.replace("$COCO", str(paths["coco"])).replace("$VOC", str(paths["voc"]))
        )
        return ["run", str(paths["suite"]), *_dirs(paths), *(extra or [])]

    return argv


def _dirs(paths: dict[str, Path]) -> list[str]:
    return ["--results-dir", str(paths["results"]), "--work-dir", str(paths["work"]), "--no-progress"]


def coco_suite(change: Callable[[dict], None] | None = None, file: str | None = None) -> Case:
    """A suite on a COCO-layout copy of the generated set, after ``change`` edits its train
    annotations, or ``file`` (a train image) is made unreadable."""

    def prepare(paths: dict[str, Path]) -> None:
        ann = paths["coco"] / "annotations" / "instances_train2017.json"
        if change is not None:
            data = json.loads(ann.read_text())
            change(data)
            ann.write_text(json.dumps(data))
        if file == "missing":
            (paths["coco"] / "train2017" / "000002.png").unlink()
        elif file == "garbage":
            (paths["coco"] / "train2017" / "000002.png").write_bytes(b"<html>not an image</html>")

    return prepare


def _negative_width(data: dict) -> None:
    data["annotations"][0]["bbox"][2] = -4.0


def _unknown_category(data: dict) -> None:
    data["annotations"][0]["category_id"] = 99


COCO = suite(dataset="coco", experiment='data = { root = "$COCO" }')
VOC = suite(dataset="voc", experiment='data = { root = "$VOC", protocol = "07" }')
VOC_XML = "VOC2007/Annotations/000002.xml"  # the generated set's VOC copy, read as real VOC


def voc_xml(*edits: tuple[str, str]) -> Callable[[dict[str, Path]], None]:
    """Replace, once each, ``old`` by ``new`` in a train image's VOC annotation."""

    def prepare(paths: dict[str, Path]) -> None:
        xml = paths["voc"] / VOC_XML
        text = xml.read_text()
        for old, new in edits:
            assert old in text
            text = text.replace(old, new, 1)
        xml.write_text(text)

    return prepare


def prune(*extra: str, checkpoint: str = "fcos") -> Callable[[dict[str, Path]], list[str]]:
    def argv(paths: dict[str, Path]) -> list[str]:
        return [
            "prune", "--checkpoint", str(paths[checkpoint]), "--data", "synthetic-coco", "--method", "l1",
            "--target", "params:0.3", "--out", str(paths["out"]), "--input-size", "64", *extra,
        ]  # fmt: skip

    return argv


def _corrupt_checkpoint(paths: dict[str, Path]) -> None:
    data = bytearray(paths["fcos"].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch may still load it, the checksum does not
    paths["fcos"].write_bytes(bytes(data))


def _garbage_store(paths: dict[str, Path]) -> None:
    store = paths["results"] / "bad" / "results.sqlite"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"this was a results store before someone overwrote it" * 100)


CASES = [
    Case("unknown suite", lambda p: ["run", "smoek", *_dirs(p)], ["unknown suite 'smoek'", "did you mean 'smoke'"]),
    Case("not TOML", lambda p: (p["suite"].write_text("x = = 1"), ["run", str(p["suite"])])[1], ["not valid TOML", "bad.toml"]),
    Case("misspelt top key", suite(top="seed = [0]"), ["bad.toml", "seed", "did you mean 'seeds'"]),
    Case("misspelt experiment key", suite(experiment='detecter = "fcos"'), ["experiment 0", "detecter", "did you mean 'detector'"]),
    Case("misspelt train key", suite(train="epoch = 2"), ["[train]", "epoch", "did you mean 'epochs'"]),
    Case("misspelt finetune key", suite(top="[finetune]\nbatchsize = 4"), ["[finetune]", "batchsize", "did you mean 'batch_size'"]),
    Case("misspelt prune key", suite(top="[prune]\nround = 8"), ["[prune]", "round", "did you mean 'round_to'"]),
    Case("misspelt measure key", suite(top="[measure]\nround = 3"), ["[measure]", "round", "did you mean 'rounds'"]),
    Case("unknown method", suite(methods='["l2"]'), ["unknown method 'l2'", "did you mean 'l1'"]),
    Case("unknown method option", suite(top="[method_options.hrank]\nimages = 4"), ["hrank", "images"]),
    Case("options of no method", suite(top="[method_options.hrnak]\nbatches = 4"), ["unknown method 'hrnak'", "did you mean 'hrank'"]),
    Case("unknown detector", suite(detector="fcoss"), ["unknown detector 'fcoss'", "did you mean 'fcos'"]),
    Case("unknown detector size", suite(experiment=f'size = "huge"\n{SMALL}'), ["experiment 0", "unknown size 'huge'"]),
    Case("unknown dataset", suite(dataset="synthetic-coc"), ["unknown dataset 'synthetic-coc'", "did you mean 'synthetic-coco'"]),
    Case("misspelt data option", suite(experiment="data = { num_trains = 8 }"), ["num_trains", "did you mean 'num_train'"]),
    Case("rate outside (0, 1)", suite(targets='["params:1.5"]'), ["params:1.5", "rate must lie in (0, 1)"]),
    Case("misspelt target kind", suite(targets='["param:0.3"]'), ["param:0.3", "did you mean 'params:0.3'"]),
    Case("input size 0", suite(input_size="0"), ["input_size", "not 0"]),
    Case("input size off the stride", suite(experiment=f"input_size = 100\n{SMALL}"), ["input_size 100", "multiple of 32", "try 128"]),
    Case("no seeds", suite(top="seeds = []"), ["seeds", "non-empty"]),
    Case("seed not a number", suite(top='seeds = ["a"]'), ["seeds", "'a'"]),
    Case("batch size not a number", suite(train='batch_size = "two"'), ["batch_size", "'two'"]),
    Case("unknown optimizer", suite(train='optimizer = "adam"'), ["optimizer", "'sgd' or 'adamw'", "'adam'"]),
    Case("--set value not TOML", suite(extra=["--set", "train.epochs=[[["]), ["train.epochs=[[[", "not TOML"]),
    Case("--set misspelt key", suite(extra=["--set", "train.epoch=2"]), ["train.epoch=2", "did you mean 'epochs'"]),
    Case("--set names no key", suite(extra=["--set", "nosuch=1"]), ["nosuch=1", "unknown key(s) nosuch"]),
    Case("--jobs 0", suite(extra=["--jobs", "0"]), ["--jobs 0"]),
    Case("--device unknown", suite(extra=["--device", "tpu9"]), ["tpu9", "not a device"]),
    Case("data root unset variable", suite(dataset="kitti", experiment='data = { root = "$NO_SUCH_VAR_X/kitti" }'), ["NO_SUCH_VAR_X"]),
    Case("kitti root missing", suite(dataset="kitti", experiment='data = { root = "/no/such/kitti" }'), ["/no/such/kitti"]),
    Case("coco root without its layout", suite(dataset="coco", experiment='data = { root = "$COCO/train2017" }'), ["train2017", "not found"]),
    Case("coco negative box", COCO, ["instances_train2017.json", "negative width"], coco_suite(_negative_width)),
    Case("coco unknown category", COCO, ["instances_train2017.json", "bad category_id 99"], coco_suite(_unknown_category)),
    Case("coco image missing", COCO, ["instances_train2017.json", "000002.png", "not found"], coco_suite(file="missing")),
    Case("coco image undecodable", COCO, ["000002.png", "cannot decode"], coco_suite(file="garbage")),
    Case("report before any run", lambda p: ["report", "smoke", "--results-dir", str(p["results"])], ["no results for suite 'smoke'", "run it first"]),
    Case("store overwritten", suite(), ["results.sqlite", "not a readable results store"], _garbage_store),
    Case("prune: checkpoint of another class count", prune(checkpoint="fcos5"), ["fcos5.pt", "predicts 5 classes", "synthetic-coco has 3"]),
    Case("prune: state_dict of another detector", prune("--detector", "fcos", checkpoint="yolox_sd"), ["yolox_sd.pt", "does not fit fcos-tiny", "looks like a 'yolox'"]),
    Case("prune: state_dict of another class count", prune("--detector", "fcos", checkpoint="fcos5_sd"), ["fcos5_sd.pt", "is [5", "in the file", "[3"]),
    Case("voc bndbox missing", VOC, [VOC_XML, "has no <bndbox>"], voc_xml(("<bndbox>", "<box>"), ("</bndbox>", "</box>"))),
    Case("voc coordinate not a number", VOC, [VOC_XML, "<xmin> is not a number"], voc_xml(("<xmin>", "<xmin>x"))),
    Case("voc unknown class", VOC, [VOC_XML, "unknown class 'x-"], voc_xml(("<name>", "<name>x-"))),
    Case("voc image missing", VOC, ["000002.jpg", "not found"], lambda p: (p["voc"] / "VOC2007/JPEGImages/000002.jpg").unlink()),
    Case("voc root missing", suite(dataset="voc", experiment='data = { root = "/no/such/VOCdevkit" }'), ["/no/such/VOCdevkit"]),
    # the report that opened issue 16: torchvision's FCOS file given as detprune's own FCOS-R50
    Case("prune: torchvision's state_dict as ours", prune("--detector", "fcos", "--size", "r50", checkpoint="tv_fcos_sd"), ["tv_fcos_sd.pt", "does not fit fcos-r50", "no 'backbone.body.stem.0.weight'", "looks like a 'tv:fcos_resnet50_fpn'"]),
    Case("prune: checkpoint changed after it was written", prune(), ["fcos.pt", "checksum mismatch"], _corrupt_checkpoint),
    Case("prune: not a weights file", prune("--detector", "fcos", checkpoint="notes"), ["notes.pt", "not a PyTorch weights file"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """What the cases copy: a COCO layout of a small generated set, and checkpoints."""
    root = tmp_path_factory.mktemp("shared")
    data = generate(root / "synthetic", num_train=8, num_val=4, image_size=64)
    coco = root / "coco"
    for split in ("train", "val"):
        shutil.copytree(data / "coco" / split, coco / f"{split}2017")
        (coco / "annotations").mkdir(exist_ok=True)
        shutil.copy(data / "coco" / "annotations" / f"instances_{split}.json",
                    coco / "annotations" / f"instances_{split}2017.json")  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(build_detector("fcos", 3, "tiny", 64), root / "fcos.pt")
    save_checkpoint(build_detector("fcos", 5, "tiny", 64), root / "fcos5.pt")
    torch.save(build_detector("yolox", 3, "tiny", 64).state_dict(), root / "yolox_sd.pt")
    torch.save(build_detector("fcos", 5, "tiny", 64).state_dict(), root / "fcos5_sd.pt")
    torch.save(build_detector("tv:fcos_resnet50_fpn", 3, None, 64).state_dict(), root / "tv_fcos_sd.pt")
    (root / "notes.pt").write_text("not weights")
    return {"root": root, "coco": coco, "voc": data / "voc" / "VOCdevkit"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, shared, tmp_path, capsys, monkeypatch) -> None:  # fmt: skip
    # the default synthetic set (prune's calibration data) is generated once for every case
    monkeypatch.setenv("DETPRUNE_HOME", str(shared["root"] / "home"))
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    paths = {"suite": tmp_path / "bad.toml", "results": tmp_path / "results", "work": tmp_path / "work",
             "out": tmp_path / "pruned.pt", "coco": tmp_path / "coco", "voc": tmp_path / "VOCdevkit"}  # fmt: skip
    shutil.copytree(shared["coco"], paths["coco"])
    shutil.copytree(shared["voc"], paths["voc"])
    for name in ("fcos", "fcos5", "yolox_sd", "fcos5_sd", "notes"):
        paths[name] = tmp_path / f"{name}.pt"
        shutil.copy(shared["root"] / f"{name}.pt", paths[name])
        if (shared["root"] / f"{name}.pt.sha256").exists():
            shutil.copy(shared["root"] / f"{name}.pt.sha256", tmp_path / f"{name}.pt.sha256")
    paths["tv_fcos_sd"] = shared["root"] / "tv_fcos_sd.pt"  # 130 MB: read in place, never copied
    case.prepare(paths)
    store = paths["results"] / "bad" / "results.sqlite"
    before = store.read_bytes() if store.exists() else None

    assert main(case.argv(paths)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("detprune: error: "), err
    assert "Traceback" not in err
    for text in case.must:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert (store.read_bytes() if store.exists() else None) == before  # no store, or untouched
    assert not paths["out"].exists()


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)
