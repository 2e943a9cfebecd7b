"""The CLI's one-line errors and its listing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from detectors import build_detector, load_checkpoint, save_checkpoint
from results import ResultStore
from runners import deploy
from runners.cli import main
from runners.one_model import parse_options
from tests.test_results import make_row


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detprune: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_list(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "l1" in out and "random" in out and "fcos" in out and "atss" in out and "smoke" in out


def test_run_errors(capsys, tmp_path: Path) -> None:
    assert "unknown suite 'nosuch'" in _error(capsys, ["run", "nosuch"])
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'methods = ["l1", "magic"]\n[[experiments]]\ndetector = "fcos"\ndataset = "synthetic-coco"\n'
    )
    assert "unknown method 'magic'" in _error(capsys, ["run", str(bad)])
    bad.write_text(
        'targets = ["params:1.5"]\n[[experiments]]\ndetector = "fcos"\ndataset = "synthetic-coco"\n'
    )
    assert "rate must lie in (0, 1)" in _error(capsys, ["run", str(bad)])
    bad.write_text(
        '[[experiments]]\ndetector = "fcos"\ndataset = "kitti"\ndata = { root = "/no/such/kitti" }\n'
    )
    assert "/no/such/kitti" in _error(capsys, ["run", str(bad), "--results-dir", str(tmp_path)])
    bad.write_text("this is = not toml ]")
    assert "not valid TOML" in _error(capsys, ["run", str(bad)])


def test_option_values_are_toml_literals() -> None:
    assert parse_options(["d=10", "normalize=memory", "parent_only=true", "lr=0.5", 'name="x"']) == {
        "d": 10,
        "normalize": "memory",
        "parent_only": True,
        "lr": 0.5,
        "name": "x",
    }


def test_report_without_results(capsys, tmp_path: Path) -> None:
    assert "run it first" in _error(capsys, ["report", "smoke", "--results-dir", str(tmp_path)])


def test_report_of_a_store_run_with_other_overrides_says_so(capsys, tmp_path: Path) -> None:
    """A run's --set changes every cell id; a report without it used to write nothing, silently."""
    store = ResultStore(tmp_path / "smoke" / "results.sqlite")
    store.put(make_row("a-cell-of-another-configuration"))
    err = _error(capsys, ["report", "smoke", "--results-dir", str(tmp_path)])
    assert "holds 1 rows" in err and "--set" in err
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == ["results.sqlite"]


def test_prune_errors_and_success(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DETPRUNE_HOME", str(tmp_path / "home"))
    ckpt = tmp_path / "fcos.pt"
    torch.manual_seed(0)
    save_checkpoint(build_detector("fcos", 3, "tiny", 64), ckpt)
    common = [
        "prune",
        "--checkpoint",
        str(ckpt),
        "--data",
        "synthetic-coco",
        "--out",
        str(tmp_path / "out.pt"),
    ]
    assert "unknown method" in _error(capsys, [*common, "--method", "hrank9", "--target", "params:0.3"])
    assert "bad target" in _error(capsys, [*common, "--method", "l1", "--target", "params:2"])
    missing = [
        "prune",
        "--checkpoint",
        str(tmp_path / "none.pt"),
        "--data",
        "synthetic-coco",
        "--out",
        "x.pt",
    ]
    assert "checkpoint not found" in _error(capsys, [*missing, "--method", "l1", "--target", "params:0.3"])
    assert "unknown dataset" in _error(
        capsys, [*common[:4], "nodata", *common[5:], "--method", "l1", "--target", "params:0.3"]
    )
    assert "no option(s) bogus" in _error(
        capsys, [*common, "--method", "l1", "--target", "params:0.3", "--option", "bogus=1"]
    )
    assert "expected KEY=VALUE" in _error(
        capsys, [*common, "--method", "l1", "--target", "params:0.3", "--option", "novalue"]
    )
    ok = [*common, "--method", "l1", "--target", "params:0.4", "--round-to", "1", "--calibration-images", "4"]
    assert main(ok) == 0
    out = capsys.readouterr().out
    assert "pruned with l1 to params:0.4" in out
    # what it got: mAP before, one-shot (and no fine-tuning asked), the paired speed-up
    assert "on the synthetic-coco validation split" in out and "one-shot, not fine-tuned" in out
    assert "speed-up against the checkpoint it started from" in out and "95% CI" in out
    if deploy.available():  # and on the runtime that deploys it, both models checked against PyTorch
        ort = re.search(
            r"ONNX Runtime \S+ \(CPU\) core\(\) speed-up: ([\d.]+)x \[95% CI ([\d.]+), ([\d.]+)\]", out
        )
        assert ort and float(ort[2]) <= float(ort[1]) <= float(ort[3]) and "both exports match" in out
    model, meta = load_checkpoint(tmp_path / "out.pt")
    assert abs(meta["prune_report"]["achieved"]["params"] - 0.4) <= 0.005
    with pytest.raises(SystemExit):
        main(["prune"])  # argparse's own usage error for missing arguments
