"""A tiny end-to-end grid: baseline, prune, fine-tune, measure, store; resume; a real kill."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from results import ResultStore
from runners.cells import CellRunner
from runners.executors import Driver, LocalExecutor
from runners.provenance import code_digest
from runners.suite import load_suite

TINY_SUITE = """
name = "tiny"
seeds = [0]
methods = ["l1", "random"]
targets = ["params:0.3"]
input_size = 64

[train]
epochs = 1
batch_size = 8
warmup_iters = 2

[finetune]
epochs = 1
batch_size = 8
warmup_iters = 1

[prune]
round_to = 1
calibration_images = 8

[measure]
warmup = 1
rounds = 2

[[experiments]]
detector = "fcos"
dataset = "synthetic-coco"
data = { num_train = 16, num_val = 8, image_size = 64 }
"""


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SUITE)
    return path


def test_grid_runs_and_resumes(tiny_suite: Path, tmp_path: Path, monkeypatch) -> None:
    suite = load_suite(tiny_suite)
    assert [c.method for c in suite.cells()] == ["base", "l1", "random"]
    work, results = tmp_path / "work", tmp_path / "results"

    # a crash in the second pruned cell is recorded as failed, writes no row, and the suite goes on
    calls = {"n": 0}
    original = CellRunner.run_pruned

    def flaky(self, cell):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated crash")
        return original(self, cell)

    monkeypatch.setattr(CellRunner, "run_pruned", flaky)
    counts = Driver(suite, results, work, progress=False).run(LocalExecutor())
    assert counts == {"cells": 3, "ran": 2, "failed": 1, "skipped": 0, "left_failed": 0}
    store = ResultStore(results / "tiny" / "results.sqlite")
    assert len(store.finished_ids()) == 2
    failed = store.failures()
    assert len(failed) == 1 and failed["error"][0] == "RuntimeError: simulated crash"
    assert failed["stage"][0] == "starting" and failed["attempts"][0] == 1

    counts = Driver(suite, results, work, progress=False).run(
        LocalExecutor()
    )  # a rerun retries the failed cell
    assert counts == {"cells": 3, "ran": 1, "failed": 0, "skipped": 2, "left_failed": 0}
    assert calls["n"] == 3  # only the failed cell ran again
    assert store.failures().empty  # its row replaced its failure

    frame = store.frame("tiny")
    assert sorted(frame["method"]) == ["base", "l1", "random"]
    pruned = frame[frame["method"] != "base"]
    assert (abs(pruned["achieved_params_pr"] - 0.3) <= 0.005).all()
    assert (pruned["params_m"] < frame[frame["method"] == "base"]["params_m"].iloc[0]).all()
    for column in ("map", "ap50", "gmacs", "core_ms_median", "predict_ms_p90"):
        assert frame[column].notna().all(), column
    # every row says which code, libraries and machine made it
    made = ("code_digest", "harness_version", "python", "torch", "torchvision", "torch_pruning", "cpu")
    for column in made:
        assert frame[column].notna().all() and (frame[column] != "").all(), column
    assert (frame["code_digest"] == code_digest()).all()
    assert frame["onnxruntime"].isna().all() and frame["gpu_driver"].isna().all()  # neither used
    assert all(Path(p).name.startswith("synthetic-") for p in frame["data_path"])
    assert all((Path(p).is_file() or (Path.cwd() / p).is_file()) for p in frame["model_path"])
    assert Driver(suite, results, work, progress=False).run(LocalExecutor())["ran"] == 0


def test_parallel_jobs_write_every_row_once(tiny_suite: Path, tmp_path: Path) -> None:
    suite = load_suite(tiny_suite)
    counts = Driver(suite, tmp_path / "results", tmp_path / "work", progress=False).run(LocalExecutor(jobs=2))
    assert counts == {"cells": 3, "ran": 3, "failed": 0, "skipped": 0, "left_failed": 0}
    frame = ResultStore(tmp_path / "results" / "tiny" / "results.sqlite").frame("tiny")
    assert sorted(frame["method"]) == ["base", "l1", "random"]
    assert all('"jobs": 2' in env for env in frame["env"])
    assert (frame["threads"] == max(1, torch.get_num_threads() // 2)).all()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_run_resumes_without_duplicates(tiny_suite: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DETPRUNE_HOME": str(tmp_path / "work")}
    cmd = [
        sys.executable,
        "-m",
        "runners.cli",
        "run",
        str(tiny_suite),
        "--results-dir",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    store_path = tmp_path / "r" / "tiny" / "results.sqlite"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        if store_path.is_file():
            try:  # the file exists a moment before its table does
                with sqlite3.connect(store_path, timeout=5) as conn:
                    rows = conn.execute("select count(*) from results").fetchone()[0]
            except sqlite3.OperationalError:
                rows = 0
            if rows >= 1:
                break
        time.sleep(0.2)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    assert "already done" in done.stdout
    with sqlite3.connect(store_path) as conn:
        ids = [r[0] for r in conn.execute("select cell_id from results")]
    assert len(ids) == len(set(ids)) == 3


def test_a_cached_baseline_this_code_cannot_load_is_trained_again(
    tiny_suite: Path, tmp_path: Path, capsys
) -> None:
    suite = load_suite(tiny_suite)
    runner = Driver(suite, tmp_path / "results", tmp_path / "work", progress=False).cells
    cell = next(c for c in suite.cells() if c.method == "base")
    path = tmp_path / "work" / "baselines" / f"{cell.baseline_key}.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"saved by an older detprune")  # what a stale cache entry looks like to the loader
    model, returned, _ = runner.baseline(cell)
    assert returned == path and "cached baseline unusable" in capsys.readouterr().err
    again, _, _ = runner.baseline(cell)  # the retrained one replaced it
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
