"""``--executor ray [--address ADDR]``: the cells as tasks on a Ray cluster.

Ray schedules; this module only says what depends on what. Each baseline is one task, and each
pruned cell a task that takes its baseline's task's results as arguments, so Ray trains the
baselines in parallel and starts a baseline's cells as soon as it is done. Every task asks for
``--cpus-per-cell`` CPUs and ``--gpus-per-cell`` GPUs; a task lost with its worker or node is
retried (``--max-retries``), then recorded as a failed cell with the reason.

A task returns its row (or its failure) to the driver, which alone writes the SQLite store, so
resume, duplicate refusal and failed-cell recording are those of a local run. The trained
baseline travels back with its task's result through Ray's object store and is written, checked
against its checksum, into the work directory of whichever node runs its cells, so the nodes need
not share a file system; where they do (the same ``--work-dir`` on every node), a baseline is
found there and not written twice. Real datasets must be at the same path on every node; the
synthetic sets are generated on each node from their seed (the same bytes everywhere).

Ray is an optional extra: it is imported when this executor is built, not when it is registered.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from detectors.checkpoints import ChecksumError, read_verified, verify, write_verified

from .. import faults
from ..suite import Cell, SuiteError
from .driver import Driver, Executor
from .registry import register_executor

INSTALL = "pip install 'detprune[ray]'"
_DRIVERS: dict[str, tuple[Driver, dict[str, Cell]]] = {}  # per worker process: score caches persist


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SuiteError(f"--executor ray needs Ray, an optional extra: {INSTALL}") from None
    return ray


@register_executor("ray")
class RayExecutor(Executor):
    """Joins the cluster at ``address`` ("auto": the one started on this machine with ``ray
    start``), or uses the Ray instance this process already has, or starts a local one."""

    summary = "Ray tasks on a cluster (the [ray] extra)"
    remote = True

    def __init__(
        self,
        jobs: int = 1,
        address: str | None = None,
        cpus_per_cell: float = 1.0,
        gpus_per_cell: float = 0.0,
        max_retries: int = 2,
    ) -> None:
        super().__init__(jobs)  # replaced by what the cluster runs at once, once joined
        if not (cpus_per_cell > 0 and gpus_per_cell >= 0 and max_retries >= 0):
            raise SuiteError("--cpus-per-cell must be > 0, --gpus-per-cell and --max-retries >= 0")
        _ray()  # installed, or one line saying how
        self.address = address
        self.cpus, self.gpus, self.retries = cpus_per_cell, gpus_per_cell, max_retries

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--address", default=None, help="Ray: the cluster to join ('auto': started here with `ray start`)"
        )
        parser.add_argument("--cpus-per-cell", type=float, default=1.0, help="Ray: CPUs each task asks for")
        parser.add_argument("--gpus-per-cell", type=float, default=0.0, help="Ray: GPUs each task asks for")
        parser.add_argument(
            "--max-retries", type=int, default=2, help="Ray: retries of a task lost with its node"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, jobs: int) -> RayExecutor:
        return cls(jobs, args.address, args.cpus_per_cell, args.gpus_per_cell, args.max_retries)

    def execute(self, driver: Driver, cells: list[Cell]) -> Iterator[tuple[Cell, str]]:
        ray = _ray()
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")  # fmt: skip
        try:
            driver.jobs = max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus))
            yield from self._drive(ray, driver, cells)
        finally:
            if started:
                ray.shutdown()

    def _drive(self, ray: Any, driver: Driver, todo: list[Cell]) -> Iterator[tuple[Cell, str]]:
        """Submit the tasks, then store each outcome as it arrives."""
        spec = self._spec(driver)
        options = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": self.retries}
        submit_base = ray.remote(base_task).options(num_returns=2, **options)
        submit_cell = ray.remote(cell_task).options(**options)
        baselines: dict[str, tuple[Any, Any]] = {}
        pending: dict[Any, Cell] = {}
        for cell in [c for c in todo if c.method == "base"]:
            baselines[cell.baseline_key] = submit_base.remote(spec, cell.cell_id, True)
            pending[baselines[cell.baseline_key][0]] = cell
        for cell in [c for c in todo if c.method != "base"]:
            if cell.baseline_key not in baselines:  # its base row is stored, its baseline is needed
                baselines[cell.baseline_key] = submit_base.remote(spec, cell.cell_id, False)
            pending[submit_cell.remote(spec, cell.cell_id, *baselines[cell.baseline_key])] = cell
        nodes: Counter[str] = Counter()
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(ref)
                outcome = self._result(ray, ref)
                nodes[outcome.get("node", "?")] += 1
                failed = outcome["status"] == "failed"
                result = faults.Failure(**outcome["failure"]) if failed else outcome["row"]
                yield cell, driver.store_outcome(cell, result)
                where = ", ".join(f"{n}: {k}" for n, k in sorted(nodes.items()))
                driver.note(f"{len(pending)} queued or running; done per node: {where}")
        finally:
            for ref in pending:  # a driver that stops (an input error, ^C) takes its tasks with it
                ray.cancel(ref, force=True)
        if not driver.progress:
            print(f"detprune: cells done per node: {dict(nodes)}", file=sys.stderr)

    def _spec(self, driver: Driver) -> str:
        """The driver's spec for a worker on any node: the suite's text, not its path (which
        another node may not have), the environment variables it names, absolute paths."""
        text = Path(driver.suite.path).read_text()
        spec = driver.spec() | {
            "suite_text": text,
            "env": {v: os.environ[v] for v in re.findall(r"\$\{?(\w+)", text) if v in os.environ},
            "results": str(driver.out_dir.parent.resolve()),
            "work": str(driver.work_dir.resolve()),
            "cwd": os.getcwd(),
            "device": "cuda" if self.gpus > 0 else str(driver.device),
            "threads": max(1, int(self.cpus)),
        }
        return json.dumps(spec, sort_keys=True)

    def _result(self, ray: Any, ref: Any) -> dict[str, Any]:
        """A task's outcome; a task that raised or was lost becomes a failure, an input error stops."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, faults.INPUT_ERRORS):
                raise cause from None
            return {"status": "failed", "failure": faults.Failure.of(cause, "ray").__dict__}
        except ray.exceptions.RayError as exc:  # its worker or node died, and so did its retries
            error = f"{type(exc).__name__}: lost with its worker or node, after {self.retries} retries"
            return {"status": "failed", "failure": faults.Failure("ray", error, str(exc)[-4000:]).__dict__}


# -- on the workers ----------------------------------------------------------------------------------
def _driver(spec: str) -> tuple[Driver, dict[str, Cell]]:
    """The driver rebuilt in this worker from ``spec``, once per worker process."""
    if spec not in _DRIVERS:
        s = json.loads(spec)
        if Path(s["cwd"]).is_dir():  # paths in the rows read as on the driver, where they can
            os.chdir(s["cwd"])
        os.environ.update(s["env"])  # the variables the suite's data roots name, as on the driver
        path = Path(tempfile.mkdtemp(prefix="detprune-suite-")) / Path(s["suite"]).name
        path.write_text(s["suite_text"])
        torch.set_num_threads(s["threads"])
        driver = Driver.from_spec(s | {"suite": str(path)})
        _DRIVERS[spec] = driver, {c.cell_id: c for c in driver.suite.cells()}
    return _DRIVERS[spec]


def _outcome(result: dict[str, Any] | faults.Failure | None) -> dict[str, Any]:
    node = _ray().util.get_node_ip_address()
    if isinstance(result, faults.Failure):
        return {"status": "failed", "failure": result.__dict__, "node": node}
    return {"status": "ran" if result is not None else "baseline", "row": result, "node": node}


def base_task(spec: str, cell_id: str, with_row: bool) -> tuple[dict[str, Any], bytes | None]:
    """Train (or find) a baseline; with ``with_row``, also measure its base row. Returns the
    outcome and the baseline checkpoint's bytes (None when it could not be trained)."""
    driver, cells = _driver(spec)
    cell = cells[cell_id]
    if with_row:
        result: dict[str, Any] | faults.Failure | None = driver.cells.compute(cell)
    else:
        try:
            driver.cells.baseline(cell)
            result = None
        except faults.INPUT_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded on each cell that needs the baseline
            result = faults.Failure.of(exc, "baseline-training")
    path = driver.cells.baselines.path(cell)
    try:
        checkpoint = read_verified(path) if path.is_file() else None
    except ChecksumError:
        checkpoint = None
    return _outcome(result), checkpoint


def cell_task(spec: str, cell_id: str, base: dict[str, Any], checkpoint: bytes | None) -> dict[str, Any]:
    """One pruned cell, given its baseline task's outcome and checkpoint (Ray passes them once
    that task is done: the dependency that orders the grid)."""
    driver, cells = _driver(spec)
    cell = cells[cell_id]
    if checkpoint is None:
        error = base.get("failure", {}).get("error", "no checkpoint came back")
        return _outcome(faults.Failure("baseline-training", f"its baseline failed: {error}", ""))
    path = driver.cells.baselines.path(cell)
    try:
        verify(path, required=True)
    except ChecksumError:  # not on this node yet (or not whole): write the one that came back
        write_verified(path, checkpoint)
    return _outcome(driver.cells.compute(cell))
