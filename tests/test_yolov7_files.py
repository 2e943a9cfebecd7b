"""WongKinYiu/yolov7's official weights read as detprune's yolov7.

The names and shapes of yolov7's own training ``Model`` (yolov7-tiny.yaml and yolov7.yaml at 80
classes) are committed in ``tests/data/yolov7_official_state.json``. With yolov7's code beside
it (not shipped: GPL-3.0, and not a package), the same map gave raw outputs equal to the last bit
for both sizes; that check is in the README, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from detectors import (
    DetectorError,
    build_detector,
    load_weights,
    load_weights_file,
    native_state,
    read_weights,
)
from detectors.yolov7_files import from_official, to_official
from runners import cli

MANIFEST = json.loads((Path(__file__).parent / "data" / "yolov7_official_state.json").read_text())
NAMES = {"tiny": "yolov7-tiny", "base": "yolov7"}


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_the_name_map_round_trips_on_yolov7s_own_names_and_shapes(size: str) -> None:
    theirs = MANIFEST["models"][NAMES[size]]
    model = build_detector("yolov7", 80, size, 640)
    mapped = to_official(model.state_dict(), size, model.anchors, model.strides)
    assert {k: list(v.shape) for k, v in mapped.items()} == theirs  # every name, every shape
    state = {k: torch.zeros(shape) for k, shape in theirs.items()}
    state[f"model.{77 if size == 'tiny' else 105}.anchor_grid"] = torch.arange(18.0).view(3, 1, 3, 1, 1, 2)
    back, spec = from_official(state)
    assert spec == {
        "size": size,
        "num_classes": 80,
        "options": {"anchors": [[float(6 * i + j) for j in range(6)] for i in range(3)]},
    }
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in model.state_dict().items()}


def _randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def test_a_state_dict_in_yolov7s_names_loads_with_its_anchors_and_predicts_the_same(tmp_path: Path) -> None:
    anchors = [
        [9.0, 6.0, 13.0, 16.0, 29.0, 11.0],
        [29.0, 28.0, 66.0, 26.0, 51.0, 62.0],
        [115.0, 54.0, 134.0, 119.0, 308.0, 147.0],
    ]
    torch.manual_seed(0)
    model = _randomised(build_detector("yolov7", 3, "tiny", 128, anchors=anchors))
    path = tmp_path / "sd.pt"
    torch.save(to_official(model.state_dict(), "tiny", model.anchors, model.strides), path)
    state, spec = native_state("yolov7", read_weights(path)[0])
    assert spec == {"size": "tiny", "num_classes": 3, "options": {"anchors": anchors}}  # the file's
    loaded = build_detector("yolov7", 3, spec["size"], 128, **spec["options"])
    load_weights(loaded, state, path)
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))
    got, expected = loaded.eval().predict([image])[0], model.predict([image])[0]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[key], expected[key])
    with pytest.raises(DetectorError, match="carries its own anchors"):  # into the yaml's anchors: refused
        load_weights_file(build_detector("yolov7", 3, "tiny", 128), path)


def test_a_pickled_official_checkpoint_says_how_to_save_its_state_dict(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import sys
    import types

    module = types.ModuleType("models.yolo")

    class Model(nn.Module):
        pass

    Model.__module__, Model.__qualname__ = "models.yolo", "Model"
    module.Model = Model
    monkeypatch.setitem(sys.modules, "models", types.ModuleType("models"))
    monkeypatch.setitem(sys.modules, "models.yolo", module)
    path = tmp_path / "yolov7-tiny.pt"
    torch.save({"model": Model(), "epoch": -1}, path)
    monkeypatch.delitem(sys.modules, "models.yolo")
    monkeypatch.setenv("DETPRUNE_HOME", str(tmp_path / "home"))
    argv = ["prune", "--checkpoint", str(path), "--detector", "yolov7", "--data", "synthetic-coco",
            "--method", "l1", "--target", "params:0.3", "--out", str(tmp_path / "p.pt")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detprune: error: ") and "\n" not in err
    assert "pickled WongKinYiu/yolov7 checkpoint" in err and "state_dict()" in err
