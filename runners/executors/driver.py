"""The driver: one run of a suite from start to end, whichever executor runs its cells.

Nothing is lost to a crash: a cell's row is written in one transaction only once the cell has
finished, so a killed suite resumes at the first unfinished cell. Two runs of one suite share the
work: a lock per cell (``locks.py``), taken by ``run_cell``; where a cell is computed elsewhere
(Ray), the driver alone stores its outcome. A cell that fails is recorded with its stage and
reason (``faults.py``) and the suite goes on; a rerun retries it.

The driver owns the life cycle (inputs checked, stale files removed, pending cells found,
outcomes stored, the tally); an ``Executor``, defined here as what the driver asks of one and
registered by name (``registry.py``), only decides where each cell runs.
"""

from __future__ import annotations

import argparse
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from results import DuplicateCellError, ResultStore

from .. import faults, provenance
from ..cells import CellRunner
from ..inputs import check_experiments, default_work_dir
from ..locks import held, lock_path, remove_stale
from ..recompute import Recompute
from ..suite import Cell, Suite, load_suite


class Executor(ABC):
    """Where cells run. ``jobs``: how many cells run side by side (recorded with every row)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for ``detprune run --help``
    remote: ClassVar[bool] = False  # cells run on other machines: ``--device`` is theirs, unchecked here

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = jobs

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this executor's own ``detprune run`` options (none by default)."""
        return None

    @classmethod
    def from_args(cls, args: argparse.Namespace, jobs: int) -> Executor:
        """Built from ``detprune run``'s options; a bad one raises ``SuiteError`` (one line, exit 2)."""
        return cls(jobs)

    @abstractmethod
    def execute(self, driver: Driver, cells: list[Cell]) -> Iterator[tuple[Cell, str]]:
        """Run ``cells`` (base cells first: a pruned cell needs its baseline); yield each with its
        status as it finishes: what ``driver.run_cell`` returns (``"ran"``, ``"done"``, ``"held"``,
        ``"failed"``), or ``driver.store_outcome(cell, outcome)`` where the cell was computed elsewhere.
        The driver waits for the ``"held"`` ones (another run had them) once this returns."""


class Driver:
    """Runs a suite's cells through an executor, skipping those the store already holds."""

    def __init__(
        self,
        suite: Suite,
        results_dir: Path = Path("results"),
        work_dir: Path | None = None,
        device: str = "cpu",
        progress: bool = True,
        retry_failed: bool = True,
        recompute: Recompute | None = None,
    ) -> None:
        self.suite = suite
        self.out_dir = Path(results_dir) / suite.name
        self.work_dir = Path(work_dir) if work_dir else default_work_dir()
        self.device = torch.device(device)
        self.progress = progress
        self.retry_failed = retry_failed  # False: leave the cells that failed before (--skip-failed)
        self.recompute = recompute or Recompute()  # which finished rows and baselines count as done
        self.cells = CellRunner(self.work_dir, self.device, progress, self.recompute)
        self._store: ResultStore | None = None
        self._bar: tqdm | None = None

    @property
    def jobs(self) -> int:
        """How many cells run side by side: recorded with every row's timings."""
        return self.cells.jobs

    @jobs.setter
    def jobs(self, jobs: int) -> None:
        self.cells.jobs = jobs

    @property
    def store(self) -> ResultStore:
        """Opened on first use, after the inputs are checked: bad input never creates a store."""
        if self._store is None:
            self._store = ResultStore(self.out_dir / "results.sqlite")
        return self._store

    def check_inputs(self) -> None:
        """Every dataset and detector checked before any training, and before the store exists."""
        check_experiments(self.suite, self.cells.datasets)

    # -- the run ---------------------------------------------------------------------------------
    def run(self, executor: Executor) -> dict[str, int]:
        """Run the suite's pending cells on ``executor``; base cells come first (every baseline
        trained once). Cells another run holds are skipped, then waited for at the end."""
        self.check_inputs()
        for folder in (self.work_dir, self.out_dir):  # a killed run's half-written files
            remove_stale(folder)
        self.jobs = executor.jobs
        cells = self.suite.cells()
        todo, left = self.pending(cells)
        where = "" if executor.name == "local" else f" ({executor.name})"
        self._bar = bar = tqdm(
            total=len(cells),
            initial=len(cells) - len(todo) - len(left),
            desc=f"suite {self.suite.name}{where}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        status: dict[str, str] = {}
        try:
            with closing(executor.execute(self, todo)) as finished:  # closed: a stopped run stops its cells
                for cell, state in finished:
                    status[cell.cell_id] = state
                    bar.update(state != "held")
            by_id = {c.cell_id: c for c in todo}
            for cell_id in [i for i, s in status.items() if s == "held"]:  # another run had them
                self.note(f"waiting for {by_id[cell_id].label}")
                status[cell_id] = self.run_cell(by_id[cell_id], wait=True)
                bar.update()
        finally:
            bar.close()
            self._bar = None
        return tally(cells, todo, left, status)

    def note(self, text: str) -> None:
        """Show ``text`` beside the run's progress bar (the cell running, the cells per node)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def pending(self, cells: list[Cell]) -> tuple[list[Cell], list[Cell]]:
        """The cells to run (no row this run keeps), and those left as they are: without
        ``retry_failed``, the cells whose failure is recorded. Says how many finished rows were
        computed by other code (stale), and how many rows the previous id scheme's ids moved."""
        moved = self.migrate(cells)
        if moved:
            print(f"detprune: {moved} rows stored under the previous cell ids took today's ids "
                  "(their code is unknown: they count as stale)", file=sys.stderr)  # fmt: skip
        made = self.store.made()
        ids = {c.cell_id for c in cells}
        for line in provenance.describe_stale([m for i, m in made.items() if i in ids]):
            print(f"detprune: {line}", file=sys.stderr)
        done = {i for i, m in made.items() if self.recompute.keeps(m)}
        failed = set(self.store.failures()["cell_id"]) - done if not self.retry_failed else set()
        todo = [c for c in cells if c.cell_id not in done | failed]
        return todo, [c for c in cells if c.cell_id in failed]

    def migrate(self, cells: list[Cell]) -> int:
        """Rows stored under the previous id scheme take their cells' current ids (once)."""
        return self.store.rekey({c.legacy_cell_id: c.cell_id for c in cells})

    # -- one cell: locked, computed here, stored ------------------------------------------------
    def run_cell(self, cell: Cell, wait: bool = False) -> str:
        """Run one cell in this process and store its row. Returns ``"ran"``; ``"done"`` when the
        store already holds it (another run finished it first); ``"held"`` when another run is on
        it and ``wait`` is false; ``"failed"`` when it failed, recorded with its stage and reason."""
        if self.finished(cell.cell_id):
            return "done"
        with held(lock_path(self.work_dir, "cell", cell.cell_id), wait=wait) as mine:
            if not mine:
                return "held"
            if self.finished(cell.cell_id):
                return "done"
            outcome = self.cells.compute(cell)
            if not isinstance(outcome, faults.Failure):
                faults.reached("store")
            return self.store_outcome(cell, outcome)

    def finished(self, cell_id: str) -> bool:
        """Whether the store holds the cell's row and this run keeps it (``--recompute``)."""
        return self.recompute.keeps(self.store.made().get(cell_id))

    def store_outcome(self, cell: Cell, outcome: dict[str, Any] | faults.Failure) -> str:
        """Store a cell's outcome, computed here or elsewhere: its row, or its failure."""
        if isinstance(outcome, faults.Failure):
            self.record(cell, outcome)
            return "failed"
        return self.store_row(outcome)

    def store_row(self, row: dict[str, Any]) -> str:
        """Store a computed row: ``"ran"``; ``"done"`` when a concurrent run stored it meanwhile.
        A row this run recomputes replaces the old one (in one transaction)."""
        old = self.store.made().get(row["cell_id"])
        if old is not None and self.recompute.keeps(old):
            return "done"  # a concurrent run (e.g. a killed run's worker) stored it meanwhile
        try:
            self.store.put(row, replace=old is not None)
        except DuplicateCellError:
            return "done"
        return "ran"

    def record(self, cell: Cell, failure: faults.Failure) -> None:
        """Store a cell's failure and say so on one line; the suite goes on."""
        attempts = self.store.fail(
            cell.cell_id, cell.suite, cell.label, failure.stage, failure.error, failure.detail
        )
        print(
            f"detprune: cell {cell.label} failed at {failure.stage} ({failure.error}); "
            f"recorded (attempt {attempts}), the suite goes on",
            file=sys.stderr,
        )

    # -- the driver again, in a worker ----------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """What a worker needs to build this driver again (``from_spec``): plain JSON, so it
        travels to another process or node. An executor may change an entry for its workers."""
        return {
            "suite": str(self.suite.path),
            "overrides": self.suite.overrides,
            "results": str(self.out_dir.parent),
            "work": str(self.work_dir),
            "device": str(self.device),
            "jobs": self.jobs,
            "recompute": [self.recompute.mode, self.recompute.started_at],
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Driver:
        """The driver of ``spec`` in a worker: no progress bars, the driver's ``--recompute``."""
        suite = load_suite(spec["suite"], spec["overrides"])
        results, work, recompute = Path(spec["results"]), Path(spec["work"]), Recompute(*spec["recompute"])
        driver = cls(suite, results, work, spec["device"], progress=False, recompute=recompute)
        driver.jobs = spec["jobs"]
        return driver


def tally(cells: list[Cell], todo: list[Cell], left: list[Cell], status: dict[str, str]) -> dict[str, int]:
    """What a run did: its cells, how many ran, failed, were already done (or done by another
    run meanwhile), and how many failed cells it left (``--skip-failed``)."""
    counts = {k: sum(s == k for s in status.values()) for k in ("ran", "failed", "done")}
    return {
        "cells": len(cells),
        "ran": counts["ran"],
        "failed": counts["failed"],
        "skipped": len(cells) - len(todo) - len(left) + counts["done"],
        "left_failed": len(left),
    }
