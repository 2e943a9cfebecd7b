"""The results store: one SQLite file per results directory, one row per finished cell.

A suite can be killed at any moment and rerun; the runner then skips every cell whose id is
already stored. That only works if a row is either fully there or not there at all, so each
``put`` is one INSERT inside one transaction (SQLite's journal makes it atomic), the cell id
is the primary key (no duplicates, even from two processes), and every operation opens its
own short-lived connection with a busy timeout so parallel executors can share the file.

A cell that fails (a non-finite loss, an exception inside a method, out of memory) gets no row:
it gets a line in the ``failures`` table instead (its stage and reason), which the reporter lists
under the tables and which its row, once a rerun finishes the cell, replaces in one transaction.
A file that is not a readable store (truncated, overwritten) is one ``StoreError``, never opened
as an empty store.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sqlite3
from collections.abc import Mapping
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

TABLE = "results"
DEFAULT_FILENAME = "results.sqlite"

# The schema, defined once: the table, the validation in ``put`` and the frame's column
# order all derive from it. Fractions (``*_pr``, ``target_rate``, ``map`` ...) are 0..1.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("cell_id", "TEXT"),
    ("suite", "TEXT"),
    ("detector", "TEXT"),
    ("dataset", "TEXT"),
    ("method", "TEXT"),
    ("target", "TEXT"),  # "params:0.3"; "" for the unpruned base row
    ("target_kind", "TEXT"),  # "params" / "flops" / "channels" / ""
    ("target_rate", "REAL"),  # NULL for the base row
    ("seed", "INTEGER"),
    ("regime", "TEXT"),  # baseline training regime: "plain", "ldt", ...
    ("input_size", "INTEGER"),
    ("metric", "TEXT"),  # "ap" (AP@[.5:.95]) or "ap50": what the dataset's tables call mAP
    ("achieved_params_pr", "REAL"),
    ("achieved_flops_pr", "REAL"),
    ("achieved_channels_pr", "REAL"),
    ("params_m", "REAL"),
    ("gmacs", "REAL"),
    ("map", "REAL"),  # AP@[.5:.95]
    ("ap50", "REAL"),
    ("ap75", "REAL"),
    ("aps", "REAL"),
    ("apm", "REAL"),
    ("apl", "REAL"),
    # VOC's own AP at IoU 0.5 (DCODP's tables): area (VOC2010+) and 11-point (VOC2007), and
    # per class as JSON {class: {"ap": ..., "ap11": ...}}; NULL for other datasets
    ("voc_ap", "REAL"),
    ("voc_ap11", "REAL"),
    ("per_class_ap", "TEXT"),
    ("oneshot_map", "REAL"),  # AP@[.5:.95] right after pruning, before any fine-tuning
    ("oneshot_ap50", "REAL"),
    ("finetune_epochs", "INTEGER"),
    ("core_ms_median", "REAL"),
    ("core_ms_p90", "REAL"),
    ("predict_ms_median", "REAL"),
    ("predict_ms_p90", "REAL"),
    # paired timing: the pruned model against its own base, interleaved rounds in one process
    ("base_core_ms_median", "REAL"),
    ("base_predict_ms_median", "REAL"),
    ("speedup_core", "REAL"),  # base median / pruned median
    ("speedup_core_lo", "REAL"),  # its 95% interval (bootstrap over the paired rounds)
    ("speedup_core_hi", "REAL"),
    ("speedup_predict", "REAL"),
    ("speedup_predict_lo", "REAL"),
    ("speedup_predict_hi", "REAL"),
    ("efficiency_core", "REAL"),  # speedup_core / (base GMACs / pruned GMACs)
    # ONNX Runtime (measure.runtimes): the same pairing on both models exported and checked
    ("ort_core_ms_median", "REAL"),
    ("base_ort_core_ms_median", "REAL"),
    ("speedup_ort", "REAL"),
    ("speedup_ort_lo", "REAL"),
    ("speedup_ort_hi", "REAL"),
    ("efficiency_ort", "REAL"),
    ("export_max_abs_diff", "REAL"),  # the larger of the two exports' |ONNX Runtime - PyTorch|
    # "ok", or why the training loss looks wrong: the baseline's for a base row, the fine-tuning's
    # for a pruned one (a finite but diverging regime otherwise yields rows that look like results)
    ("train_health", "TEXT"),
    ("threads", "INTEGER"),
    ("cpu", "TEXT"),
    ("gpu", "TEXT"),
    ("device", "TEXT"),
    ("train_seconds", "REAL"),
    ("prune_seconds", "REAL"),
    ("finetune_seconds", "REAL"),
    ("eval_seconds", "REAL"),
    ("model_path", "TEXT"),
    ("baseline_path", "TEXT"),
    ("config", "TEXT"),  # JSON
    ("report", "TEXT"),  # JSON
    ("env", "TEXT"),  # JSON
    ("created_at", "TEXT"),  # ISO 8601, UTC; filled in by put when absent
    # provenance (runners/provenance.py): which code and libraries made the row. NULL in a row
    # written before rows recorded them (its code is unknown: stale until recomputed)
    ("harness_version", "TEXT"),  # the installed package's version
    ("harness_commit", "TEXT"),  # git commit of the checkout, where there is git
    ("harness_dirty", "INTEGER"),  # 1: the harness packages had uncommitted changes
    ("code_digest", "TEXT"),  # SHA-256 of the harness packages' sources: "the same code"
    ("python", "TEXT"),
    ("torch", "TEXT"),
    ("torchvision", "TEXT"),
    ("torch_pruning", "TEXT"),
    ("onnxruntime", "TEXT"),  # where the row used ONNX Runtime
    ("gpu_driver", "TEXT"),  # where the row ran on a GPU
    ("data_path", "TEXT"),  # the data the cell read (a synthetic set's folder: detprune verify)
    ("legacy_cell_id", "TEXT"),  # the id an earlier id scheme gave the row, where it was re-keyed
    ("timing_rounds", "INTEGER"),  # paired rounds core() took on PyTorch (measure.halfwidth: more)
    ("ort_timing_rounds", "INTEGER"),  # ... on ONNX Runtime
    ("ort_provider", "TEXT"),  # the ONNX Runtime execution provider that timed it
    ("speed_only", "INTEGER"),  # 1: untrained weights, sizes and speed only (no mAP)
    # measure.batch_sizes beyond 1: JSON {batch: {speedup_core, _lo, _hi, efficiency_core, ...}}
    ("batch_timings", "TEXT"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _ in COLUMNS)
JSON_COLUMNS: frozenset[str] = frozenset({"config", "report", "env", "per_class_ap"})
# A row without these cannot be placed in any table, so the database refuses it too.
REQUIRED: frozenset[str] = frozenset({"cell_id", "suite", "detector", "dataset", "method"})
_TYPES: dict[str, str] = dict(COLUMNS)
_NAMES_SQL = ", ".join(COLUMN_NAMES)
_SLOTS_SQL = ", ".join("?" for _ in COLUMN_NAMES)


class DuplicateCellError(ValueError):
    """A row for this cell id is already stored (a finished cell is never run twice)."""


class SchemaMismatchError(RuntimeError):
    """The file was written with another column set; mixing them would corrupt the tables."""


class StoreError(ValueError):
    """The file is not a readable results store: reported in one line, never silently replaced."""


FAILURES = "failures"
FAILURE_COLUMNS: tuple[str, ...] = (
    "cell_id", "suite", "label", "stage", "error", "detail", "attempts", "created_at",
)  # fmt: skip
_FAILURES_SQL = (
    f"CREATE TABLE IF NOT EXISTS {FAILURES} (cell_id TEXT PRIMARY KEY, suite TEXT NOT NULL, "
    "label TEXT, stage TEXT, error TEXT, detail TEXT, attempts INTEGER, created_at TEXT)"
)


def _create_sql() -> str:
    cols = []
    for name, sqltype in COLUMNS:
        extra = " PRIMARY KEY" if name == "cell_id" else " NOT NULL" if name in REQUIRED else ""
        cols.append(f"{name} {sqltype}{extra}")
    return f"CREATE TABLE IF NOT EXISTS {TABLE} ({', '.join(cols)})"


def _coerce(name: str, value: Any) -> Any:
    """Turn one value into what SQLite stores for its column, or say clearly why not.

    Checked here rather than left to SQLite, whose dynamic typing would happily store a
    string in a REAL column and break every table built later.
    """
    if value is None:
        return None
    sqltype = _TYPES[name]
    if name in JSON_COLUMNS:
        if isinstance(value, str):
            try:
                json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"column {name!r} holds JSON; got an unparsable string") from exc
            return value
        # sort_keys: the same config always serialises to the same text.
        return json.dumps(value, sort_keys=True, default=str)
    if sqltype == "TEXT":
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise ValueError(f"column {name!r} is TEXT; got {type(value).__name__} {value!r}")
    if sqltype == "INTEGER":
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and (math.isnan(value) or float(value).is_integer()):
            return None if math.isnan(value) else int(value)  # a pandas column with gaps is float
        raise ValueError(f"column {name!r} is INTEGER; got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Real):  # REAL; numpy scalars register as numbers.Real
        value = float(value)
        return None if math.isnan(value) else value
    raise ValueError(f"column {name!r} is REAL; got {type(value).__name__} {value!r}")


class ResultStore:
    """One SQLite results file. Cheap to construct; holds no open connection.

    ``path`` is the SQLite file, or a results directory (an existing directory, or a path
    without a suffix), in which case the file is ``<path>/results.sqlite``.
    """

    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / DEFAULT_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.timeout = timeout
        try:
            self._open()
        except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
            raise StoreError(
                f"{self.path}: not a readable results store ({exc}); move it aside and rerun the "
                "suite to rebuild it (its cells then run again)"
            ) from None

    def _open(self) -> None:
        with closing(self._connect()) as conn:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {verdict}")
            # WAL is persistent in the file: readers never block the writer and a killed
            # writer's uncommitted transaction is simply discarded on the next open.
            conn.execute("PRAGMA journal_mode=WAL")
            with conn:
                conn.execute(_create_sql())
                conn.execute(_FAILURES_SQL)
            found = tuple(r[1] for r in conn.execute(f"PRAGMA table_info({TABLE})"))
            missing = [n for n in COLUMN_NAMES if n not in found]
            extra = sorted(set(found) - set(COLUMN_NAMES))
            if extra or any(n in REQUIRED for n in missing):
                detail = f"missing {sorted(missing)}, extra {extra}"
                raise SchemaMismatchError(f"{self.path} has another schema ({detail}); use a new file")
            # a store written before a measurement existed gains its column, empty for old rows
            with conn:
                for name in missing:
                    conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN {name} {_TYPES[name]}")

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=self.timeout)

    def put(self, row: Mapping[str, Any], replace: bool = False) -> None:
        """Store one finished cell atomically.

        Raises ValueError for unknown columns, missing required ones or wrongly typed values,
        and DuplicateCellError when the cell is already stored, unless ``replace`` is true.
        """
        unknown = sorted(set(row) - set(COLUMN_NAMES))
        if unknown:
            raise ValueError(f"unknown result columns {unknown}; known: {list(COLUMN_NAMES)}")
        missing = sorted(k for k in REQUIRED if row.get(k) in (None, ""))
        if missing:
            raise ValueError(f"result row lacks required columns {missing}")
        values = {name: _coerce(name, row.get(name)) for name in COLUMN_NAMES}
        if values["created_at"] is None:
            values["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        sql = f"{verb} INTO {TABLE} ({_NAMES_SQL}) VALUES ({_SLOTS_SQL})"
        try:
            with closing(self._connect()) as conn, conn:
                conn.execute(sql, tuple(values[n] for n in COLUMN_NAMES))
                # a finished cell is no longer a failed one, in the same transaction
                conn.execute(f"DELETE FROM {FAILURES} WHERE cell_id = ?", (values["cell_id"],))
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise DuplicateCellError(
                    f"cell {values['cell_id']!r} is already stored in {self.path}; "
                    "pass replace=True to overwrite it"
                ) from exc
            raise

    def fail(self, cell_id: str, suite: str, label: str, stage: str, error: str, detail: str = "") -> int:
        """Record that a cell failed at ``stage`` with ``error``; returns how often it has failed.

        A cell that already has a row is left alone (another run finished it)."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with closing(self._connect()) as conn, conn:
            if conn.execute(f"SELECT 1 FROM {TABLE} WHERE cell_id = ?", (cell_id,)).fetchone():
                return 0
            found = conn.execute(f"SELECT attempts FROM {FAILURES} WHERE cell_id = ?", (cell_id,)).fetchone()
            attempts = (found[0] or 0) + 1 if found else 1
            conn.execute(
                f"INSERT OR REPLACE INTO {FAILURES} ({', '.join(FAILURE_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in FAILURE_COLUMNS)})",
                (cell_id, suite, label, stage, error, detail, attempts, now),
            )
        return attempts

    def failures(self, suite: str | None = None) -> pd.DataFrame:
        """The failed cells (no row yet), oldest first: id, suite, label, stage, error, detail, attempts."""
        sql = f"SELECT {', '.join(FAILURE_COLUMNS)} FROM {FAILURES}"
        params: tuple[str, ...] = ()
        if suite is not None:
            sql, params = sql + " WHERE suite = ?", (suite,)
        with closing(self._connect()) as conn:
            return pd.read_sql_query(sql + " ORDER BY created_at, cell_id", conn, params=params)

    def rekey(self, ids: Mapping[str, str]) -> int:
        """Move rows (and failures) stored under an earlier scheme's id to today's, once: ``ids``
        maps an old id to the new one. A row whose new id is already stored stays as it is (and
        out of every table). The moved row keeps its old id in ``legacy_cell_id``; what its env
        recorded of Python and torch fills those columns. Returns how many rows moved."""
        moved = 0
        with closing(self._connect()) as conn, conn:
            stored = {r[0] for r in conn.execute(f"SELECT cell_id FROM {TABLE}")}
            for old, new in ids.items():
                if old == new or old not in stored or new in stored:
                    continue
                env = conn.execute(f"SELECT env FROM {TABLE} WHERE cell_id = ?", (old,)).fetchone()[0]
                env = json.loads(env) if env else {}
                conn.execute(
                    f"UPDATE {TABLE} SET cell_id = ?, legacy_cell_id = ?, python = COALESCE(python, ?), "
                    "torch = COALESCE(torch, ?) WHERE cell_id = ?",
                    (new, old, env.get("python"), env.get("torch"), old),
                )
                stored.add(new)
                moved += 1
            failed = {r[0] for r in conn.execute(f"SELECT cell_id FROM {FAILURES}")}
            for old, new in ids.items():
                if old != new and old in failed and new not in failed and new not in stored:
                    conn.execute(f"UPDATE {FAILURES} SET cell_id = ? WHERE cell_id = ?", (new, old))
        return moved

    def has(self, cell_id: str) -> bool:
        """Whether the cell is finished (its row is stored)."""
        with closing(self._connect()) as conn:
            hit = conn.execute(f"SELECT 1 FROM {TABLE} WHERE cell_id = ?", (cell_id,)).fetchone()
        return hit is not None

    def made(self) -> dict[str, dict[str, Any]]:
        """Every stored row's provenance by cell id: what made it (``code_digest``, commit, dirty)
        and when (``created_at``)."""
        cols = ("cell_id", "code_digest", "harness_commit", "harness_dirty", "created_at")
        with closing(self._connect()) as conn:
            found = conn.execute(f"SELECT {', '.join(cols)} FROM {TABLE}").fetchall()
        return {r[0]: dict(zip(cols[1:], r[1:], strict=True)) for r in found}

    def get(self, cell_id: str) -> dict[str, Any] | None:
        """One stored row as a dict with the JSON columns decoded, or None."""
        with closing(self._connect()) as conn:
            sql = f"SELECT {_NAMES_SQL} FROM {TABLE} WHERE cell_id = ?"
            hit = conn.execute(sql, (cell_id,)).fetchone()
        if hit is None:
            return None
        row = dict(zip(COLUMN_NAMES, hit, strict=True))
        for name in JSON_COLUMNS:
            if row[name] is not None:
                row[name] = json.loads(row[name])
        return row

    def finished_ids(self, suite: str | None = None) -> set[str]:
        """The ids of all stored cells, optionally of one suite only."""
        sql, params = self._select("cell_id", suite)
        with closing(self._connect()) as conn:
            return {r[0] for r in conn.execute(sql, params)}

    def frame(self, suite: str | None = None) -> pd.DataFrame:
        """All rows (or one suite's) in schema column order, sorted by cell id.

        JSON columns stay strings; ``json.loads`` them where needed.
        """
        sql, params = self._select(_NAMES_SQL, suite)
        with closing(self._connect()) as conn:
            df = pd.read_sql_query(sql + " ORDER BY cell_id", conn, params=params)
        return df.reindex(columns=list(COLUMN_NAMES))

    def delete(self, cell_id: str) -> bool:
        """Remove a cell's row so the next suite run redoes it; True if a row was removed."""
        with closing(self._connect()) as conn, conn:
            cur = conn.execute(f"DELETE FROM {TABLE} WHERE cell_id = ?", (cell_id,))
        return cur.rowcount > 0

    def __len__(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])

    @staticmethod
    def _select(what: str, suite: str | None) -> tuple[str, tuple[str, ...]]:
        if suite is None:
            return f"SELECT {what} FROM {TABLE}", ()
        return f"SELECT {what} FROM {TABLE} WHERE suite = ?", (suite,)
