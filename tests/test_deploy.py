"""Every detector, unpruned and pruned, exports to ONNX and runs on ONNX Runtime as it does in
PyTorch; ``detprune export`` writes only a file that checks, and its bad inputs are one line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from detectors import build_detector, detector_names, save_checkpoint
from methods import PruneContext, Target, build_method, prune
from results import ResultStore
from runners import cli, deploy
from runners.executors import Driver
from runners.executors.local import LocalExecutor
from runners.measure import Timing
from runners.suite import SuiteError, load_suite
from tests.test_detector_matrix import SIZE, TV_OPTIONS
from tests.test_grid import TINY_SUITE

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
    timing = deploy.paired_onnx_latency(base, pruned, tmp_path, Timing(warmup=1, rounds=6), threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.onnx", "pruned.onnx"]
    assert timing["speedup_ort_lo"] <= timing["speedup_ort"] <= timing["speedup_ort_hi"]
    assert timing["speedup_ort"] == pytest.approx(
        timing["base_ort_core_ms_median"] / timing["ort_core_ms_median"]
    )
    assert 0 <= timing["export_max_abs_diff"] <= 1e-3
    # a batch of 4 at once: four times the work per call, so more time per call than batch 1
    four = deploy.paired_onnx_latency(base, pruned, tmp_path, Timing(warmup=1, rounds=6), threads=1, batch=4)
    assert four["base_ort_core_ms_median"] > timing["base_ort_core_ms_median"]
    assert four["speedup_ort_lo"] <= four["speedup_ort"] <= four["speedup_ort_hi"]


# -- measure.runtimes: a suite's pruned rows timed on ONNX Runtime too -----------------------------


def _suite(tmp_path: Path, runtimes: str) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SUITE.replace("rounds = 2\n", f"rounds = 2\nruntimes = {runtimes}\n"))
    return path


def test_runtimes_are_checked_and_the_neutral_value_keeps_every_id(tmp_path: Path) -> None:
    plain = load_suite(_suite(tmp_path, '["torch"]'))
    default = tmp_path / "default.toml"
    default.write_text(TINY_SUITE)
    assert [c.cell_id for c in load_suite(default).cells()] == [c.cell_id for c in plain.cells()]
    both = load_suite(_suite(tmp_path, '["torch", "onnxruntime"]'))
    moved = {c.method for c, d in zip(plain.cells(), both.cells(), strict=True) if c.cell_id != d.cell_id}
    assert moved == {"l1", "random"}  # a base row is timed on PyTorch alone: its id does not move
    with pytest.raises(SuiteError, match="unknown key\\(s\\) onnxrt \\(did you mean 'onnxruntime'\\?\\)"):
        load_suite(_suite(tmp_path, '["torch", "onnxrt"]'))
    with pytest.raises(SuiteError, match="must list 'torch'"):
        load_suite(_suite(tmp_path, '["onnxruntime"]'))


def test_a_suite_times_its_pruned_rows_on_onnxruntime(tmp_path: Path) -> None:
    argv = ["run", str(_suite(tmp_path, '["torch", "onnxruntime"]')), "--results-dir", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w"), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0  # the cells, then the tables
    rows = ResultStore(tmp_path / "r" / "tiny").frame("tiny").set_index("method")
    for method in ("l1", "random"):
        r = rows.loc[method]
        assert r.speedup_ort_lo <= r.speedup_ort <= r.speedup_ort_hi
        assert r.speedup_ort == pytest.approx(r.base_ort_core_ms_median / r.ort_core_ms_median)
        assert r.efficiency_ort == pytest.approx(r.speedup_ort * r.gmacs / rows.loc["base"].gmacs)
        assert 0 <= r.export_max_abs_diff <= 1e-3 and r.onnxruntime == deploy.onnxruntime().__version__
    assert np.isnan(rows.loc["base"].speedup_ort) and pd.isna(rows.loc["base"].onnxruntime)
    table = (tmp_path / "r" / "tiny" / "synthetic-coco.md").read_text()
    assert f"onnxruntime {deploy.onnxruntime().__version__}." in table  # the base row used none
    assert "ORT speed-up [95% CI]" in table and "ORT eff." in table and "checked against PyTorch" in table
    assert "speedup_ort" in (tmp_path / "r" / "tiny" / "synthetic-coco.csv").read_text()


def test_a_failed_export_is_the_cells_failure_at_stage_export(tmp_path: Path, monkeypatch) -> None:
    def refuse(model, *args, **kwargs):
        raise deploy.DeployError(f"{type(model).__name__} does not export to ONNX: test")

    monkeypatch.setattr(deploy, "export_onnx", refuse)
    suite = load_suite(_suite(tmp_path, '["torch", "onnxruntime"]'))
    Driver(suite, tmp_path / "r", tmp_path / "w", progress=False).run(LocalExecutor())
    store = ResultStore(tmp_path / "r" / "tiny")
    failed = store.failures("tiny")
    assert sorted(failed["stage"]) == ["export", "export"] and all(
        "does not export" in e for e in failed["error"]
    )
    assert list(store.frame("tiny")["method"]) == ["base"]  # the base row was timed on PyTorch alone


def test_onnxruntime_in_a_suite_without_the_extra_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(deploy, "available", lambda: False)
    argv = ["run", str(_suite(tmp_path, '["torch", "onnxruntime"]')), "--results-dir", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w"), "--no-progress"]  # fmt: skip
    err = _error(capsys, argv)
    assert "runtimes names onnxruntime" in err and "detprune[deploy]" in err
    assert not (tmp_path / "r").exists()
