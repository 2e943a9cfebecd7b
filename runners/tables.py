"""``detprune report`` (and the end of ``detprune run``): a suite's tables from its store.

Only the suite's current cells are reported, and the reader is told which code and machines made
the rows, how many are stale, and how many rows of the store belong to no cell of the suite as
configured now (an edited suite's old cells, or a run with other ``--set`` overrides).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from results import ResultStore, code_line, machine_line, render_failures, render_table, write_reports

from . import provenance
from .suite import SuiteError, load_suite


def report_suite(suite_arg: str, results_dir: Path, overrides: dict) -> list[Path]:
    """Tables for the suite's current cells only: rows of an edited suite's old cells stay out."""
    suite = load_suite(suite_arg, overrides)
    out_dir = results_dir / suite.name
    store_path = out_dir / "results.sqlite"
    if not store_path.is_file():
        raise SuiteError(f"no results for suite '{suite.name}' at {store_path}; run it first")
    # a cell is its id (what determines it), whichever suite ran it: smoke-seeds reuses smoke's seed 0
    store = ResultStore(store_path)
    cells = suite.cells()
    store.rekey({c.legacy_cell_id: c.cell_id for c in cells})  # a store of the previous id scheme
    ids = {c.cell_id for c in cells}
    frame = store.frame()
    matched = frame[frame["cell_id"].isin(ids)]
    failures = store.failures()
    failures = failures[failures["cell_id"].isin(ids)]
    if matched.empty and failures.empty and not frame.empty:
        # an override changes every cell's id: a report without the run's --set finds none of them
        raise SuiteError(
            f"{store_path} holds {len(frame)} rows, none of them a cell of suite '{suite.name}' as "
            "configured now; pass the --set overrides the run was given"
        )
    _say_provenance(suite.name, store_path, matched, len(frame) - len(matched))
    frame = matched
    paths = write_reports(frame, out_dir, suite.name, failures)
    for dataset in sorted(frame["dataset"].unique()):
        print(f"\n## {suite.name} / {dataset}\n")
        print(render_table(frame[frame["dataset"] == dataset]))
    if not failures.empty:
        print(f"\n## {suite.name}: {len(failures)} failed cells (no row; a rerun retries them)\n")
        print(render_failures(failures))
    return paths


def _say_provenance(suite: str, store_path: Path, rows: pd.DataFrame, unmatched: int) -> None:
    """Which code, libraries and machines the reported rows came from; how many are stale; how
    many rows of the store are no cell of the suite as configured now (never reused)."""
    print(f"## {suite}: {len(rows)} rows from\n\n{code_line(rows)}\n{machine_line(rows)}", file=sys.stderr)
    made = rows.reindex(columns=["code_digest", "harness_commit", "harness_dirty"]).to_dict("records")
    for line in provenance.describe_stale([{k: _value(v) for k, v in m.items()} for m in made]):
        print(f"detprune: {line}", file=sys.stderr)
    if unmatched:
        print(
            f"detprune: {unmatched} rows of {store_path} are no cell of suite '{suite}' as configured "
            "now (another configuration, or an id no scheme here reconstructs): left out of the tables",
            file=sys.stderr,
        )


def _value(value: object) -> object:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
