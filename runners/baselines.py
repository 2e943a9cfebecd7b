"""The baseline cache: each (detector, dataset, seed, training regime) trained once, on disk.

A baseline is the costliest step of a cell and shared by every cell of its experiment and seed,
so it is kept under ``<work>/baselines/<baseline_key>.pt`` with its checksum, behind a lock that
lets two runs (or two workers) train it once between them. A cached file without its checksum, or
one that fails it, is trained again; ``--recompute`` decides whether another code's baseline
counts. A baseline that fails is remembered for the rest of the run, so the cells that need it
fail at once instead of training it again each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from datasets.base import DetectionDataset
from detectors import (
    Detector,
    DetectorError,
    build_detector,
    load_checkpoint,
    load_weights_file,
    save_checkpoint,
)
from methods import PruneContext, build_method
from methods.engine.training import train

from . import faults, provenance
from .locks import held, lock_path
from .recompute import Recompute, now
from .suite import Cell, Experiment
from .suite_keys import weights_path

# a failure here leaves no baseline (once saved, it is there: a later failure is the cell's own)
BASELINE_STAGES = ("baseline-training", "baseline-step")

Datasets = Callable[[Experiment], tuple[DetectionDataset, DetectionDataset]]


class BaselineFailed(RuntimeError):
    """A cell's baseline failed earlier in this run: the cell is recorded failed without retraining."""


def baseline_path(work_dir: Path, baseline_key: str) -> Path:
    """Where a baseline is cached: one place, read by every executor and every node."""
    return Path(work_dir) / "baselines" / f"{baseline_key}.pt"


class Baselines:
    """The trained baselines of one run: from the cache, or trained once and cached."""

    def __init__(
        self, work_dir: Path, device: torch.device, datasets: Datasets, recompute: Recompute, progress: bool
    ) -> None:
        self.work_dir = work_dir
        self.device = device
        self.datasets = datasets  # the run's opened datasets: each is read once per process
        self.recompute = recompute
        self.progress = progress
        self.failed: dict[str, faults.Failure] = {}

    def path(self, cell: Cell) -> Path:
        return baseline_path(self.work_dir, cell.baseline_key)

    def get(self, cell: Cell) -> tuple[Detector, Path, dict[str, Any]]:
        """The trained baseline of ``cell``, its path and its meta."""
        if cell.baseline_key in self.failed:
            raise BaselineFailed(f"its baseline failed: {self.failed[cell.baseline_key].error}")
        path = self.path(cell)
        lock = lock_path(self.work_dir, "baseline", cell.baseline_key)
        with held(lock, wait=False) as free:
            if free:
                return self._cached_or_trained(cell, path)
        print(f"detprune: waiting for another run to train the baseline of {cell.label}", file=sys.stderr)
        with held(lock):  # trained once, however many runs need it
            return self._cached_or_trained(cell, path)

    def fail(self, cell: Cell, failure: faults.Failure) -> None:
        """Remember that ``cell``'s baseline failed (the first reason is kept)."""
        self.failed.setdefault(cell.baseline_key, failure)

    def _build(self, cell: Cell, num_classes: int) -> Detector:
        """The baseline before training: seeded, or the experiment's weights file."""
        torch.manual_seed(cell.seed)
        exp = cell.experiment
        model = build_detector(
            exp.detector, num_classes, size=exp.size, input_size=cell.input_size, **exp.detector_options
        )
        if exp.weights:  # trained from there only if train.epochs > 0
            load_weights_file(model, weights_path(exp.weights), trust=exp.trust)
        return model

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
