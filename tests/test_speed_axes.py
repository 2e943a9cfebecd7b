"""The speed measurement's axes: paired rounds until the interval is narrow (or the time is
spent), channel alignment (``prune.round_to``) as a list of cells, and speed-only cells on
untrained weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from results import ResultStore
from runners import cli
from runners.measure import Timing, paired_times
from runners.suite import SuiteError, load_suite
from tests.test_grid import TINY_SUITE

CPU = torch.device("cpu")


def _sleeps(base_s: float, pruned_s: float):
    return (lambda: time.sleep(base_s)), (lambda: time.sleep(pruned_s))


def test_fixed_rounds_unless_a_halfwidth_is_asked() -> None:
    base, pruned = _sleeps(0.002, 0.001)
    b, p = paired_times(base, pruned, CPU, Timing(warmup=1, rounds=6))
    assert len(b) == len(p) == 6
    # a loose target is met by the first rounds: no more are taken
    b, p = paired_times(base, pruned, CPU, Timing(warmup=0, rounds=6, halfwidth=0.9, max_seconds=30))
    assert len(p) == 6


def test_an_unreachable_halfwidth_stops_at_the_time_cap_with_balanced_rounds() -> None:
    base, pruned = _sleeps(0.002, 0.001)
    start = time.perf_counter()
    b, p = paired_times(base, pruned, CPU, Timing(warmup=0, rounds=6, halfwidth=1e-12, max_seconds=0.2))
    spent = time.perf_counter() - start
    assert len(b) == len(p) > 6 and len(p) % 2 == 0  # blocks of an even count keep ABBA balanced
    assert 0.2 <= spent < 2.0  # the cap is checked after every block of 3 rounds (~10 ms each)


def _suite(tmp_path: Path, prune: str = "", measure: str = "", train_epochs: int = 1) -> Path:
    text = TINY_SUITE.replace("round_to = 1\n", prune or "round_to = 1\n")
    text = text.replace("rounds = 2\n", f"rounds = 2\n{measure}")
    text = text.replace("[train]\nepochs = 1", f"[train]\nepochs = {train_epochs}")
    path = tmp_path / f"s{len(list(tmp_path.glob('s*.toml')))}.toml"
    path.write_text(text)
    return path


def test_round_to_as_a_list_is_an_axis_of_pruned_cells(tmp_path: Path) -> None:
    one = load_suite(_suite(tmp_path))
    listed = load_suite(_suite(tmp_path, "round_to = [1]\n"))
    assert [c.cell_id for c in listed.cells()] == [c.cell_id for c in one.cells()]  # [1] is 1
    three = load_suite(_suite(tmp_path, "round_to = [1, 8, 16]\n")).cells()
    assert [c.method for c in three].count("base") == 1 and len(three) == 1 + 2 * 3
    assert sorted(c.prune["round_to"] for c in three if c.method == "l1") == [1, 8, 16]
    assert len({c.cell_id for c in three}) == len(three)
    for bad in ("[]", "[8, 8]", "[0, 8]", "[1.5]", '"8"'):
        with pytest.raises(SuiteError, match="round_to must be a whole number >= 1, or a list"):
            load_suite(_suite(tmp_path, f"round_to = {bad}\n"))


def test_an_experiment_may_give_its_own_alignments(tmp_path: Path) -> None:
    # the same detector twice: every method at 1 and 16, l1 also at 8; one base row for both
    path = _suite(tmp_path, "round_to = [1, 16]\n")
    data = "data = { num_train = 16, num_val = 8, image_size = 64 }\n"
    second = '\n[[experiments]]\ndetector = "fcos"\ndataset = "synthetic-coco"\nmethods = ["l1"]\n'
    path.write_text(path.read_text() + second + "round_to = [8]\n" + data)
    cells = load_suite(path).cells()
    assert [c.method for c in cells].count("base") == 1
    aligned = sorted((c.method, c.prune["round_to"]) for c in cells if c.method != "base")
    assert aligned == [("l1", 1), ("l1", 8), ("l1", 16), ("random", 1), ("random", 16)]
    path.write_text(path.read_text().replace("round_to = [8]", "round_to = [8, 8]"))
    with pytest.raises(SuiteError, match="experiment 1: round_to must be a whole number >= 1, or a list"):
        load_suite(path)


def test_halfwidth_its_cap_and_batch_sizes_are_checked_and_move_only_pruned_ids(tmp_path: Path) -> None:
    plain = load_suite(_suite(tmp_path)).cells()
    ids = [c.cell_id for c in plain]
    assert [c.cell_id for c in load_suite(_suite(tmp_path, measure="batch_sizes = [1]\n")).cells()] == ids
    for measure in ("halfwidth = 0.02\nmax_seconds = 30\n", "batch_sizes = [1, 8]\n"):
        changed = load_suite(_suite(tmp_path, measure=measure)).cells()
        moved = {c.method for c, d in zip(plain, changed, strict=True) if c.cell_id != d.cell_id}
        assert moved == {"l1", "random"}  # a base row is timed alone: the pairs' keys are not its
    for bad in ("[]", "[8, 8]", "[0]", "8", "[2.5]"):
        with pytest.raises(SuiteError, match="batch_sizes must be a list of distinct whole numbers >= 1"):
            load_suite(_suite(tmp_path, measure=f"batch_sizes = {bad}\n"))
    for bad, needs in (("halfwidth = 1", "\\[0, 1\\)"), ("halfwidth = -0.1", "\\[0, 1\\)"),
                       ("max_seconds = 0", "> 0"), ("halfwidth = true", "\\[0, 1\\)")):  # fmt: skip
        with pytest.raises(SuiteError, match=f"must be a number.*{needs}"):
            load_suite(_suite(tmp_path, measure=f"{bad}\n"))


def test_a_speed_only_suite_on_untrained_weights_times_each_alignment(tmp_path: Path) -> None:
    measure = "halfwidth = 0.5\nmax_seconds = 5\nbatch_sizes = [1, 4]\n"
    path = _suite(tmp_path, "round_to = [1, 2]\n", measure, train_epochs=0)
    path.write_text(path.read_text().replace("[finetune]\nepochs = 1", "[finetune]\nepochs = 0"))
    suite = load_suite(path)
    assert all(c.speed_only for c in suite.cells())
    argv = ["run", str(path), "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"),
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = ResultStore(tmp_path / "r" / "tiny").frame("tiny")
    assert len(rows) == 5 and (rows["speed_only"] == 1).all()
    assert rows["map"].isna().all() and rows["oneshot_map"].isna().all()  # untrained: no mAP
    assert rows["predict_ms_median"].isna().all() and rows["core_ms_median"].notna().all()
    pruned = rows[rows["method"] != "base"]
    assert (pruned["timing_rounds"] >= 2).all() and pruned["speedup_core"].notna().all()
    table = (tmp_path / "r" / "tiny" / "synthetic-coco.md").read_text()
    assert "Speed only: untrained weights, widths as each criterion chose them" in table
    assert "Paired rounds per row: PyTorch" in table
    order = [m for m in ("l1 (round_to 1)", "l1 (round_to 2)", "random (round_to 1)") if m in table]
    assert len(order) == 3 and np.argsort([table.index(m) for m in order]).tolist() == [0, 1, 2]
    out = tmp_path / "r" / "tiny"
    assert (out / "synthetic-coco_speedup_vs_gmacs.png").read_bytes()[:4] == b"\x89PNG"
    # measure.batch_sizes: each pruned row timed at batch 4 too, paired as at batch 1
    for text in pruned["batch_timings"]:
        at_four = json.loads(text)["4"]
        assert at_four["speedup_core_lo"] <= at_four["speedup_core"] <= at_four["speedup_core_hi"]
        assert at_four["timing_rounds"] >= 2 and at_four["efficiency_core"] > 0
    batches = (out / "synthetic-coco_batches.md").read_text()
    assert batches.count("| l1 (round_to 2) ") == 2  # batch 1 and batch 4
    assert not (out / "synthetic-coco_map_vs_pr.png").exists()  # no mAP to plot
