"""Every detector, unpruned and pruned, exports to ONNX and runs on ONNX Runtime as it does in
PyTorch; ``detprune export`` writes only a file that checks, and its bad inputs are one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from detectors import build_detector, detector_names, save_checkpoint
from methods import PruneContext, Target, build_method, prune
from runners import cli, deploy
from tests.test_detector_matrix import SIZE, TV_OPTIONS

pytest.importorskip("onnxruntime", reason="the deploy extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnx", reason="the deploy extra (onnx, onnxruntime) is not installed")

# one detector a family (FCOS and ATSS share theirs), pruned before export
FAMILIES = [
    "fcos",
    "gfl",
    "faster_rcnn",
    "yolof",
    "yolov7",
    "yolov8",
    "yolox",
    "tv:ssdlite320_mobilenet_v3_large",
]


def _build(name: str):
    torch.manual_seed(0)
    if name.startswith("tv:"):
        options = TV_OPTIONS if "fasterrcnn" in name else {}
        return build_detector(name, 3, None, 128, **options).eval()
    return build_detector(name, 3, "tiny", SIZE).eval()


def _assert_exported(model, path: Path) -> None:
    check = deploy.export_onnx(model, path)
    assert path.is_file() and check.within and check.outputs == len(model.core(model.example_input()))
    # the file runs at another batch size too (where core() leaves it free), and matches PyTorch
    batch = 3 if model.dynamic_batch else 1
    x = torch.rand(batch, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(1))
    got = deploy.session(path, 1).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model.deployed().eval().core(x)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), e, atol=deploy.ATOL, rtol=deploy.RTOL)


@pytest.mark.parametrize("name", detector_names())
def test_every_detector_exports_and_matches_on_onnxruntime(name: str, tmp_path: Path) -> None:
    _assert_exported(_build(name), tmp_path / "core.onnx")


@pytest.mark.parametrize("name", FAMILIES)
def test_a_pruned_detector_of_every_family_exports(name: str, tmp_path: Path) -> None:
    model = _build(name)
    before = model.core(model.example_input())[0].shape
    prune(build_method("l1"), model, PruneContext(round_to=1, progress=False), Target.parse("params:0.3"))
    assert model.core(model.example_input())[0].shape == before  # the outputs keep their widths
    _assert_exported(model, tmp_path / "pruned.onnx")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(build_detector("yolov7", 3, "tiny", SIZE), tmp_path / "yolov7.pt")


def _error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detprune: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_export_writes_a_checked_file(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "exported yolov7-tiny core() at 64 px" in said and "max abs difference" in said
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.onnx", "yolov7.pt", "yolov7.pt.sha256"]
    )


def test_a_mismatch_writes_nothing(checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(deploy, "check_onnx", lambda *a, **k: deploy.Check(0.5, False, 3))
    out = tmp_path / "model.onnx"
    err = _error(capsys, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert "differ from PyTorch's" in err and "max abs difference 0.5" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yolov7.pt", "yolov7.pt.sha256"]  # no temporary


def test_export_bad_inputs(checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "model.onnx"
    assert "checkpoint not found" in _error(capsys, ["export", "--checkpoint", "nope.pt", "--out", str(out)])
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert "not a detprune checkpoint" in _error(
        capsys, ["export", "--checkpoint", str(junk), "--out", str(out)]
    )
    missing = tmp_path / "no" / "model.onnx"
    err = _error(capsys, ["export", "--checkpoint", str(checkpoint), "--out", str(missing)])
    assert "is not a folder" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the deploy extra not installed
    err = _error(capsys, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert "need the deploy extra" in err and "detprune[deploy]" in err
    assert not out.exists()


def test_paired_onnx_latency_times_both_models_on_onnxruntime(tmp_path: Path) -> None:
    base = _build("yolox")
    pruned = _build("yolox")
    prune(build_method("l1"), pruned, PruneContext(round_to=1, progress=False), Target.parse("channels:0.5"))
    timing = deploy.paired_onnx_latency(base, pruned, tmp_path, warmup=1, rounds=6, threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.onnx", "pruned.onnx"]
    assert timing["speedup_ort_lo"] <= timing["speedup_ort"] <= timing["speedup_ort_hi"]
    assert timing["speedup_ort"] == pytest.approx(
        timing["base_ort_core_ms_median"] / timing["ort_core_ms_median"]
    )
    assert 0 <= timing["export_max_abs_diff"] <= 1e-3
