"""Results: the SQLite store of finished cells and the table/plot reporters (no torch here)."""

from results.report import render_table, write_reports
from results.store import COLUMNS, DuplicateCellError, ResultStore

__all__ = ["COLUMNS", "DuplicateCellError", "ResultStore", "render_table", "write_reports"]
