"""The paper suites (LDT's KITTI and COCO, DCODP's VOC and COCO, torchvision's COCO files): the
paper's grid and training, a tox environment each, and a fast, named failure without data."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

from methods import build_method, method_names
from runners.cli import main
from runners.suite import SuiteError, load_suite, parse_override


def _plans(suite):
    return {(p.experiment.detector, p.experiment.size): p for p in suite.experiments}


def test_kitti_suite_is_the_papers_grid() -> None:
    suite = load_suite("kitti")
    plans = _plans(suite)
    assert set(plans) == {("yolox", "s"), ("atss", "r50"), ("gfl", "r50")}
    assert all(p.experiment.dataset == "kitti" for p in plans.values())
    assert {"hrank", "groupfisher", "chip", "px", "ldt"} == set(plans["atss", "r50"].methods)
    yolox, atss = plans["yolox", "s"], plans["atss", "r50"]
    assert (yolox.train.epochs, yolox.train.weight_decay) == (100, 5e-4)
    assert (atss.train.epochs, atss.train.weight_decay) == (24, 1e-4)
    for schedule in (yolox.train, atss.train, atss.finetune):
        assert (schedule.optimizer, schedule.lr, schedule.momentum, schedule.batch_size) == (
            "sgd",
            0.01,
            0.9,
            16,
        )
    assert "params:0.7" in atss.targets and "params:0.65" in yolox.targets


def test_coco_suite_is_table_1() -> None:
    plans = _plans(load_suite("coco"))
    assert (
        plans["atss", "r50"].targets
        == plans["gfl", "r50"].targets
        == ["params:0.15", "params:0.2", "params:0.25"]
    )
    assert plans["yolof", "r50"].targets == ["flops:0.2", "flops:0.3", "flops:0.4"]
    assert all(p.experiment.dataset == "coco" and p.train.epochs == 24 for p in plans.values())


def test_overrides_reach_every_experiment() -> None:
    suite = load_suite("kitti", dict(map(parse_override, ["train.epochs=2", "input_size=320"])))
    assert suite.input_size == 320
    assert {p.train.epochs for p in suite.experiments} == {2}
    assert {p.finetune.epochs for p in suite.experiments} == {24, 100}  # only what was overridden
    # keys an experiment sets itself are overridden there too: COCO's per-detector targets, the
    # zoo's YOLOF input size
    coco = load_suite("coco", dict([parse_override('targets=["params:0.3"]')]))
    assert [p.targets for p in coco.experiments] == [["params:0.3"]] * 3
    assert {p.input_size for p in load_suite("zoo", {"input_size": 64}).experiments} == {64}
    assert {p.input_size for p in load_suite("zoo").experiments} == {128, 256}
    assert parse_override("prune.round_to=1") == ("prune.round_to", 1)
    with pytest.raises(SuiteError, match="KEY=VALUE"):
        parse_override("epochs")


@pytest.mark.parametrize(
    ("suite", "variable"),
    [
        ("kitti", "KITTI_ROOT"),
        ("coco", "COCO_ROOT"),
        ("tv_coco", "COCO_ROOT"),
        ("voc", "VOC_ROOT"),
        ("coco_dcodp", "COCO_ROOT"),
    ],
)
def test_missing_data_fails_at_once_naming_the_path(suite, variable, monkeypatch, tmp_path, capsys) -> None:
    args = ["run", suite, "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    monkeypatch.delenv(variable, raising=False)
    assert main(args) == 2
    assert variable in capsys.readouterr().err
    monkeypatch.setenv(variable, str(tmp_path / "no-such-data"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no-such-data" in err and err.count("\n") == 1
    assert not (tmp_path / "w" / "baselines").exists()  # nothing trained


FROZEN_IN_TORCHVISION = {
    "fcos_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
}


def test_tv_coco_names_torchvisions_published_files_and_evaluates_as_torchvision() -> None:
    from torchvision.models import detection as tvd
    from torchvision.models import get_model_weights

    from detectors.torchvision_models import BUILDERS

    suite = load_suite("tv_coco")
    plans = {p.experiment.detector.removeprefix("tv:"): p for p in suite.experiments}
    assert set(plans) == set(BUILDERS)
    for builder, plan in plans.items():
        url = get_model_weights(getattr(tvd, builder)).COCO_V1.url
        assert plan.experiment.weights == "$TV_WEIGHTS/" + url.rsplit("/", 1)[1]
        assert plan.train.epochs == 0 and plan.experiment.dataset == "coco"
        options = plan.experiment.detector_options
        assert options["coco_labels"] is True
        # frozen exactly where torchvision's pretrained build freezes the backbone's norms
        assert options.get("frozen_norms", False) == (builder in FROZEN_IN_TORCHVISION)
        if builder.startswith("ssd"):
            assert plan.input_size == 320 and "min_size" not in options
        else:
            assert (options["min_size"], options["max_size"], plan.input_size) == (800, 1333, 800)
    assert suite.evaluate["batch_size"] == 1


def test_dcodp_suites_are_its_tables() -> None:
    voc, coco = load_suite("voc"), load_suite("coco_dcodp")
    for suite, epochs in ((voc, 100), (coco, 150)):
        assert {(p.experiment.detector, p.experiment.size) for p in suite.experiments} == {
            ("yolov7", "base"),
            ("yolov8", "s"),
            ("faster_rcnn", "r50"),
        }
        for plan in suite.experiments:
            assert plan.targets == ["channels:0.2", "channels:0.5", "channels:0.7"]
            assert plan.input_size == 640 and plan.train.epochs == epochs and plan.finetune.epochs == 20
            for s in (plan.train, plan.finetune):
                assert (s.optimizer, s.lr, s.momentum, s.weight_decay) == ("adamw", 0.001, 0.937, 5e-4)
            options = plan.experiment.detector_options
            score, nms = (
                ("box_score_thresh", "box_nms_thresh")
                if "rcnn" in plan.experiment.detector
                else (
                    "score_thresh",
                    "nms_thresh",
                )
            )
            assert (options[score], options[nms]) == (0.001, 0.6)
            # Slimming and ThiNet are DCODP's ablation (dcodp_ablation), not its Tables 1-3
            assert set(plan.methods) == set(method_names()) - {"slimming", "thinet"}
    # Table 1 on the 07+12 protocol (tested on VOC2007), Table 2 on VOC2012's val
    protocols = sorted(p.experiment.data["protocol"] for p in voc.experiments)
    assert protocols == ["07+12"] * 3 + ["12"] * 3
    assert {p.experiment.dataset for p in coco.experiments} == {"coco"}


def test_the_dcodp_ablation_runs_each_criterion_with_and_without_coupling() -> None:
    for name, detectors in (
        ("dcodp_ablation", {("yolov7", "base"), ("yolov8", "s")}),
        ("dcodp_ablation_synthetic", {("yolov7", "tiny"), ("yolov8", "tiny")}),
    ):
        suite = load_suite(name)
        assert {(p.experiment.detector, p.experiment.size) for p in suite.experiments} == detectors
        couplings = {}
        for plan in suite.experiments:
            assert plan.targets == ["channels:0.2", "channels:0.5", "channels:0.7"]
            for method in plan.methods:
                built = build_method(method, **suite.method_options.get(method, {}))
                couplings.setdefault(built.name, set()).add(built.options["coupling"])
        assert couplings == {m: {"root", "sum"} for m in ("hrank", "slimming", "thinet", "dcodp")}
        cells = suite.cells()
        assert {c.regime for c in cells if c.method == "base"} == {"plain", "slimming"}


def test_every_paper_suite_is_a_tox_environment() -> None:
    """`tox -e <suite>` runs `detprune run <suite>` for each paper suite, passing its data variables."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(Path(__file__).parents[1] / "tox.ini")
    envs: dict[str, configparser.SectionProxy] = {}
    for section in ini.sections():
        match = re.fullmatch(r"testenv:\{(.+)\}", section)
        if match:
            envs |= dict.fromkeys(match.group(1).split(","), ini[section])
    assert {"kitti", "coco", "voc", "coco_dcodp", "tv_coco", "ldt_ablation", "px_ablation"} <= set(envs)
    for name, env in envs.items():
        load_suite(name)  # a packaged suite of that name
        assert "detprune run {env_name} {posargs}" in env["commands"]
        assert "*_ROOT" in env["pass_env"] and "TV_WEIGHTS" in env["pass_env"]
