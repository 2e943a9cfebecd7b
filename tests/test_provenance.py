"""Every number knows where it came from: ids over the resolved configuration, provenance on every
row, stale rows found and recomputed, stores of the previous id scheme kept, files verified."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

import datasets
from detectors import build_detector, save_checkpoint
from detectors.fcos import SIZES as FCOS_SIZES
from methods.dcodp import DCODP
from methods.engine.training import Schedule
from results import ResultStore, code_line, machine_line
from runners import identity, provenance
from runners.cells import CellRunner
from runners.cli import main
from runners.executors import Driver, LocalExecutor
from runners.recompute import Recompute
from runners.suite import load_suite

SUITE = """
name = "ids"
seeds = [0]
methods = ["l1", "dcodp"]
targets = ["params:0.3"]
input_size = 64

[train]
epochs = 1
flip = 0.5  # written: a change of the schedule's default flip reaches only the fine-tuning

[finetune]
epochs = 1

[measure]
rounds = 2

[[experiments]]
detector = "fcos"
dataset = "synthetic-coco"
data = { num_train = 8, num_val = 4, image_size = 64 }

[[experiments]]
detector = "yolox"
dataset = "synthetic-kitti"
data = { num_train = 8, num_val = 4, image_size = 64 }
"""


@pytest.fixture
def suite_path(tmp_path: Path) -> Path:
    path = tmp_path / "ids.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture(autouse=True)
def _fresh_fingerprints():
    identity.detector_fingerprint.cache_clear()
    yield
    identity.detector_fingerprint.cache_clear()


def _ids(path: Path) -> dict[str, str]:
    identity.detector_fingerprint.cache_clear()
    return {c.label: c.cell_id for c in load_suite(path).cells()}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    assert before.keys() == after.keys()
    return {label for label in before if before[label] != after[label]}


def test_a_changed_default_changes_exactly_the_ids_it_affects(suite_path: Path, monkeypatch) -> None:
    before = _ids(suite_path)
    assert len(before) == 6 and len(set(before.values())) == 6

    with monkeypatch.context() as m:  # a method's default: that method's cells only
        m.setitem(DCODP.defaults, "coupling", "root")
        assert _changed(before, _ids(suite_path)) == {
            "fcos-tiny/synthetic-coco/dcodp params:0.3/s0",
            "yolox-tiny/synthetic-kitti/dcodp params:0.3/s0",
        }
    with monkeypatch.context() as m:  # a schedule default the suite leaves to [finetune] only
        defaults = list(Schedule.__init__.__defaults__)
        defaults[list(Schedule.__dataclass_fields__).index("flip")] = 0.0
        m.setattr(Schedule.__init__, "__defaults__", tuple(defaults))
        assert _changed(before, _ids(suite_path)) == {
            label for label in before if "/base/" not in label
        }  # the pruned cells fine-tune with it; the baselines' [train] wrote flip itself
    with monkeypatch.context() as m:  # a detector's default: that detector's cells only
        m.setitem(FCOS_SIZES["tiny"], "fpn_channels", 32)
        assert _changed(before, _ids(suite_path)) == {label for label in before if label.startswith("fcos")}
    with monkeypatch.context() as m:  # a dataset's default: its cells only
        m.setitem(datasets.DEFAULTS["synthetic-kitti"], "val_fraction", 0.3)
        assert _changed(before, _ids(suite_path)) == {label for label in before if "kitti" in label}
    assert _ids(suite_path) == before  # and back


def test_a_row_records_the_resolved_configuration(suite_path: Path) -> None:
    cell = next(c for c in load_suite(suite_path).cells() if c.method == "dcodp")
    config = cell.config()
    # the default, written out (coupling "sum", spelled as DCODP's parent_only was: ids kept)
    assert config["method_resolved"]["options"] == {"parent_only": False}
    assert config["prune"]["max_layer_ratio"] == 0.9 and config["finetune"]["flip"] == 0.5


def _row(cell, **values) -> dict:
    return {
        "cell_id": cell.cell_id,
        "suite": cell.suite,
        "detector": f"{cell.experiment.detector}-{cell.experiment.size}",
        "dataset": cell.experiment.dataset,
        "method": cell.method,
        "target": cell.target,
        "target_kind": cell.target.partition(":")[0],
        "target_rate": float(cell.target.partition(":")[2]) if cell.target else None,
        "seed": cell.seed,
        "regime": cell.regime,
        "input_size": cell.input_size,
        "metric": "ap",
        "map": 0.25,
        "ap50": 0.5,
        "params_m": 1.0,
        "gmacs": 0.1,
        "cpu": "Test CPU",
        "threads": 2,
        "device": "cpu",
        **values,
    }


def test_a_store_of_the_previous_id_scheme_reports_and_resumes(
    suite_path: Path, tmp_path: Path, capsys
) -> None:
    cells = load_suite(suite_path).cells()
    results = tmp_path / "results"
    store = ResultStore(results / "ids")
    env = json.dumps({"python": "3.11.7", "torch": "2.14.1"})
    for cell in cells:  # as the previous scheme stored them: under the written-options id
        store.put(_row(cell, cell_id=cell.legacy_cell_id, env=env))
    store.put(_row(cells[0], cell_id="0123456789abcdef", env=env))  # an id no scheme reaches
    assert {c.legacy_cell_id for c in cells}.isdisjoint({c.cell_id for c in cells})

    assert main(["report", str(suite_path), "--results-dir", str(results)]) == 0
    err = capsys.readouterr().err
    assert "1 rows of" in err and "left out of the tables" in err
    assert "6 of 6 finished rows were computed by other code" in err  # their code is unknown
    frame = store.frame()
    moved = frame[frame["cell_id"].isin({c.cell_id for c in cells})]
    assert len(moved) == 6 and set(moved["legacy_cell_id"]) == {c.legacy_cell_id for c in cells}
    assert (moved["python"] == "3.11.7").all() and (moved["torch"] == "2.14.1").all()
    assert moved["code_digest"].isna().all()  # unknown, never invented
    table = pd.read_csv(results / "ids" / "synthetic-coco.csv")
    assert len(table) == 3

    runner = Driver(load_suite(suite_path), results, tmp_path / "work", progress=False)
    todo, left = runner.pending(cells)
    assert todo == [] and left == []  # resumed: nothing to run
    assert store.rekey({c.legacy_cell_id: c.cell_id for c in cells}) == 0  # matched once


def _git_root_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(provenance.source_root()), "rev-list", "--max-parents=0", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.split()[0] if out.stdout.split() else None


@pytest.mark.parametrize("mode", ["stale", "all"])
def test_recompute_redoes_stale_rows_and_keeps_the_rest(
    suite_path: Path, tmp_path: Path, monkeypatch, mode: str
) -> None:
    suite = load_suite(suite_path)
    cells = suite.cells()
    results = tmp_path / "results"
    store = ResultStore(results / "ids")
    old_commit = _git_root_commit() or "f" * 40
    here = provenance.provenance(torch.device("cpu"))
    earlier = "2026-01-01T00:00:00+00:00"
    for i, cell in enumerate(cells):  # half by another commit's code, half by this checkout's
        made = {"harness_commit": old_commit, "code_digest": "0" * 16} if i % 2 else here
        store.put(_row(cell, created_at=earlier, **made))
    stale = {c.cell_id for i, c in enumerate(cells) if i % 2}

    computed: list[str] = []

    def compute(self, cell):
        computed.append(cell.cell_id)
        return _row(cell, map=0.75, created_at=None, **provenance.provenance(torch.device("cpu")))

    monkeypatch.setattr(Driver, "check_inputs", lambda self: None)  # no data needed: compute is faked
    monkeypatch.setattr(CellRunner, "compute", compute)

    assert (
        Driver(suite, results, tmp_path / "work", progress=False).run(LocalExecutor())["ran"] == 0
    )  # kept by default
    lines = provenance.describe_stale(list(store.made().values()))
    assert lines and lines[0].startswith("3 of 6 finished rows were computed by other code")
    if _git_root_commit() is not None:  # git names the files that differ
        assert "files differ: " in lines[1]

    counts = Driver(suite, results, tmp_path / "work", progress=False, recompute=Recompute(mode)).run(
        LocalExecutor()
    )
    redone = stale if mode == "stale" else {c.cell_id for c in cells}
    assert set(computed) == redone and counts["ran"] == len(redone) and counts["cells"] == 6
    frame = store.frame().set_index("cell_id")
    assert len(frame) == 6  # replaced, not duplicated
    assert (frame.loc[sorted(redone), "map"] == 0.75).all()
    assert (frame.loc[sorted(redone), "code_digest"] == provenance.code_digest()).all()
    kept = sorted({c.cell_id for c in cells} - redone)
    assert (frame.loc[kept, "map"] == 0.25).all() and (frame.loc[kept, "created_at"] == earlier).all()
    computed.clear()  # a second recompute of stale rows finds none left
    assert (
        Driver(suite, results, tmp_path / "work", progress=False, recompute=Recompute("stale")).run(
            LocalExecutor()
        )["ran"]
        == 0
    )


def test_recompute_decides_which_cached_baselines_are_kept() -> None:
    here = provenance.harness() | {"created_at": "2026-12-04T10:00:00+00:00"}
    other = {**here, "code_digest": "0" * 16}
    assert Recompute("none").keeps(other) and Recompute("none").keeps(here)
    assert Recompute("stale").keeps(here) and not Recompute("stale").keeps(other)
    assert not Recompute("stale").keeps({})  # a baseline from before baselines recorded their code
    assert not Recompute("all", "2026-12-04T11:00:00+00:00").keeps(here)
    assert Recompute("all", "2026-12-04T09:00:00+00:00").keeps(here)
    with pytest.raises(ValueError, match="one of none, stale, all"):
        Recompute("some")


def test_verify_names_a_truncated_checkpoint(tmp_path: Path, capsys) -> None:
    model = build_detector("fcos", 3, "tiny", 64)
    good = save_checkpoint(model, tmp_path / "work" / "base.pt")
    bad = save_checkpoint(model, tmp_path / "work" / "pruned.pt")
    data = tmp_path / "work" / "data" / "synthetic-s0-n8-v4-i64"
    datasets.build_dataset("synthetic-coco", "train", root=data.parent, num_train=8, num_val=4, image_size=64)
    results = tmp_path / "results"
    store = ResultStore(results / "ids")
    row = {"cell_id": "a" * 16, "suite": "ids", "detector": "fcos-tiny", "dataset": "synthetic-coco"}
    store.put(
        row | {"method": "base", "model_path": str(good), "baseline_path": str(good), "data_path": str(data)}
    )
    store.put(row | {"cell_id": "b" * 16, "method": "l1", "model_path": str(bad), "baseline_path": str(good)})

    assert main(["verify", "--results-dir", str(results)]) == 0
    assert "3 files referenced, 0 missing" in capsys.readouterr().out

    bad.write_bytes(bad.read_bytes()[:100])  # truncated after it was written
    next(data.rglob("*.png")).write_bytes(b"not the image")
    assert main(["verify", "--results-dir", str(results)]) == 1
    out = capsys.readouterr().out
    assert "2 missing or failing their checksum" in out
    assert f"{bad}: checksum mismatch" in out and good.name + ":" not in out
    assert f"{data}: " in out and "failed its checksum" in out

    good.unlink()
    assert main(["verify", "--results-dir", str(results)]) == 1
    assert f"{good}: missing" in capsys.readouterr().out
    assert main(["verify", "nosuchsuite", "--results-dir", str(results)]) == 2  # one line, exit 2


def test_tables_name_every_machine_and_version_their_rows_came_from() -> None:
    frame = pd.DataFrame(
        {
            "harness_commit": ["a" * 40, "a" * 40, "b" * 40, None],
            "harness_dirty": [0, 0, 1, None],
            "harness_version": ["0.1.0", "0.1.0", "0.1.0", None],
            "python": ["3.11.7"] * 3 + [None],
            "torch": ["2.14.1", "2.14.1", "2.11.0+cu130", None],
            "cpu": ["Intel Xeon", "Intel Xeon", "AMD EPYC", "AMD EPYC"],
            "threads": [2, 2, 16, 16],
            "device": ["cpu", "cpu", "cuda", "cuda"],
            "gpu": ["", "", "NVIDIA H200", "NVIDIA H200"],
            "gpu_driver": [None, None, "580.159.04", None],
            "input_size": [128] * 4,
        }
    )
    code = code_line(frame)
    assert "detprune aaaaaaaaaa (2 rows), bbbbbbbbbb+uncommitted (1 rows), unknown (1 rows)" in code
    assert "torch 2.14.1 (2 rows), 2.11.0+cu130 (1 rows), unknown (1 rows)" in code
    assert "written before rows recorded their code" in code
    machine = machine_line(frame)
    assert "CPU AMD EPYC (2 rows), Intel Xeon (2 rows)" in machine
    assert "GPU NVIDIA H200, driver 580.159.04" in machine
    one = code_line(frame.iloc[:2])
    assert one.startswith("Code: detprune aaaaaaaaaa; Python 3.11.7; torch 2.14.1;") and "rows)" not in one
