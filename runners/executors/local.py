"""``--executor local``: the cells in this process, one after another, or in ``--jobs`` worker
processes on this machine.

With ``jobs > 1`` each worker builds the driver again from its spec and runs its cells with
``run_cell`` (lock, compute, store), so a worker writes each row itself as its cell finishes and a
killed run loses only the cells in flight. Each worker gets its share of the CPU threads. Pruned
cells go to workers in chunks of one (baseline, method), so each method scores a baseline once.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

from ..suite import Cell
from .driver import Driver, Executor
from .registry import register_executor


@register_executor("local")
class LocalExecutor(Executor):
    summary = "this process (or --jobs workers)"

    def execute(self, driver: Driver, cells: list[Cell]) -> Iterator[tuple[Cell, str]]:
        if self.jobs <= 1:
            for cell in cells:
                driver.note(cell.label)
                yield cell, driver.run_cell(cell)
            return
        threads = max(1, torch.get_num_threads() // self.jobs)
        by_id = {c.cell_id: c for c in cells}
        phases = [[c for c in cells if c.method == "base"], [c for c in cells if c.method != "base"]]
        spawn, spec = mp.get_context("spawn"), driver.spec()
        with ProcessPoolExecutor(self.jobs, spawn, _init_worker, (spec, threads)) as pool:
            for phase in phases:  # every baseline trained (by its base cell) before any pruning
                chunks: dict[tuple[str, str], list[str]] = {}
                for cell in phase:
                    chunks.setdefault((cell.baseline_key, cell.method), []).append(cell.cell_id)
                futures = [pool.submit(_run_chunk, ids) for ids in chunks.values()]
                for future in as_completed(futures):
                    for cell_id, state in future.result().items():
                        yield by_id[cell_id], state


_WORKER: Driver | None = None  # per worker process: its datasets and score caches persist


def _init_worker(spec: dict[str, Any], threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = Driver.from_spec(spec)


def _run_chunk(cell_ids: list[str]) -> dict[str, str]:
    cells = {c.cell_id: c for c in _WORKER.suite.cells()}
    return {cell_id: _WORKER.run_cell(cells[cell_id]) for cell_id in cell_ids}
