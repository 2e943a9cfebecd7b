"""The cell pipeline (DESIGN.md §3): baseline -> prune a copy -> fine-tune -> measure -> one row.

Nothing is lost to a crash: baselines and pruned models are written atomically, and a cell's row
is written in one transaction only once the cell has finished, so a killed suite resumes at the
first unfinished cell.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datasets import build_dataset
from datasets.base import DatasetError, DetectionDataset
from detectors import Detector, DetectorError, build_detector, load_checkpoint, save_checkpoint
from methods import PruneContext, Target, build_method
from methods.training import train
from results import DuplicateCellError, ResultStore

from . import measure
from .evaluate import evaluate
from .prune import prune_and_finetune
from .suite import Cell, Experiment, Suite, load_suite

DECODED_IMAGE_BYTES = 1 << 30  # per split and process; a larger set decodes the rest from disk


def default_work_dir() -> Path:
    return Path(os.environ.get("DETPRUNE_HOME", ".detprune"))


def data_root(dataset: str, root: str | None) -> Path | None:
    """A suite's data root, with ``$VARS`` expanded; an unset variable is named in the error."""
    if root is None:
        return None
    expanded = os.path.expandvars(str(root))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise DatasetError(
            f"{dataset}: data root '{root}' needs the environment variable {unset.group(1)}: "
            f"set it to the {dataset} data folder"
        )
    return Path(expanded).expanduser()


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
    ) -> None:
        self.suite = suite
        self.out_dir = Path(results_dir) / suite.name
        self.work_dir = Path(work_dir) if work_dir else default_work_dir()
        self.device = torch.device(device)
        self.progress = progress
        self.store = ResultStore(self.out_dir / "results.sqlite")
        self._datasets: dict[str, tuple[DetectionDataset, DetectionDataset]] = {}
        self._score_caches: dict[str, dict] = {}  # per baseline: each method scores it once
        self.jobs = 1  # how many cells run side by side: recorded with every row's timings

    # -- inputs ---------------------------------------------------------------------------------
    def datasets(self, experiment: Experiment) -> tuple[DetectionDataset, DetectionDataset]:
        key = json.dumps([experiment.dataset, experiment.data], sort_keys=True)
        if key not in self._datasets:
            options = dict(experiment.data)
            root = data_root(experiment.dataset, options.pop("root", None))
            if experiment.dataset.startswith("synthetic") and root is None:
                root = self.work_dir / "data"
            pair = (
                build_dataset(experiment.dataset, "train", root=root, **options),
                build_dataset(experiment.dataset, "val", root=root, **options),
            )
            for split in pair:  # every baseline and fine-tuning reads the same images again
                split.keep_decoded(DECODED_IMAGE_BYTES)
            self._datasets[key] = pair
        return self._datasets[key]

    def check_inputs(self) -> None:
        """Open every dataset before any training, so a missing path fails at once."""
        for plan in self.suite.experiments:
            self.datasets(plan.experiment)

    def _build(self, cell: Cell, num_classes: int) -> Detector:
        torch.manual_seed(cell.seed)
        exp = cell.experiment
        return build_detector(
            exp.detector, num_classes, size=exp.size, input_size=cell.input_size, **exp.detector_options
        )

    def baseline(self, cell: Cell) -> tuple[Detector, Path, dict[str, Any]]:
        """The trained baseline of ``cell`` and its meta: from the cache, or trained once and cached."""
        path = self.work_dir / "baselines" / f"{cell.baseline_key}.pt"
        if path.is_file():
            try:
                model, meta = load_checkpoint(path)
                return model.to(self.device), path, meta
            except DetectorError as exc:  # the cache is ours: one this code cannot load is retrained
                print(f"detprune: cached baseline unusable, training it again: {exc}", file=sys.stderr)
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
            hooks=method.regime_hooks() if method is not None else (),
            desc=f"baseline {cell.experiment.detector}/{cell.experiment.dataset}",
            progress=self.progress,
        )
        meta = {
            "train_seconds": stats["seconds"],
            "baseline_key": cell.baseline_key,
            "regime_stats": method.stats() if method is not None else {},
        }
        save_checkpoint(model, path, meta)
        return model, path, meta

    # -- one cell -------------------------------------------------------------------------------
    def _measure(
        self, model: Detector, cell: Cell, val_set: DetectionDataset, base: Detector | None = None
    ) -> dict[str, Any]:
        """mAP, size, and latency: alone for a base row, paired against ``base`` for a pruned one."""
        start = time.perf_counter()
        metrics = evaluate(model, val_set, cell.evaluate["batch_size"], self.progress)
        eval_seconds = time.perf_counter() - start
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
        env = measure.environment(self.device) | {"jobs": self.jobs}
        env["core_conditions"] = values.pop("core_conditions", {})
        target = Target.parse(cell.target) if cell.target else None
        _, val_set = self.datasets(cell.experiment)
        return {
            "cell_id": cell.cell_id,
            "suite": cell.suite,
            "detector": f"{cell.experiment.detector}-{cell.experiment.size}",
            "dataset": cell.experiment.dataset,
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
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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
        path = save_checkpoint(
            model, self.work_dir / "models" / cell.suite / f"{cell.cell_id}.pt", {"cell": cell.label}
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
        }
        return self._row(cell, values)

    # -- the grid -------------------------------------------------------------------------------
    def run_cell(self, cell: Cell) -> bool:
        """Run one cell and store its row; False when another process finished it first."""
        if self.store.has(cell.cell_id):
            return False
        row = self.run_base(cell) if cell.method == "base" else self.run_pruned(cell)
        try:
            self.store.put(row)
        except DuplicateCellError:
            return False  # a concurrent run (e.g. a killed run's worker) stored it meanwhile
        return True

    def run(self, jobs: int = 1) -> dict[str, int]:
        """Base cells first (every baseline trained once), then the pruned cells.

        With ``jobs > 1`` cells run in that many worker processes, each on its share of the
        CPU threads; a worker writes each row itself as its cell finishes. Pruned cells go to
        workers in chunks of one (baseline, method), so each method scores a baseline once.
        """
        self.check_inputs()
        self.jobs = jobs
        cells = self.suite.cells()
        done = self.store.finished_ids()
        todo = [c for c in cells if c.cell_id not in done]
        bar = tqdm(
            total=len(cells),
            initial=len(cells) - len(todo),
            desc=f"suite {self.suite.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        phases = [[c for c in todo if c.method == "base"], [c for c in todo if c.method != "base"]]
        if jobs <= 1:
            for cell in todo:
                bar.set_postfix_str(cell.label)
                self.run_cell(cell)
                bar.update()
        else:
            threads = max(1, torch.get_num_threads() // jobs)
            spec = (
                str(self.suite.path),
                str(self.out_dir.parent),
                str(self.work_dir),
                str(self.device),
                jobs,
                self.suite.overrides,
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
                        bar.update(future.result())
        bar.close()
        return {"cells": len(cells), "ran": len(todo), "skipped": len(cells) - len(todo)}


_WORKER: Runner | None = None


def _init_worker(spec: tuple[str, str, str, str, int, dict[str, Any]], threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    suite_path, results_dir, work_dir, device, jobs, overrides = spec
    suite = load_suite(suite_path, overrides)
    _WORKER = Runner(suite, Path(results_dir), Path(work_dir), device, progress=False)
    _WORKER.jobs = jobs


def _run_chunk(cell_ids: list[str]) -> int:
    cells = {c.cell_id: c for c in _WORKER.suite.cells()}
    for cell_id in cell_ids:
        _WORKER.run_cell(cells[cell_id])
    return len(cell_ids)
