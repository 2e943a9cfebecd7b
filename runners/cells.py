"""The cell pipeline (DESIGN.md §3): baseline -> prune a copy -> fine-tune -> measure -> one row.

Nothing is lost to a crash: baselines and pruned models are written atomically with their
checksums, and a cell's row is written in one transaction only once the cell has finished, so a
killed suite resumes at the first unfinished cell. Two runs of one suite share the work: a lock per
cell and per baseline (``locks.py``). A cell that fails is recorded with its stage and reason
(``faults.py``) and the suite goes on; a rerun retries it.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datasets.base import DetectionDataset
from detectors import (
    Detector,
    DetectorError,
    build_detector,
    load_checkpoint,
    load_weights_file,
    save_checkpoint,
)
from methods import PruneContext, Target, build_method
from methods.training import train
from results import DuplicateCellError, ResultStore

from . import faults, measure, provenance
from .evaluate import evaluate
from .inputs import check_experiments, default_work_dir, experiment_data_path, open_datasets
from .locks import held, lock_path, remove_stale
from .prune import prune_and_finetune
from .recompute import Recompute, now
from .suite import Cell, Experiment, Suite, load_suite, weights_path

# a failure here leaves no baseline (once saved, it is there: a later failure is the cell's own)
BASELINE_STAGES = ("baseline-training", "baseline-step")


class BaselineFailed(RuntimeError):
    """A cell's baseline failed earlier in this run: the cell is recorded failed without retraining."""


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class Runner:
    """Runs a suite's cells in order, skipping those the store already holds."""

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
        self._store: ResultStore | None = None
        self._datasets: dict[str, tuple[DetectionDataset, DetectionDataset]] = {}
        self._score_caches: dict[str, dict] = {}  # per baseline: each method scores it once
        self._failed_baselines: dict[str, faults.Failure] = {}
        self.jobs = 1  # how many cells run side by side: recorded with every row's timings

    @property
    def store(self) -> ResultStore:
        """Opened on first use, after the inputs are checked: bad input never creates a store."""
        if self._store is None:
            self._store = ResultStore(self.out_dir / "results.sqlite")
        return self._store

    # -- inputs ---------------------------------------------------------------------------------
    def datasets(self, experiment: Experiment) -> tuple[DetectionDataset, DetectionDataset]:
        key = json.dumps([experiment.dataset, experiment.data], sort_keys=True)
        if key not in self._datasets:
            self._datasets[key] = open_datasets(experiment, self.work_dir)
        return self._datasets[key]

    def check_inputs(self) -> None:
        """Every dataset and detector checked before any training, and before the store exists."""
        check_experiments(self.suite, self.datasets)

    def _build(self, cell: Cell, num_classes: int) -> Detector:
        """The baseline before training: seeded, or the experiment's weights file."""
        torch.manual_seed(cell.seed)
        exp = cell.experiment
        model = build_detector(
            exp.detector, num_classes, size=exp.size, input_size=cell.input_size, **exp.detector_options
        )
        if exp.weights:  # trained from there only if train.epochs > 0
            load_weights_file(model, weights_path(exp.weights))
        return model

    def baseline(self, cell: Cell) -> tuple[Detector, Path, dict[str, Any]]:
        """The trained baseline of ``cell`` and its meta: from the cache, or trained once and cached."""
        if cell.baseline_key in self._failed_baselines:
            raise BaselineFailed(f"its baseline failed: {self._failed_baselines[cell.baseline_key].error}")
        path = self.work_dir / "baselines" / f"{cell.baseline_key}.pt"
        lock = lock_path(self.work_dir, "baseline", cell.baseline_key)
        with held(lock, wait=False) as free:
            if free:
                return self._cached_or_trained(cell, path)
        print(f"detprune: waiting for another run to train the baseline of {cell.label}", file=sys.stderr)
        with held(lock):  # trained once, however many runs need it
            return self._cached_or_trained(cell, path)

    def _cached_or_trained(self, cell: Cell, path: Path) -> tuple[Detector, Path, dict[str, Any]]:
        if path.is_file():
            try:  # the cache is ours: a file without its checksum, or one that fails it, is retrained
                model, meta = load_checkpoint(path, require_checksum=True)
                if self.recompute.keeps(meta.get("provenance")):
                    return model.to(self.device), path, meta
                print(f"detprune: retraining the baseline of {cell.label} (--recompute)", file=sys.stderr)
            except DetectorError as exc:
                print(f"detprune: cached baseline unusable, training it again: {exc}", file=sys.stderr)
        faults.reached("baseline-training")
        if not self.progress:  # a log line where no bar shows it (the test of two runs counts them)
            what = "training" if cell.train.epochs else "loading"
            print(f"detprune: {what} the baseline of {cell.label} ({cell.regime})", file=sys.stderr)
        train_set, _ = self.datasets(cell.experiment)
        model = self._build(cell, len(train_set.classes)).to(self.device)
        extra, method = None, None
        if cell.regime != "plain":
            method = build_method(cell.regime, **cell.regime_options)  # the method that owns the regime
            extra = method.loss_hook(PruneContext(seed=cell.seed, progress=self.progress))
        stats = train(
            model,
            train_set,
            cell.train,
            seed=cell.seed,
            extra_loss=extra,
            hooks=(*(method.regime_hooks() if method is not None else ()), faults.StageHook("baseline-step")),
            desc=f"baseline {cell.experiment.detector}/{cell.experiment.dataset}",
            progress=self.progress,
        )
        meta = {
            "train_seconds": stats["seconds"],
            "baseline_key": cell.baseline_key,
            "regime_stats": method.stats() if method is not None else {},
            "health": stats["health"],
            "provenance": {**provenance.harness(), "created_at": now()},
        }
        save_checkpoint(model, path, meta)
        faults.reached("baseline-saved")
        return model, path, meta

    # -- one cell -------------------------------------------------------------------------------
    def _measure(
        self, model: Detector, cell: Cell, val_set: DetectionDataset, base: Detector | None = None
    ) -> dict[str, Any]:
        """mAP, size, and latency: alone for a base row, paired against ``base`` for a pruned one."""
        faults.reached("evaluation")
        start = time.perf_counter()
        metrics = evaluate(model, val_set, cell.evaluate["batch_size"], self.progress)
        eval_seconds = time.perf_counter() - start
        faults.reached("timing")
        image, rounds = val_set[0][0], (cell.measure["warmup"], cell.measure["rounds"])
        size = measure.size(model)
        if base is None:
            timing = measure.latency(model, image, *rounds)
        else:
            timing = measure.paired_latency(base.to(self.device), model, image, *rounds)
            # speed-up / (base GMACs / pruned GMACs)
            timing["efficiency_core"] = timing["speedup_core"] * size["gmacs"] / measure.size(base)["gmacs"]
        values = {**metrics, **size, **timing, "eval_seconds": eval_seconds}
        return values | {"core_conditions": dict(model.core_conditions)}

    def _row(self, cell: Cell, values: dict[str, Any]) -> dict[str, Any]:
        values = dict(values)
        env = provenance.environment(self.device) | {"jobs": self.jobs}
        env["core_conditions"] = values.pop("core_conditions", {})
        data = experiment_data_path(cell.experiment, self.work_dir)
        target = Target.parse(cell.target) if cell.target else None
        _, val_set = self.datasets(cell.experiment)
        return {
            "cell_id": cell.cell_id,
            "suite": cell.suite,
            "detector": f"{cell.experiment.detector}-{cell.experiment.size}",
            "dataset": val_set.table_name or cell.experiment.dataset,
            "method": cell.method,
            "target": cell.target,
            "target_kind": target.kind if target else "",
            "target_rate": target.rate if target else None,
            "seed": cell.seed,
            "regime": cell.regime,
            "input_size": cell.input_size,
            "metric": getattr(val_set, "metric", "ap"),
            "threads": env["threads"],
            "cpu": env["cpu"],
            "gpu": env["gpu"],
            "device": env["device"],
            "config": json.dumps(cell.config(), sort_keys=True),
            "env": json.dumps(env, sort_keys=True),
            "created_at": now(),
            "data_path": _relative(data) if data is not None else None,
            **provenance.provenance(self.device),
            **values,
        }

    def run_base(self, cell: Cell) -> dict[str, Any]:
        model, path, meta = self.baseline(cell)
        _, val_set = self.datasets(cell.experiment)
        values = self._measure(model, cell, val_set)
        values |= {
            "achieved_params_pr": 0.0,
            "achieved_flops_pr": 0.0,
            "achieved_channels_pr": 0.0,
            "train_seconds": meta.get("train_seconds"),
            "baseline_path": _relative(path),
            "model_path": _relative(path),
            "report": json.dumps({"regime_stats": meta.get("regime_stats", {})}, sort_keys=True),
            "train_health": _health(meta.get("health")),
        }
        return self._row(cell, values)

    def run_pruned(self, cell: Cell) -> dict[str, Any]:
        model, base_path, base_meta = self.baseline(cell)
        train_set, val_set = self.datasets(cell.experiment)
        pruned = prune_and_finetune(
            model,
            build_method(cell.method, **cell.method_options),
            train_set,
            Target.parse(cell.target),
            cell.finetune,
            prune=cell.prune,
            seed=cell.seed,
            progress=self.progress,
            score_cache=self._score_caches.setdefault(f"{cell.baseline_key}:{cell.prune}", {}),
            desc=f"fine-tune {cell.label}",
            val_set=val_set,
            eval_batch_size=cell.evaluate["batch_size"],
        )
        report, stats, oneshot = pruned.report, pruned.finetune, pruned.oneshot or {}
        faults.reached("saving")
        path = save_checkpoint(
            model,
            self.work_dir / "models" / cell.suite / f"{cell.cell_id}.pt",
            {"cell": cell.label, "provenance": {**provenance.harness(), "created_at": now()}},
        )
        reloaded, _ = load_checkpoint(path)  # a pruned checkpoint that cannot be reloaded is a failed cell
        reloaded.predict([val_set[0][0]])
        values = self._measure(model, cell, val_set, base=load_checkpoint(base_path)[0])
        values |= {
            "oneshot_map": oneshot.get("map"),
            "oneshot_ap50": oneshot.get("ap50"),
            "finetune_epochs": cell.finetune.epochs,
            "achieved_params_pr": report.achieved["params"],
            "achieved_flops_pr": report.achieved["flops"],
            "achieved_channels_pr": report.achieved["channels"],
            "train_seconds": base_meta.get("train_seconds"),
            "prune_seconds": report.seconds,
            "finetune_seconds": stats["seconds"],
            "baseline_path": _relative(base_path),
            "model_path": _relative(path),
            "report": json.dumps(report.to_dict(), sort_keys=True, default=str),
            "train_health": _health(base_meta.get("health"), stats.get("health")),
        }
        return self._row(cell, values)

    # -- the grid -------------------------------------------------------------------------------
    def run_cell(self, cell: Cell, wait: bool = False) -> str:
        """Run one cell and store its row. Returns ``"ran"``; ``"done"`` when the store already
        holds it (another run finished it first); ``"held"`` when another run is on it and
        ``wait`` is false; ``"failed"`` when it failed, recorded with its stage and reason."""
        if self.finished(cell.cell_id):
            return "done"
        with held(lock_path(self.work_dir, "cell", cell.cell_id), wait=wait) as mine:
            if not mine:
                return "held"
            if self.finished(cell.cell_id):
                return "done"
            outcome = self.compute(cell)
            if isinstance(outcome, faults.Failure):
                self.record(cell, outcome)
                return "failed"
            faults.reached("store")
            return self.store_row(outcome)

    def finished(self, cell_id: str) -> bool:
        """Whether the store holds the cell's row and this run keeps it (``--recompute``)."""
        return self.recompute.keeps(self.store.made().get(cell_id))

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

    def compute(self, cell: Cell) -> dict[str, Any] | faults.Failure:
        """The cell's row, or why it failed; stores nothing (an executor's driver stores it)."""
        try:
            faults.reached("starting")
            return self.run_base(cell) if cell.method == "base" else self.run_pruned(cell)
        except faults.INPUT_ERRORS:
            raise  # the data is bad for every cell: the run stops with one line
        except Exception as exc:  # noqa: BLE001 - a cell's failure must not stop the suite
            stage = "baseline-training" if isinstance(exc, BaselineFailed) else faults.current()
            failure = faults.Failure.of(exc, stage)
            if stage in BASELINE_STAGES:  # the cells that need this baseline fail at once, untrained
                self._failed_baselines.setdefault(cell.baseline_key, failure)
            gc.collect()  # what the failed cell held (an out-of-memory cell's activations)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return failure

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

    def migrate(self, cells: list[Cell]) -> int:
        """Rows stored under the previous id scheme take their cells' current ids (once)."""
        return self.store.rekey({c.legacy_cell_id: c.cell_id for c in cells})

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

    def run(self, jobs: int = 1) -> dict[str, int]:
        """Base cells first (every baseline trained once), then the pruned cells.

        With ``jobs > 1`` cells run in that many worker processes, each on its share of the
        CPU threads; a worker writes each row itself as its cell finishes. Pruned cells go to
        workers in chunks of one (baseline, method), so each method scores a baseline once.
        Cells another run holds are skipped, then waited for at the end.
        """
        self.check_inputs()
        for folder in (self.work_dir, self.out_dir):  # a killed run's half-written files
            remove_stale(folder)
        self.jobs = jobs
        cells = self.suite.cells()
        todo, left = self.pending(cells)
        bar = tqdm(
            total=len(cells),
            initial=len(cells) - len(todo) - len(left),
            desc=f"suite {self.suite.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        phases = [[c for c in todo if c.method == "base"], [c for c in todo if c.method != "base"]]
        status: dict[str, str] = {}
        if jobs <= 1:
            for cell in todo:
                bar.set_postfix_str(cell.label)
                status[cell.cell_id] = self.run_cell(cell)
                bar.update(status[cell.cell_id] != "held")
        else:
            threads = max(1, torch.get_num_threads() // jobs)
            spec = (
                str(self.suite.path),
                str(self.out_dir.parent),
                str(self.work_dir),
                str(self.device),
                jobs,
                self.suite.overrides,
                (self.recompute.mode, self.recompute.started_at),
            )
            with ProcessPoolExecutor(
                jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(spec, threads)
            ) as pool:
                for phase in phases:
                    chunks: dict[tuple[str, str], list[str]] = {}
                    for cell in phase:
                        chunks.setdefault((cell.baseline_key, cell.method), []).append(cell.cell_id)
                    futures = [pool.submit(_run_chunk, ids) for ids in chunks.values()]
                    for future in as_completed(futures):
                        done = future.result()
                        status |= done
                        bar.update(sum(s != "held" for s in done.values()))
        by_id = {c.cell_id: c for c in todo}
        for cell_id in [i for i, s in status.items() if s == "held"]:  # another run had them
            bar.set_postfix_str(f"waiting for {by_id[cell_id].label}")
            status[cell_id] = self.run_cell(by_id[cell_id], wait=True)
            bar.update()
        bar.close()
        return tally(cells, todo, left, status)


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


def _health(baseline: str | None, finetune: str | None = None) -> str | None:
    """A row's training health: "ok", or what was wrong with its baseline's or fine-tuning's loss."""
    problems = [
        f"{what}: {h}" for what, h in (("baseline", baseline), ("fine-tuning", finetune)) if h and h != "ok"
    ]
    if problems:
        return "; ".join(problems)
    return "ok" if baseline or finetune else None


_WORKER: Runner | None = None


def _init_worker(spec: tuple[Any, ...], threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    suite_path, results_dir, work_dir, device, jobs, overrides, (mode, started_at) = spec
    suite = load_suite(suite_path, overrides)
    recompute = Recompute(mode, started_at)
    _WORKER = Runner(suite, Path(results_dir), Path(work_dir), device, progress=False, recompute=recompute)
    _WORKER.jobs = jobs


def _run_chunk(cell_ids: list[str]) -> dict[str, str]:
    cells = {c.cell_id: c for c in _WORKER.suite.cells()}
    return {cell_id: _WORKER.run_cell(cells[cell_id]) for cell_id in cell_ids}
