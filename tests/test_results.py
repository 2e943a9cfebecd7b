"""Tests for results/: the crash-safe store and the deterministic reporters."""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pandas as pd
import pytest

import results.store as store_mod
from results import COLUMNS, DuplicateCellError, ResultStore, render_table, write_reports

REPO = Path(__file__).resolve().parents[1]


def make_row(cell_id: str = "c1", **over: object) -> dict:
    row = {
        "cell_id": cell_id,
        "suite": "smoke",
        "detector": "fcos",
        "dataset": "synthetic",
        "method": "l1",
        "target": "params:0.3",
        "target_kind": "params",
        "target_rate": 0.3,
        "seed": 0,
        "regime": "plain",
        "input_size": 128,
        "metric": "ap",
        "achieved_params_pr": 0.301,
        "map": 0.25,
        "ap50": 0.5,
        "core_ms_median": 3.5,
        "threads": 4,
        "cpu": "Test CPU",
        "device": "cpu",
        "config": {"b": 1, "a": [1, 2]},
        "model_path": Path("/tmp/m.pt"),
    }
    row.update(over)
    return row


# ---------------------------------------------------------------------------- store


def test_schema_is_defined_once() -> None:
    names = [n for n, _ in COLUMNS]
    assert names[0] == "cell_id" and len(names) == len(set(names)) == 81
    assert {t for _, t in COLUMNS} == {"TEXT", "REAL", "INTEGER"}


def test_put_has_frame_round_trip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    assert not store.has("c1") and len(store) == 0
    assert list(store.frame().columns) == [n for n, _ in COLUMNS]
    store.put(make_row("c1"))
    store.put(make_row("c2", suite="other", map=float("nan")))
    assert store.has("c1") and not store.has("c3")
    assert store.finished_ids() == {"c1", "c2"}
    assert store.finished_ids("smoke") == {"c1"}
    df = store.frame("smoke")
    assert list(df.columns) == [n for n, _ in COLUMNS]
    r = df.iloc[0]
    assert r["cell_id"] == "c1" and r["map"] == 0.25 and r["seed"] == 0
    assert r["model_path"] == "/tmp/m.pt" and r["created_at"]
    assert json.loads(r["config"]) == {"a": [1, 2], "b": 1}
    assert r["config"] == '{"a": [1, 2], "b": 1}'  # sorted keys: stable text
    assert pd.isna(store.frame().set_index("cell_id").loc["c2", "map"])
    assert store.get("c1")["config"] == {"a": [1, 2], "b": 1}
    assert store.get("nope") is None


def test_directory_path_uses_default_file(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "smoke")
    assert store.path == tmp_path / "smoke" / "results.sqlite" and store.path.exists()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_put_rejected_unless_replace(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    store.put(make_row("c1", map=0.1))
    with pytest.raises(DuplicateCellError, match="already stored"):
        store.put(make_row("c1", map=0.2))
    assert store.get("c1")["map"] == 0.1
    store.put(make_row("c1", map=0.2), replace=True)
    assert len(store) == 1 and store.get("c1")["map"] == 0.2


def test_bad_rows_rejected(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match="unknown result columns \\['mAP'\\]"):
        store.put(make_row(mAP=0.3))
    with pytest.raises(ValueError, match="required columns \\['method'\\]"):
        store.put(make_row(method=""))
    with pytest.raises(ValueError, match="'map' is REAL"):
        store.put(make_row(map="0.3"))
    with pytest.raises(ValueError, match="'seed' is INTEGER"):
        store.put(make_row(seed=1.5))
    with pytest.raises(ValueError, match="'report' holds JSON"):
        store.put(make_row(report="{not json"))
    assert len(store) == 0


def test_delete(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    store.put(make_row("c1"))
    assert store.delete("c1") is True and store.delete("c1") is False
    assert not store.has("c1")


def test_reopen_sees_rows(tmp_path: Path) -> None:
    ResultStore(tmp_path / "r.sqlite").put(make_row("c1"))
    again = ResultStore(tmp_path / "r.sqlite")
    assert again.finished_ids() == {"c1"} and again.frame().iloc[0]["detector"] == "fcos"


def test_failure_inside_transaction_leaves_no_row(tmp_path: Path, monkeypatch) -> None:
    """The INSERT runs, then the transaction fails before commit: nothing may remain."""

    class FailAfterInsert(sqlite3.Connection):
        def execute(self, sql, *args):  # type: ignore[override]
            cur = super().execute(sql, *args)
            if sql.startswith("INSERT"):
                raise RuntimeError("killed mid-transaction")
            return cur

    store = ResultStore(tmp_path / "r.sqlite")
    real = sqlite3.connect
    monkeypatch.setattr(store_mod.sqlite3, "connect", functools.partial(real, factory=FailAfterInsert))
    with pytest.raises(RuntimeError, match="killed"):
        store.put(make_row("c1"))
    monkeypatch.setattr(store_mod.sqlite3, "connect", real)
    assert not store.has("c1") and len(store) == 0
    store.put(make_row("c1"))  # the rerun stores it normally
    assert store.finished_ids() == {"c1"}


def test_process_killed_mid_put_leaves_no_row(tmp_path: Path) -> None:
    """A hard kill (no cleanup at all) after the INSERT but before the commit."""
    script = textwrap.dedent(
        f"""
        import os, sqlite3
        from pathlib import Path
        import results.store as s
        store = s.ResultStore(Path({str(tmp_path / "r.sqlite")!r}))
        store.put({{"cell_id": "done", "suite": "x", "detector": "d", "dataset": "k", "method": "m"}})
        class Die(sqlite3.Connection):
            def execute(self, sql, *args):
                cur = super().execute(sql, *args)
                if sql.startswith("INSERT"):
                    os._exit(9)
                return cur
        real = sqlite3.connect
        s.sqlite3.connect = lambda *a, **k: real(*a, factory=Die, **k)
        store.put({{"cell_id": "half", "suite": "x", "detector": "d", "dataset": "k", "method": "m"}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    store = ResultStore(tmp_path / "r.sqlite")
    assert store.finished_ids() == {"done"}


def test_schema_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE results (cell_id TEXT PRIMARY KEY, suite TEXT)")
    with pytest.raises(store_mod.SchemaMismatchError, match="another schema"):
        ResultStore(path)


def test_an_older_store_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    ResultStore(path).put(make_row("old"))
    with sqlite3.connect(path) as conn:  # as written before one-shot mAP was measured
        conn.execute("ALTER TABLE results DROP COLUMN oneshot_map")
    store = ResultStore(path)
    store.put(make_row("new", oneshot_map=0.25))
    df = store.frame().set_index("cell_id")
    assert math.isnan(df.loc["old", "oneshot_map"]) and df.loc["new", "oneshot_map"] == 0.25
    assert list(df.reset_index().columns) == [n for n, _ in COLUMNS]


def test_import_results_does_not_import_torch() -> None:
    code = "import sys, results; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------- reports


def grid_frame() -> pd.DataFrame:
    """2 datasets x (base + 2 methods x 2 targets), inserted in a scrambled order."""
    rows = []
    for dataset, metric in (("coco", "ap"), ("kitti", "ap50")):
        rows.append(
            make_row(
                f"{dataset}-base",
                dataset=dataset,
                metric=metric,
                method="base",
                target="",
                target_kind="",
                target_rate=None,
                achieved_params_pr=0.0,
                achieved_flops_pr=0.0,
                gmacs=2.0,
                params_m=5.0,
                map=0.40,
                ap50=0.60,
                core_ms_median=10.0,
            )
        )
        for i, method in enumerate(("hrank", "chip")):
            for rate in (0.5, 0.3):
                rows.append(
                    make_row(
                        f"{dataset}-{method}-{rate}",
                        dataset=dataset,
                        metric=metric,
                        method=method,
                        target=f"params:{rate}",
                        target_rate=rate,
                        achieved_params_pr=rate + 0.0012 * (i + 1),
                        achieved_flops_pr=rate * 0.9,
                        gmacs=2.0 * (1 - rate),
                        params_m=5.0 * (1 - rate),
                        map=0.40 - rate / 10 - i / 100,
                        ap50=0.60 - rate / 10 - i / 100,
                        ap75=0.3,
                        aps=0.1,
                        core_ms_median=10.0 * (1 - rate),
                        core_ms_p90=11.0,
                        predict_ms_median=12.0,
                        oneshot_map=0.10 - i / 100,
                        oneshot_ap50=0.20 - i / 100,
                        finetune_epochs=1,
                        speedup_core=1.5,
                        speedup_core_lo=1.4,
                        speedup_core_hi=1.6,
                        efficiency_core=1.5 * (1 - rate),
                    )
                )
    return pd.DataFrame(rows[::-1])


def table_lines(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")][2:]  # skip header + rule
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_write_reports_files_and_order(tmp_path: Path) -> None:
    paths = write_reports(grid_frame(), tmp_path / "smoke", "smoke")
    names = sorted(p.name for p in paths)
    plots = ("_map_vs_pr.png", "_map_vs_speedup.png", "_speedup_vs_gmacs.png")
    suffixes = (".csv", ".md", ".tex", *plots, "_summary.csv", "_coco_ap.md")
    assert names == sorted(f"{d}{s}" for d in ("coco", "kitti") for s in suffixes)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths if p.suffix == ".png")

    md = (tmp_path / "smoke" / "coco.md").read_text()
    assert md.startswith("# smoke — coco")
    assert "Test CPU" in md and "4 threads" in md and "device cpu" in md
    assert "mAP = AP@[.5:.95]" in md and "One seed (0): no spread is known" in md
    assert "A GMACs ratio is not a speed-up" in md
    rows = table_lines(md)
    assert [r[1] for r in rows] == ["base", "chip", "chip", "hrank", "hrank"]
    assert [r[2] for r in rows] == ["-", "params:0.3", "params:0.5", "params:0.3", "params:0.5"]
    assert [r[3] for r in rows] == ["1"] * 5  # n: one seed each
    # PR% = achieved params reduction x100, one decimal; GFLOPs = 2 x GMACs
    assert [r[4] for r in rows] == ["0.0", "30.2", "50.2", "30.1", "50.1"]
    assert rows[1][6:9] == ["1.400", "2.800", "3.500"]
    assert [r[9] for r in rows] == ["-", "9.0", "9.0", "10.0", "10.0"]  # one-shot mAP
    assert [r[10] for r in rows] == ["40.0", "36.0", "34.0", "37.0", "35.0"]  # COCO: mAP = map
    assert [r[12] for r in rows] == ["-", "-", "-", "best", "best"]  # no spread: nothing is within it
    assert rows[1][14] == "1.50 [1.40, 1.60]" and rows[1][15] == "1.05"
    assert rows[0][13:] == ["10.00", "-", "-", "-"]

    kitti = (tmp_path / "smoke" / "kitti.md").read_text()
    assert "mAP = AP@0.5" in kitti
    kitti_rows = table_lines(kitti)
    assert [r[10] for r in kitti_rows] == ["60.0", "56.0", "54.0", "57.0", "55.0"]  # ap50
    assert [r[9] for r in kitti_rows] == ["-", "19.0", "19.0", "20.0", "20.0"]

    csv = pd.read_csv(tmp_path / "smoke" / "coco.csv")
    assert list(csv["method"]) == ["base", "chip", "chip", "hrank", "hrank"]
    assert {
        "map",
        "ap50",
        "ap75",
        "aps",
        "apm",
        "apl",
        "core_ms_p90",
        "predict_ms_p90",
        "gflops",
        "achieved_flops_pr",
        "oneshot_map",
        "speedup_core_lo",
        "efficiency_core",
        "finetune_epochs",
    } <= set(csv.columns)
    assert csv.loc[1, "ap75"] == 0.3 and csv.loc[0, "threads"] == 4

    tex = (tmp_path / "smoke" / "coco.tex").read_text()
    assert "\\toprule" in tex and "PR\\%" in tex and "$\\downarrow$" in tex and "params:0.3" in tex


def test_regenerating_is_byte_identical(tmp_path: Path) -> None:
    frame = grid_frame()
    first = {p.name: p.read_bytes() for p in write_reports(frame, tmp_path / "a", "smoke")}
    second = {
        p.name: p.read_bytes()
        for p in write_reports(frame.sample(frac=1, random_state=3), tmp_path / "b", "smoke")
    }
    for name in first:
        if name.endswith((".md", ".csv", ".tex")):
            assert first[name] == second[name], name


def test_reports_from_store_round_trip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results")
    frame = grid_frame().assign(created_at="2026-12-04T00:00:00+00:00")  # else put stamps it
    for row in frame.to_dict("records"):
        store.put({k: v for k, v in row.items() if not (isinstance(v, float) and v != v)})
    direct = write_reports(frame, tmp_path / "direct", "smoke")
    stored = write_reports(store.frame("smoke"), tmp_path / "stored", "smoke")
    for a, b in zip(direct, stored, strict=True):
        if a.suffix in (".md", ".csv"):
            assert a.read_bytes() == b.read_bytes(), a.name


def test_non_plain_regime_base_row_and_render_table() -> None:
    frame = grid_frame()
    frame = frame[frame["dataset"] == "coco"]
    ldt = [
        make_row(
            "ldt-base",
            dataset="coco",
            method="base",
            target="",
            target_kind="",
            target_rate=None,
            regime="ldt",
            achieved_params_pr=0.0,
        ),
        make_row("ldt-0.3", dataset="coco", method="ldt", regime="ldt"),
    ]
    frame = pd.concat([pd.DataFrame(ldt), frame])
    md = render_table(frame)
    methods = [r[1] for r in table_lines(md)]
    assert methods == ["base", "chip", "chip", "hrank", "hrank", "base (ldt)", "ldt"]
    with pytest.raises(ValueError, match="exactly one dataset"):
        render_table(grid_frame())
    assert render_table(grid_frame(), "kitti").startswith("| Detector")


def test_mixed_metrics_in_one_dataset_refused(tmp_path: Path) -> None:
    frame = pd.DataFrame([make_row("a", metric="ap"), make_row("b", metric="ap50")])
    with pytest.raises(ValueError, match="mixes metrics"):
        write_reports(frame, tmp_path, "smoke")


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    ResultStore(path)
    script = textwrap.dedent(
        """
        import sys
        from results.store import ResultStore
        store, tag = ResultStore(sys.argv[1]), sys.argv[2]
        for i in range(30):
            store.put({"cell_id": f"{tag}-{i}", "suite": "x", "detector": "d", "dataset": "k",
                       "method": "m"})
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), tag], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for tag in ("a", "b")
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert len(ResultStore(path).finished_ids("x")) == 60


def test_sparse_and_empty_frames(tmp_path: Path) -> None:
    assert write_reports(ResultStore(tmp_path / "empty").frame(), tmp_path / "out", "smoke") == []
    # a detector with only a base row and no latency, another with no mAP at all
    frame = pd.DataFrame(
        [
            make_row("a", method="base", target="", target_kind="", target_rate=None, core_ms_median=None),
            make_row("b", detector="yolox", map=None, ap50=None, core_ms_median=None),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_reports(frame, tmp_path / "out", "smoke")
    assert len(paths) == 6
    rows = table_lines((tmp_path / "out" / "synthetic.md").read_text())
    assert [r[:2] for r in rows] == [["fcos", "base"], ["yolox", "l1"]]
    assert rows[1][10] == "-"


def _replicates() -> pd.DataFrame:
    """3 seeds of base + chip/hrank at params:0.3: hrank clearly best, chip within its spread
    at 1 epoch of fine-tuning; two fine-tuning budgets."""
    rows = []
    for seed, jitter in zip((0, 1, 2), (-0.02, 0.0, 0.02), strict=True):
        rows.append(make_row(f"base-{seed}", seed=seed, method="base", target="", target_kind="",
                             target_rate=None, achieved_params_pr=0.0, map=0.40 + jitter))  # fmt: skip
        for epochs in (1, 4):
            for method, level in (("hrank", 0.30), ("chip", 0.29 if epochs == 1 else 0.10)):
                extra = {"finetune_epochs": epochs, "oneshot_map": 0.05, "speedup_core": 1.2 + jitter}
                rows.append(
                    make_row(
                        f"{method}-{seed}-{epochs}", seed=seed, method=method, map=level + jitter, **extra
                    )
                )
    return pd.DataFrame(rows)


def test_seeds_are_replicates_with_mean_std_and_marks(tmp_path: Path) -> None:
    paths = write_reports(_replicates(), tmp_path, "smoke")
    assert "synthetic_recovery.png" in {p.name for p in paths}  # several fine-tuning budgets
    md = (tmp_path / "synthetic.md").read_text()
    assert "Seeds 0, 1, 2, each a full replicate" in md
    rows = table_lines(md)
    headers = [c.strip() for c in md.splitlines()[[ln.startswith("|") for ln in md.splitlines()].index(True)]
               .strip("|").split("|")]  # fmt: skip
    col = {h: i for i, h in enumerate(headers)}
    assert "FT ep" in col
    by = {(r[col["Method"]], r[col["FT ep"]]): r for r in rows}
    assert by[("base", "-")][col["mAP"]] == "40.0 ± 2.0" and by[("base", "-")][col["n"]] == "3"
    assert by[("hrank", "1")][col["vs best"]] == "best" and by[("chip", "1")][col["vs best"]] == "≈"
    assert by[("chip", "4")][col["vs best"]] == "" and by[("hrank", "4")][col["vs best"]] == "best"
    assert by[("hrank", "1")][col["speed-up [95% CI]"]] == "1.20 ± 0.02"
    summary = pd.read_csv(tmp_path / "synthetic_summary.csv")
    assert set(summary["n"]) == {3} and summary["map_std"].round(4).max() == 0.02


def test_rows_whose_training_loss_misbehaved_are_flagged(tmp_path: Path) -> None:
    frame = grid_frame()
    bad = "baseline: the method's loss term (3.1e+03) outweighs the detection loss (1.2)"
    frame.loc[(frame["dataset"] == "coco") & (frame["method"] == "base"), "train_health"] = bad
    frame.loc[frame["method"] == "chip", "train_health"] = "ok"
    write_reports(frame, tmp_path, "smoke")
    md = (tmp_path / "coco.md").read_text()
    methods = [r[1] for r in table_lines(md)]
    assert methods == ["base ⚠", "chip", "chip", "hrank", "hrank"]
    assert "⚠ training health" in md and f"- fcos base: {bad}" in md
    assert "⚠" not in (tmp_path / "kitti.md").read_text()


def test_failures_are_listed_and_removed_once_none_are_left(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    assert (
        store.fail("c9", "smoke", "fcos-tiny/coco/px params:0.5/s0", "fine-tuning", "FloatingPointError: nan")
        == 1
    )
    assert store.fail("c9", "smoke", "fcos-tiny/coco/px params:0.5/s0", "scoring", "OutOfMemoryError: x") == 2
    paths = write_reports(grid_frame(), tmp_path / "out", "smoke", store.failures())
    listing = (tmp_path / "out" / "failures.md").read_text()
    assert tmp_path / "out" / "failures.md" in paths
    assert "| fcos-tiny/coco/px params:0.5/s0 | scoring | OutOfMemoryError: x |" in listing
    store.put(make_row("c9"))  # the rerun finished it: its row replaces its failure
    assert store.failures().empty and store.fail("c9", "smoke", "x", "s", "e") == 0
    write_reports(grid_frame(), tmp_path / "out", "smoke", store.failures())
    assert not (tmp_path / "out" / "failures.md").exists()


def test_an_unreadable_store_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    ResultStore(path).put(make_row())
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\x00" * 50 + data[150:])  # the header's page fields overwritten
    with pytest.raises(store_mod.StoreError, match="not a readable results store"):
        ResultStore(path)
    path.write_bytes(b"not sqlite at all" * 64)
    with pytest.raises(store_mod.StoreError, match="results.sqlite"):
        ResultStore(path)


def test_per_class_table_follows_the_main_tables_order(tmp_path: Path) -> None:
    """Rows arrive in store order; DCODP's Tables 1-2 read base first, then method by ratio."""
    frame = grid_frame()
    frame["per_class_ap"] = [
        json.dumps({"car": {"ap": m, "ap11": m}, "person": {"ap": 0.5, "ap11": 0.5}}) for m in frame["map"]
    ]
    first = write_reports(frame, tmp_path / "a", "smoke")
    second = write_reports(frame.sample(frac=1, random_state=5), tmp_path / "b", "smoke")
    md = (tmp_path / "a" / "coco_per_class.md").read_text()
    rows = [[c.strip() for c in ln.split("|")[1:4]] for ln in md.splitlines() if ln.startswith("| fcos")]
    area = rows[: len(rows) // 2]
    assert [r[1:] for r in area] == [
        ["base", "-"],
        ["chip", "params:0.3"],
        ["chip", "params:0.5"],
        ["hrank", "params:0.3"],
        ["hrank", "params:0.5"],
    ]
    by_name = {p.name: p.read_bytes() for p in second}
    assert {p.name: p.read_bytes() for p in first if "per_class" in p.name} == {
        n: b for n, b in by_name.items() if "per_class" in n
    }


def test_coco_breakdown_has_the_six_figures_of_dcodp_table_3(tmp_path: Path) -> None:
    frame = grid_frame()
    frame.loc[frame["dataset"] == "kitti", "aps"] = math.nan  # rows without a size breakdown
    names = {p.name for p in write_reports(frame, tmp_path, "smoke")}
    assert "coco_coco_ap.md" in names and "kitti_coco_ap.md" not in names
    md = (tmp_path / "coco_coco_ap.md").read_text()
    assert "Machine: CPU Test CPU" in md and "One seed (0)" in md
    header = next(
        [c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("| Det")
    )
    assert header[4:] == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    rows = table_lines(md)
    assert [r[1:3] for r in rows][:2] == [["base", "-"], ["chip", "params:0.3"]]
    # chip at 0.3: map = 0.40 - 0.03 - 0.01, ap50 = 0.60 - 0.03 - 0.01, ap75 0.3, aps 0.1
    assert rows[1][4:8] == ["36.0", "56.0", "30.0", "10.0"]
