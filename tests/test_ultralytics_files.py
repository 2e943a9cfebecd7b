"""Ultralytics' YOLOv8 files read as detprune's yolov8, without Ultralytics installed.

The names and shapes of Ultralytics' own ``DetectionModel`` (8.4.190, yolov8n and yolov8s at 80
classes) are committed in ``tests/data/ultralytics_yolov8_state.json``; ``tox -e ultralytics``
checks the same against the installed package's network, outputs and post-processing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from detectors import (
    DetectorError,
    build_detector,
    load_checkpoint,
    load_weights,
    native_state,
    read_weights,
    save_checkpoint,
)
from detectors.common import letterbox_centered, unletterbox
from detectors.ultralytics_files import DFL_KEY, from_ultralytics, to_ultralytics
from methods.ldt_math import map_instances
from runners import cli, deploy

MANIFEST = json.loads((Path(__file__).parent / "data" / "ultralytics_yolov8_state.json").read_text())


def _error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detprune: error: ") and "\n" not in err and "Traceback" not in err
    return err


def _randomised(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a map that swapped two layers' tensors would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("scale", ["n", "s"])
def test_the_name_map_round_trips_on_ultralytics_own_names_and_shapes(scale: str) -> None:
    theirs = MANIFEST["models"][f"yolov8{scale}"]
    ours = build_detector("yolov8", 80, scale, 640).state_dict()
    mapped = to_ultralytics(ours)
    assert {k: list(v.shape) for k, v in mapped.items()} == theirs  # every name, every shape
    state = {k: torch.zeros(shape) for k, shape in theirs.items()}
    state[DFL_KEY] = torch.arange(16.0).view(1, 16, 1, 1)
    back, spec = from_ultralytics(state)
    assert spec == {"size": scale, "num_classes": 80, "options": {"pipeline": "ultralytics"}}
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}


def test_a_state_dict_in_ultralytics_names_loads_and_predicts_as_the_model_it_came_from(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = _randomised(build_detector("yolov8", 3, "n", 128))
    path = tmp_path / "sd.pt"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in to_ultralytics(model.state_dict()).items()},
        path,
    )
    state, names = read_weights(path)
    assert names is None
    state, spec = native_state("yolov8", state)
    assert spec["size"] == "n" and spec["num_classes"] == 3
    loaded = build_detector("yolov8", 3, spec["size"], 128)
    load_weights(loaded, state, path)
    half = build_detector("yolov8", 3, "n", 128)  # the same weights rounded to half, as the file has them
    half.load_state_dict(
        {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    )
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))
    got, expected = loaded.eval().predict([image])[0], half.eval().predict([image])[0]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[key], expected[key])


def test_a_dfl_that_is_not_the_fixed_arange_is_refused() -> None:
    state = {k: torch.zeros(shape) for k, shape in MANIFEST["models"]["yolov8n"].items()}
    with pytest.raises(DetectorError, match="not Ultralytics' fixed arange"):
        from_ultralytics(state)


def test_an_ultralytics_file_given_to_another_detector_says_which_it_is(tmp_path: Path) -> None:
    model = build_detector("yolox", 3, "tiny", 64)
    state = to_ultralytics(build_detector("yolov8", 3, "n", 64).state_dict())
    with pytest.raises(DetectorError, match=r"looks like a 'yolov8' checkpoint \(--detector yolov8\)"):
        load_weights(model, state, "sd.pt")


def test_the_centred_letterbox_is_ultralytics_and_its_inverse_maps_boxes_back() -> None:
    image = torch.rand(3, 100, 60)
    batch, scales, offsets = letterbox_centered([image], 128)
    # r = 1.28: the image becomes 77 x 128, 51 columns of grey split 25 left / 26 right as
    # Ultralytics' round(d / 2 -+ 0.1) splits them
    assert scales == [(77 / 60, 1.28)] and offsets == [(25.0, 0.0)]
    assert torch.all(batch[0, :, :, :25] == 114 / 255) and torch.all(batch[0, :, :, 102:] == 114 / 255)
    assert not torch.all(batch[0, :, :, 25] == 114 / 255)
    box = torch.tensor([[10.0, 20.0, 50.0, 90.0]])
    placed = box * torch.tensor([77 / 60, 1.28, 77 / 60, 1.28]) + torch.tensor([25.0, 0.0, 25.0, 0.0])
    torch.testing.assert_close(unletterbox(placed, scales[0], image, offsets[0]), box)
    # LDT's instance mapping follows the same placement (Detector.input_offsets)
    inst, dropped = map_instances([image], [{"boxes": box, "labels": torch.tensor([0])}], (128, 128), offsets)
    torch.testing.assert_close(inst.boxes[0], box * 1.28 + torch.tensor([25.0, 0.0, 25.0, 0.0]))
    assert dropped == 0 and inst.extents == [(128.0, 25.0 + 60 * 1.28)]


def test_the_ultralytics_pipeline_places_boxes_in_the_image_and_trains() -> None:
    torch.manual_seed(0)
    model = build_detector("yolov8", 3, "n", 128, pipeline="ultralytics")
    assert model.score_thresh == 0.001  # the validator's conf unless told otherwise
    image = torch.rand(3, 100, 60)
    target = {"boxes": torch.tensor([[5.0, 10.0, 40.0, 80.0]]), "labels": torch.tensor([1])}
    assert model.input_offsets([image]) == [(25.0, 0.0)]
    losses = model.train().loss([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    out = model.eval().predict([image])[0]
    assert len(out["boxes"]) and out["boxes"][:, 2].max() <= 60 and out["boxes"][:, 3].max() <= 100
    with pytest.raises(DetectorError, match="unknown yolov8 pipeline 'yolo'"):
        build_detector("yolov8", 3, "n", 128, pipeline="yolo")


def test_the_ultralytics_output_is_decoded_boxes_and_sigmoid_scores() -> None:
    torch.manual_seed(0)
    model = build_detector("yolov8", 3, "n", 64).eval()
    x = torch.rand(2, 3, 64, 64)
    y = model.ultralytics_output(x)
    cls_logits, _ = model.core(x)
    assert y.shape == (2, 4 + 3, 64 // 8 * 64 // 8 + 64 // 16 * 64 // 16 + 4)
    torch.testing.assert_close(y[:, 4:], cls_logits.sigmoid().transpose(1, 2))
    assert torch.all(y[:, 2:4] >= 0)  # widths and heights


def _fake_ultralytics(monkeypatch) -> type[nn.Module]:
    """A stand-in ``ultralytics.nn.tasks.DetectionModel`` registered under Ultralytics' module
    name, so a pickle refers to Ultralytics' class as a real best.pt does."""
    package, nn_pkg, tasks = (
        types.ModuleType(n) for n in ("ultralytics", "ultralytics.nn", "ultralytics.nn.tasks")
    )

    class DetectionModel(nn.Module):
        def __init__(self, state: dict[str, torch.Tensor], names: dict[int, str]) -> None:
            super().__init__()
            self.weights = nn.ParameterDict(
                {k.replace(".", "__"): nn.Parameter(v, requires_grad=False) for k, v in state.items()}
            )
            self.names = names

        def state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - nn.Module's signature
            return {k.replace("__", "."): v for k, v in self.weights.items()}

    DetectionModel.__module__ = "ultralytics.nn.tasks"
    DetectionModel.__qualname__ = "DetectionModel"
    tasks.DetectionModel = DetectionModel
    package.__spec__ = importlib.machinery.ModuleSpec("ultralytics", None)  # find_spec reads it
    for name, module in (
        ("ultralytics", package),
        ("ultralytics.nn", nn_pkg),
        ("ultralytics.nn.tasks", tasks),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return DetectionModel


def test_a_pickled_best_pt_needs_trust_and_the_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DETPRUNE_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    source = _randomised(build_detector("yolov8", 3, "n", 64))
    theirs = {k: v.half() for k, v in to_ultralytics(source.state_dict()).items() if v.is_floating_point()}
    DetectionModel = _fake_ultralytics(monkeypatch)
    names = {0: "car", 1: "pedestrian", 2: "cyclist"}
    best = tmp_path / "best.pt"
    stale = DetectionModel({k: torch.zeros_like(v) for k, v in theirs.items()}, names)
    torch.save({"model": stale, "ema": DetectionModel(theirs, names), "epoch": -1}, best)
    monkeypatch.delitem(sys.modules, "ultralytics.nn.tasks")  # a machine without Ultralytics

    argv = ["prune", "--checkpoint", str(best), "--detector", "yolov8", "--data", "synthetic-coco",
            "--method", "l1", "--target", "params:0.3", "--input-size", "64",
            "--out", str(tmp_path / "p.pt")]  # fmt: skip
    err = _error(capsys, argv)
    assert "runs code from the file" in err and "--trust-checkpoint" in err and "state_dict()" in err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "ultralytics" else real_find_spec(n, *a)
    )
    err = _error(capsys, [*argv, "--trust-checkpoint"])
    assert "detprune[ultralytics]" in err and "AGPL-3.0" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["best.pt"]  # nothing written

    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setitem(sys.modules, "ultralytics.nn.tasks", _tasks(DetectionModel))
    state, got_names = read_weights(best, trust=True)
    assert got_names == ["car", "pedestrian", "cyclist"]
    assert all(
        torch.equal(state[k], v.float()) for k, v in theirs.items()
    )  # the EMA's, not the stale model's

    assert cli.main([*argv, "--trust-checkpoint", "--round-to", "1", "--export", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "pruned with l1 to params:0.3" in out and "one-shot" in out and "speed-up" in out
    model, _ = load_checkpoint(tmp_path / "p.pt")
    assert model.spec["size"] == "n" and model.spec["pipeline"] == "ultralytics"
    if deploy.available():
        assert "ultralytics layout" in out
        onnx = deploy.session(tmp_path / "p.onnx", 1)
        x = torch.rand(1, 3, 64, 64)
        (y,) = onnx.run(None, {"images": x.numpy()})
        assert onnx.get_outputs()[0].name == "output0" and y.shape == (1, 4 + 3, 84)
        with torch.no_grad():
            expected = model.eval().ultralytics_output(x)
        torch.testing.assert_close(torch.from_numpy(y), expected, atol=deploy.ATOL, rtol=deploy.RTOL)


def _tasks(cls: type[nn.Module]) -> types.ModuleType:
    module = types.ModuleType("ultralytics.nn.tasks")
    module.DetectionModel = cls
    return module


def test_ultralytics_file_bad_inputs(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DETPRUNE_HOME", str(tmp_path / "home"))
    sd = tmp_path / "sd.pt"
    torch.save(to_ultralytics(build_detector("yolov8", 3, "n", 64).state_dict()), sd)
    argv = ["prune", "--checkpoint", str(sd), "--detector", "yolov8", "--data", "synthetic-coco",
            "--method", "l1", "--target", "params:0.3", "--input-size", "64",
            "--out", str(tmp_path / "p.pt")]  # fmt: skip
    assert "holds a yolov8-n, not --size s" in _error(capsys, [*argv, "--size", "s"])
    eighty = tmp_path / "coco80.pt"
    torch.save(to_ultralytics(build_detector("yolov8", 80, "n", 64).state_dict()), eighty)
    err = _error(capsys, [*argv[:2], str(eighty), *argv[3:]])
    assert "predicts 80 classes; synthetic-coco has 3" in err
    fcos = tmp_path / "fcos.pt"
    save_checkpoint(build_detector("fcos", 3, "tiny", 64), fcos)
    if deploy.available():
        err = _error(
            capsys,
            [
                "export",
                "--checkpoint",
                str(fcos),
                "--out",
                str(tmp_path / "f.onnx"),
                "--layout",
                "ultralytics",
            ],
        )
        assert "the ultralytics layout is YOLOv8's" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == [
        "coco80.pt",
        "fcos.pt",
        "fcos.pt.sha256",
        "sd.pt",
    ]


def _suite(tmp_path: Path, experiment: str) -> list[str]:
    suite = tmp_path / "s.toml"
    suite.write_text(
        'methods = ["l1"]\ntargets = ["params:0.3"]\ninput_size = 64\n[train]\nepochs = 0\n'
        "[finetune]\nepochs = 0\n[measure]\nrounds = 3\nwarmup = 1\n[[experiments]]\n"
        'detector = "yolov8"\ndataset = "synthetic-coco"\n'
        "data = { num_train = 8, num_val = 4, image_size = 64 }\n" + experiment
    )
    return ["run", str(suite), "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]


def test_a_suite_starts_a_baseline_from_ultralytics_weights(tmp_path: Path, capsys, monkeypatch) -> None:
    torch.manual_seed(0)
    source = _randomised(build_detector("yolov8", 3, "n", 64))
    torch.save(to_ultralytics(source.state_dict()), tmp_path / "sd.pt")
    weights = f'weights = "{tmp_path / "sd.pt"}"\n'
    err = _error(capsys, _suite(tmp_path, f'size = "s"\n{weights}'))
    assert "holds a yolov8-n; the model to load it into is size 's'" in err
    err = _error(capsys, _suite(tmp_path, f'size = "n"\n{weights}trust = "yes"\n'))
    assert "trust must be true or false" in err
    assert not (tmp_path / "w" / "baselines").exists() and not (tmp_path / "r").exists()
    assert cli.main([*_suite(tmp_path, f'size = "n"\n{weights}'), "--no-progress"]) == 0
    baseline = next((tmp_path / "w" / "baselines").glob("*.pt"))
    model, _ = load_checkpoint(baseline)
    for key, value in source.state_dict().items():  # the file's weights, not an initialisation
        assert torch.equal(model.state_dict()[key], value), key
