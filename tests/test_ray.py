"""The Ray executor on a local Ray instance of 2 CPUs: the same rows as the in-process executor,
and a killed driver that a rerun finishes with every cell once."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detectors import load_checkpoint
from results import ResultStore
from runners.executors import Driver, LocalExecutor
from runners.suite import load_suite
from tests.test_grid import TINY_SUITE

ray = pytest.importorskip("ray")
from runners.executors.ray_cluster import RayExecutor  # noqa: E402  (needs ray)

SAME = ["achieved_params_pr", "achieved_flops_pr", "achieved_channels_pr", "params_m", "gmacs",
        "oneshot_map", "oneshot_ap50", "map", "ap50", "ap75", "train_health"]  # fmt: skip


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SUITE)
    return path


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=256 * 2**20)  # fmt: skip
    yield
    ray.shutdown()


def _equal(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_ray_rows_equal_the_in_process_rows(tiny: Path, tmp_path: Path, local_ray) -> None:
    suite = load_suite(tiny)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task with one CPU: the same arithmetic, in the same order
    try:
        local = Driver(suite, tmp_path / "local", tmp_path / "work-local", progress=False).run(
            LocalExecutor()
        )
    finally:
        torch.set_num_threads(threads)
    counts = Driver(suite, tmp_path / "ray", tmp_path / "work-ray", progress=False).run(
        RayExecutor(cpus_per_cell=1)
    )
    assert counts == local == {"cells": 3, "ran": 3, "failed": 0, "skipped": 0, "left_failed": 0}

    here = ResultStore(tmp_path / "local" / "tiny").frame().set_index("cell_id")
    there = ResultStore(tmp_path / "ray" / "tiny").frame().set_index("cell_id")
    assert sorted(here.index) == sorted(there.index) == sorted(c.cell_id for c in suite.cells())
    for cell_id in here.index:
        for column in SAME:
            assert _equal(here.at[cell_id, column], there.at[cell_id, column]), (cell_id, column)
        if here.at[cell_id, "method"] != "base":  # the pruned, fine-tuned models are the same tensors
            a, _ = load_checkpoint(here.at[cell_id, "model_path"])
            b, _ = load_checkpoint(there.at[cell_id, "model_path"])
            assert all(
                torch.equal(x, y)
                for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
            )
    assert (there["threads"] == 1).all()
    # a rerun on Ray finds every cell done
    again = Driver(suite, tmp_path / "ray", tmp_path / "work-ray", progress=False).run(RayExecutor())
    assert again == {"cells": 3, "ran": 0, "failed": 0, "skipped": 3, "left_failed": 0}


def _session_processes(session: Path) -> list[int]:
    """The processes with a file of one Ray session open (its node agents, which rename
    themselves and can outlive a killed driver)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd).startswith(str(session)) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_killed_driver_resumes_with_every_cell_once(tiny: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "runners.cli", "run", str(tiny), "--results-dir", str(tmp_path / "r"),
           "--work-dir", str(tmp_path / "w"), "--executor", "ray", "--no-progress"]  # fmt: skip
    store_path = tmp_path / "r" / "tiny" / "results.sqlite"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance of its own
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, rows = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None and rows < 1:
        if store_path.is_file():
            try:
                with sqlite3.connect(store_path, timeout=5) as conn:
                    rows = conn.execute("select count(*) from results").fetchone()[0]
            except sqlite3.OperationalError:
                rows = 0
        time.sleep(0.2)
    assert proc.poll() is None, (
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-800:]}"
    )
    session = Path("/tmp/ray/session_latest").resolve()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for pid in _session_processes(session):  # what Ray's node agents leave behind a kill -9
        os.kill(pid, signal.SIGKILL)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already done" in done.stdout and "Traceback" not in done.stderr
    with sqlite3.connect(store_path) as conn:
        ids = [r[0] for r in conn.execute("select cell_id from results")]
    assert len(ids) == len(set(ids)) == 3
