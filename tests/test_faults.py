"""What a long run on a shared machine meets: failing cells, kills at any stage, two runs of one
suite at once, damaged files, and an error in the middle of a progress bar."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from datasets import DatasetError
from detectors import ChecksumError, build_detector, load_checkpoint, save_checkpoint
from methods.l1 import L1
from methods.random import Random
from results import ResultStore
from runners import cli
from runners.executors import Driver, LocalExecutor
from runners.suite import load_suite
from tests.test_grid import TINY_SUITE

COMPLETE = ["map", "ap50", "params_m", "gmacs", "core_ms_median", "predict_ms_median", "train_health"]
PRUNED_COMPLETE = ["oneshot_map", "speedup_core", "efficiency_core", "achieved_params_pr"]


def _suite(tmp_path: Path, num_train: int = 16) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SUITE.replace("num_train = 16", f"num_train = {num_train}"))
    return path


def _rows(store_path: Path) -> list[tuple]:
    with sqlite3.connect(store_path) as conn:
        return conn.execute("select cell_id, method from results").fetchall()


def _assert_complete(store_path: Path, cells: int) -> None:
    frame = ResultStore(store_path).frame()
    assert len(frame) == cells == frame["cell_id"].nunique()
    for column in COMPLETE:
        assert frame[column].notna().all(), column
    pruned = frame[frame["method"] != "base"]
    for column in PRUNED_COMPLETE:
        assert pruned[column].notna().all(), column


def _temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob(".*tmp*")]


# -- a failing cell is recorded, the suite goes on, a rerun retries it -------------------------------
def test_failing_cells_are_recorded_listed_and_retried(tmp_path: Path, monkeypatch, capsys) -> None:
    suite_path = _suite(tmp_path)
    argv = ["run", str(suite_path), "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    argv.append("--no-progress")

    def nan_loss(self, ctx):  # a diverging fine-tuning: the loss becomes NaN
        return lambda model, batch, losses, neck: torch.tensor(float("nan"))

    def out_of_memory(self, model, ctx):  # scoring that runs out of memory
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

    monkeypatch.setattr(L1, "loss_hook", nan_loss)
    monkeypatch.setattr(Random, "importance", out_of_memory)
    assert cli.main(argv) == 1  # the suite finished what it could, and says some cells failed
    out, err = capsys.readouterr()
    assert "3 cells, 1 run, 2 failed, 0 already done" in out
    assert "failed at fine-tuning (FloatingPointError" in err and "failed at scoring (OutOfMemoryError" in err

    store = ResultStore(tmp_path / "r" / "tiny" / "results.sqlite")
    assert list(store.frame()["method"]) == ["base"]
    failures = store.failures().set_index("label")
    l1, rnd = (f"fcos-tiny/synthetic-coco/{m} params:0.3/s0" for m in ("l1", "random"))
    assert failures.loc[l1, "stage"] == "fine-tuning" and "loss became nan" in failures.loc[l1, "error"]
    assert failures.loc[rnd, "stage"] == "scoring" and "out of memory" in failures.loc[rnd, "error"]
    assert "in prune_and_finetune" in failures.loc[rnd, "detail"]  # the traceback's tail, for a bug report
    listing = (tmp_path / "r" / "tiny" / "failures.md").read_text()
    assert l1 in listing and "fine-tuning" in listing and "scoring" in listing
    assert "2 failed cells" in out and rnd in out  # under the tables the run printed

    assert cli.main([*argv, "--skip-failed"]) == 0  # leaves them
    assert "0 run, 1 already done, 2 failed before and left (--skip-failed)" in capsys.readouterr().out
    monkeypatch.undo()  # the methods work again: a plain rerun retries the failed cells
    assert cli.main(argv) == 0
    assert "3 cells, 2 run, 1 already done" in capsys.readouterr().out
    assert store.failures().empty and not (tmp_path / "r" / "tiny" / "failures.md").exists()
    _assert_complete(store.path, 3)


def test_a_failed_baseline_fails_its_cells_without_training_again(tmp_path: Path, monkeypatch) -> None:
    suite = load_suite(_suite(tmp_path))
    calls = {"n": 0}

    def diverge(*args, **kwargs):
        calls["n"] += 1
        raise FloatingPointError("baseline fcos/synthetic-coco: loss became inf at step 3")

    monkeypatch.setattr("runners.baselines.train", diverge)
    counts = Driver(suite, tmp_path / "r", tmp_path / "w", progress=False).run(LocalExecutor())
    assert counts == {"cells": 3, "ran": 0, "failed": 3, "skipped": 0, "left_failed": 0} and calls["n"] == 1
    failures = ResultStore(tmp_path / "r" / "tiny").failures()
    assert set(failures["stage"]) == {"baseline-training"}
    assert all("loss became inf" in e for e in failures["error"])


# -- kill -9 at any stage, then a rerun ----------------------------------------------------------------
def _command(suite_path: Path, tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "runners.cli", "run", str(suite_path), "--results-dir", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w"), "--no-progress"]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _kill_during_data_generation(cmd: list[str], work: Path) -> None:
    """SIGKILL from outside while the synthetic set is being written (its temporary folder exists)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 120, False
    while time.time() < deadline and proc.poll() is None and not seen:
        seen = any((work / "data").glob(".synthetic-*.tmp")) if (work / "data").is_dir() else False
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen, "the run never reached data generation"
    assert not list((work / "data").glob("synthetic-*")), "a set was finished: not killed mid-way"


EVERY_STAGE = [
    "baseline-step:2",  # mid-way through training the baseline
    "baseline-saved",  # baseline written, its row not
    "store",  # the base row computed, not yet stored
    "scoring",  # a method scoring channels
    "finetune-step:1",  # fine-tuning a pruned model
    "evaluation",  # evaluating the fine-tuned model
    "timing",  # timing a pruned model against its base
    "tables",  # every row stored, tables not yet written
]
QUICK = ["baseline-step:2", "store", "finetune-step:1", "tables"]  # each kill costs a process start


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize(
    "stages", [pytest.param(QUICK, id="quick"), pytest.param(EVERY_STAGE, id="every", marks=pytest.mark.slow)]
)
def test_kill_at_any_stage_then_rerun_finishes_every_cell_once(tmp_path: Path, stages: list[str]) -> None:
    suite_path = _suite(tmp_path, num_train=48)  # a set that takes long enough to write to kill it there
    cmd, store_path = _command(suite_path, tmp_path), tmp_path / "r" / "tiny" / "results.sqlite"
    _kill_during_data_generation(cmd, tmp_path / "w")
    for stage in stages:
        run = subprocess.run(
            cmd, env=_env(DETPRUNE_KILL_AT=stage), capture_output=True, text=True, timeout=600
        )
        assert run.returncode == -signal.SIGKILL, (
            f"{stage}: not killed there (rc {run.returncode}): {run.stderr[-800:]}"
        )
    assert len(_rows(store_path)) == 3  # the last kill came after every row was stored
    assert not (tmp_path / "r" / "tiny" / "tiny.md").exists()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 cells, 0 run, 3 already done" in done.stdout
    _assert_complete(store_path, 3)
    assert not _temporaries(tmp_path / "w", tmp_path / "r")  # the killed runs' partial files are gone
    assert (tmp_path / "r" / "tiny" / "synthetic-coco.md").is_file()
    baseline = next((tmp_path / "w" / "baselines").glob("*.pt"))
    load_checkpoint(baseline, require_checksum=True)  # the cached baseline is whole


# -- two runs of one suite at once ---------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_two_runs_at_once_share_the_work(tmp_path: Path) -> None:
    cmd = _command(_suite(tmp_path), tmp_path)
    procs = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert "Traceback" not in err
    rows = _rows(tmp_path / "r" / "tiny" / "results.sqlite")
    assert len(rows) == len({r[0] for r in rows}) == 3
    trained = sum(err.count("training the baseline of") for _, err in outputs)
    assert trained == 1  # one run trained it; the other waited for it or found it done
    ran = [int(re.search(r"3 cells, (\d+) run", out).group(1)) for out, _ in outputs]
    assert sum(ran) == 3  # every cell ran in exactly one of the two
    _assert_complete(tmp_path / "r" / "tiny" / "results.sqlite", 3)


# -- damaged files ---------------------------------------------------------------------------------------
def test_a_damaged_cached_baseline_is_trained_again(tmp_path: Path, capsys) -> None:
    suite = load_suite(_suite(tmp_path))
    runner = Driver(suite, tmp_path / "r", tmp_path / "w", progress=False).cells
    cell = next(c for c in suite.cells() if c.method == "base")
    first, path, _ = runner.baseline(cell)
    # overwritten by another checkpoint that loads fine: only the checksum can tell
    torch.manual_seed(1)
    other = build_detector("fcos", 3, "tiny", 64)
    torch.save({**torch.load(path, weights_only=True), "state_dict": other.state_dict()}, path)
    again, _, _ = runner.baseline(cell)
    assert "checksum mismatch" in capsys.readouterr().err
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True)
    )
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    runner.baseline(cell)
    assert "training it again" in capsys.readouterr().err
    load_checkpoint(path, require_checksum=True)


def test_a_changed_checkpoint_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(build_detector("fcos", 3, "tiny", 64), tmp_path / "pruned.pt")
    load_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        load_checkpoint(path)
    (tmp_path / "pruned.pt.sha256").unlink()
    with pytest.raises(ChecksumError, match="no checksum recorded"):
        load_checkpoint(path, require_checksum=True)


# -- an error in the middle of a progress bar ------------------------------------------------------------
def test_an_error_starts_its_own_line_after_a_progress_bar(tmp_path: Path, monkeypatch, capsys) -> None:
    def read_fails(self, executor=None):
        bar = tqdm(total=10, desc="suite tiny", file=sys.stderr)
        bar.update(3)
        raise DatasetError("/data/coco/train2017/000000123.jpg: cannot decode image: truncated")

    monkeypatch.setattr(Driver, "run", read_fails)
    assert cli.main(["run", str(_suite(tmp_path)), "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # \r does not end a line on a terminal: the bar's remains would
    assert last.startswith("detprune: error: /data/coco/train2017/000000123.jpg: cannot decode image")
