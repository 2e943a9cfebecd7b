"""The packaged `torchvision` suite, shrunk to seconds, end to end: torchvision's own detectors
train, prune, fine-tune, measure and store like the harness's; a baseline given as a weights file
is that file, not a trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import detection as tvd

from detectors import load_checkpoint
from results import ResultStore
from runners.executors import Driver, LocalExecutor
from runners.suite import SUITES_DIR, load_suite


@pytest.mark.parametrize(
    "experiments",
    [pytest.param(0, id="weights-file"), pytest.param(3, id="all-three", marks=pytest.mark.slow)],
)
def test_the_torchvision_suite_runs_end_to_end(experiments: int, tmp_path: Path) -> None:
    """The default run keeps only the experiment from a weights file (SSDlite, 15 s); -m slow
    runs the packaged suite's three experiments, shrunk, beside it."""
    head, *entries = (SUITES_DIR / "torchvision.toml").read_text().split("[[experiments]]")
    assert len(entries) == 3 and "tv:ssdlite320" in entries[0]
    # [train] shortened in the text: an override would also replace the weights entry's epochs = 0
    head = head.replace(
        '[train]\noptimizer = "adamw"\nepochs = 8', '[train]\noptimizer = "adamw"\nepochs = 1'
    )
    assert "epochs = 8" not in head
    text = "[[experiments]]".join([head, *entries[:experiments]])
    small = "num_train = 16, num_val = 8, image_size = 64"
    text = text.replace("num_train = 512, num_val = 128, image_size = 128", small)
    # torchvision's SSDlite as a user trained and saved it: the base row is that file, untrained
    torch.manual_seed(0)
    theirs = tvd.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    torch.save(
        {"model": theirs.state_dict(), "epoch": 3}, tmp_path / "ssdlite.pth"
    )  # a reference-script file
    text += f"""
[[experiments]]
detector = "tv:ssdlite320_mobilenet_v3_large"
dataset = "synthetic-coco"
data = {{ {small} }}
weights = "{tmp_path / "ssdlite.pth"}"
train = {{ epochs = 0 }}
methods = ["l1"]
"""
    path = tmp_path / "torchvision.toml"
    path.write_text(text)
    overrides = {"methods": ["l1"], "input_size": 64, "train.warmup_iters": 1}
    overrides |= {"finetune.epochs": 1, "finetune.warmup_iters": 1, "prune.calibration_images": 8}
    overrides |= {"measure.warmup": 1, "measure.rounds": 2}
    suite = load_suite(path, overrides)
    counts = Driver(suite, tmp_path / "results", tmp_path / "work", progress=False).run(LocalExecutor())
    assert counts == {
        "cells": 2 * (experiments + 1),
        "ran": 2 * (experiments + 1),
        "failed": 0,
        "skipped": 0,
        "left_failed": 0,
    }

    frame = ResultStore(tmp_path / "results" / "torchvision" / "results.sqlite").frame("torchvision")
    names = [
        "tv:ssdlite320_mobilenet_v3_large",
        "tv:fasterrcnn_mobilenet_v3_large_fpn",
        "tv:fcos_resnet50_fpn",
    ]
    assert set(frame["detector"]) == {f"{n}-full" for n in names[: max(1, experiments)]}
    pruned = frame[frame["method"] != "base"]
    assert (abs(pruned["achieved_params_pr"] - 0.3) <= 0.005).all()
    for column in ("map", "oneshot_map", "gmacs", "core_ms_median", "speedup_core"):
        assert pruned[column].notna().all(), column

    base = next(c for c in suite.cells() if c.experiment.weights and c.method == "base")
    model, _ = load_checkpoint(tmp_path / "work" / "baselines" / f"{base.baseline_key}.pt")
    for key, value in theirs.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("$NO_SUCH_WEIGHTS_VAR/a.pth", "needs the environment variable NO_SUCH_WEIGHTS_VAR"),
        ("{tmp}/missing.pth", "weights file not found"),
        ("{tmp}/other.pth", "it has 'conv.weight'"),
    ],
)
def test_weights_that_are_not_there_or_do_not_fit_are_one_line(
    weights: str, message: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    from runners.cli import main

    monkeypatch.delenv("NO_SUCH_WEIGHTS_VAR", raising=False)
    state = tvd.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).state_dict()
    torch.save({**state, "conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    suite = tmp_path / "s.toml"
    suite.write_text(
        'methods = ["l1"]\ntargets = ["params:0.3"]\ninput_size = 64\n[[experiments]]\n'
        'detector = "tv:ssdlite320_mobilenet_v3_large"\ndataset = "synthetic-coco"\n'
        "data = { num_train = 8, num_val = 4, image_size = 64 }\n"
        f'weights = "{weights.format(tmp=tmp_path)}"\n'
    )
    args = ["run", str(suite), "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("detprune: error: ") and message in lines[0], lines
    assert not (tmp_path / "w" / "baselines").exists() and not (tmp_path / "r").exists()
