"""Results: the SQLite store of finished cells and the table/plot reporters (no torch here)."""

from results.compare import compare, reference_store
from results.provenance import code_line, machine_line
from results.report import render_failures, render_table, write_reports
from results.store import COLUMNS, DuplicateCellError, ResultStore, StoreError

__all__ = [
    "COLUMNS",
    "DuplicateCellError",
    "ResultStore",
    "StoreError",
    "code_line",
    "compare",
    "machine_line",
    "reference_store",
    "render_failures",
    "render_table",
    "write_reports",
]
