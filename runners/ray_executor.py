"""Run a suite on a Ray cluster: ``detprune run SUITE --executor ray [--address ADDR]``.

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
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from detectors.checkpoints import ChecksumError, read_verified, verify, write_verified

from . import faults
from .cells import Runner, tally
from .locks import remove_stale
from .recompute import Recompute
from .suite import Cell, SuiteError, load_suite

INSTALL = "pip install 'detprune[ray]'"
_RUNNERS: dict[str, tuple[Runner, dict[str, Cell]]] = {}  # per worker process: score caches persist


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SuiteError(f"--executor ray needs Ray, an optional extra: {INSTALL}") from None
    return ray


def _runner(spec: str) -> tuple[Runner, dict[str, Cell]]:
    """The driver's Runner rebuilt in this worker from ``spec`` (JSON: the suite's text, not its
    path, which another node may not have), once per worker process."""
    if spec not in _RUNNERS:
        s = json.loads(spec)
        if Path(s["cwd"]).is_dir():  # paths in the rows read as on the driver, where they can
            os.chdir(s["cwd"])
        os.environ.update(s["env"])  # the variables the suite's data roots name, as on the driver
        path = Path(tempfile.mkdtemp(prefix="detprune-suite-")) / s["suite_file"]
        path.write_text(s["suite_text"])
        torch.set_num_threads(s["threads"])
        suite = load_suite(path, s["overrides"])
        recompute = Recompute(*s["recompute"])
        runner = Runner(suite, Path(s["results"]), Path(s["work"]), s["device"], False, recompute=recompute)
        runner.jobs = s["jobs"]
        _RUNNERS[spec] = runner, {c.cell_id: c for c in runner.suite.cells()}
    return _RUNNERS[spec]


def _outcome(result: dict[str, Any] | faults.Failure | None) -> dict[str, Any]:
    node = _ray().util.get_node_ip_address()
    if isinstance(result, faults.Failure):
        return {"status": "failed", "failure": result.__dict__, "node": node}
    return {"status": "ran" if result is not None else "baseline", "row": result, "node": node}


def _baseline_path(runner: Runner, cell: Cell) -> Path:
    return runner.work_dir / "baselines" / f"{cell.baseline_key}.pt"


def base_task(spec: str, cell_id: str, with_row: bool) -> tuple[dict[str, Any], bytes | None]:
    """Train (or find) a baseline; with ``with_row``, also measure its base row. Returns the
    outcome and the baseline checkpoint's bytes (None when it could not be trained)."""
    runner, cells = _runner(spec)
    cell = cells[cell_id]
    if with_row:
        result: dict[str, Any] | faults.Failure | None = runner.compute(cell)
    else:
        try:
            runner.baseline(cell)
            result = None
        except faults.INPUT_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded on each cell that needs the baseline
            result = faults.Failure.of(exc, "baseline-training")
    path = _baseline_path(runner, cell)
    try:
        checkpoint = read_verified(path) if path.is_file() else None
    except ChecksumError:
        checkpoint = None
    return _outcome(result), checkpoint


def cell_task(spec: str, cell_id: str, base: dict[str, Any], checkpoint: bytes | None) -> dict[str, Any]:
    """One pruned cell, given its baseline task's outcome and checkpoint (Ray passes them once
    that task is done: the dependency that orders the grid)."""
    runner, cells = _runner(spec)
    cell = cells[cell_id]
    if checkpoint is None:
        error = base.get("failure", {}).get("error", "no checkpoint came back")
        return _outcome(faults.Failure("baseline-training", f"its baseline failed: {error}", ""))
    path = _baseline_path(runner, cell)
    try:
        verify(path, required=True)
    except ChecksumError:  # not on this node yet (or not whole): write the one that came back
        write_verified(path, checkpoint)
    return _outcome(runner.compute(cell))


def run_on_ray(
    runner: Runner,
    address: str | None = None,
    cpus_per_cell: float = 1.0,
    gpus_per_cell: float = 0.0,
    max_retries: int = 2,
) -> dict[str, int]:
    """Run ``runner``'s suite as Ray tasks; the counts are those of ``Runner.run``. Joins the
    cluster at ``address`` ("auto": the one started on this machine with ``ray start``), or uses
    the Ray instance this process already has, or starts a local one."""
    ray = _ray()
    runner.check_inputs()
    for folder in (runner.work_dir, runner.out_dir):
        remove_stale(folder)
    cells = runner.suite.cells()
    todo, left = runner.pending(cells)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        runner.jobs = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_cell))
        status = _drive(ray, runner, todo, cells, cpus_per_cell, gpus_per_cell, max_retries)
    finally:
        if started:
            ray.shutdown()
    return tally(cells, todo, left, status)


def _spec(runner: Runner, cpus_per_cell: float, gpus_per_cell: float) -> str:
    suite = runner.suite
    text = Path(suite.path).read_text()
    device = "cuda" if gpus_per_cell > 0 else str(runner.device)
    return json.dumps(
        {
            "suite_text": text,
            "env": {v: os.environ[v] for v in re.findall(r"\$\{?(\w+)", text) if v in os.environ},
            "suite_file": Path(suite.path).name,
            "overrides": suite.overrides,
            "results": str(runner.out_dir.parent.resolve()),
            "work": str(runner.work_dir.resolve()),
            "cwd": os.getcwd(),
            "device": device,
            "threads": max(1, int(cpus_per_cell)),
            "jobs": runner.jobs,
            "recompute": [runner.recompute.mode, runner.recompute.started_at],
        },
        sort_keys=True,
    )


def _drive(ray: Any, runner: Runner, todo: list[Cell], cells: list[Cell], cpus: float, gpus: float,
           retries: int) -> dict[str, str]:  # fmt: skip
    """Submit the tasks, then store each outcome as it arrives."""
    spec = _spec(runner, cpus, gpus)
    options = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": retries}
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
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"suite {runner.suite.name} (ray)",
               disable=not runner.progress, dynamic_ncols=True)  # fmt: skip
    nodes: Counter[str] = Counter()
    status: dict[str, str] = {}
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            outcome = _result(ray, ref, retries)
            nodes[outcome.get("node", "?")] += 1
            status[cell.cell_id] = _store(runner, cell, outcome)
            bar.update()
            where = ", ".join(f"{n}: {k}" for n, k in sorted(nodes.items()))
            bar.set_postfix_str(f"{len(pending)} queued or running; done per node: {where}")
    finally:
        for ref in pending:  # a driver that stops (an input error, ^C) takes its tasks with it
            ray.cancel(ref, force=True)
        bar.close()
    if not runner.progress:
        print(f"detprune: cells done per node: {dict(nodes)}", file=sys.stderr)
    return status


def _result(ray: Any, ref: Any, retries: int) -> dict[str, Any]:
    """A task's outcome; a task that raised or was lost becomes a failure, an input error stops."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, faults.INPUT_ERRORS):
            raise cause from None
        return {"status": "failed", "failure": faults.Failure.of(cause, "ray").__dict__}
    except ray.exceptions.RayError as exc:  # its worker or node died, and so did its retries
        error = f"{type(exc).__name__}: lost with its worker or node, after {retries} retries"
        return {"status": "failed", "failure": faults.Failure("ray", error, str(exc)[-4000:]).__dict__}


def _store(runner: Runner, cell: Cell, outcome: dict[str, Any]) -> str:
    if outcome["status"] == "failed":
        runner.record(cell, faults.Failure(**outcome["failure"]))
        return "failed"
    return runner.store_row(outcome["row"])
