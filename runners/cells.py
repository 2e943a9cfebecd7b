"""One cell (DESIGN.md §3): baseline -> prune a copy -> fine-tune -> measure -> one row.

This module computes a cell and stores nothing: the driver (``executors/driver.py``) locks the
cell, stores its row or its failure, and decides nothing here about where a cell runs. Pruned
models are written atomically with their checksums, so a killed cell leaves nothing half-written
behind; the baselines come from their cache (``baselines.py``). A cell that fails comes back as a
``faults.Failure`` naming its stage and reason, so the suite goes on.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from datasets.base import DetectionDataset
from detectors import Detector, load_checkpoint, save_checkpoint
from methods import Target, build_method

from . import deploy, faults, measure, provenance
from .baselines import BASELINE_STAGES, BaselineFailed, Baselines
from .evaluate import evaluate
from .inputs import experiment_data_path, open_datasets
from .prune import prune_and_finetune
from .recompute import Recompute, now
from .suite import Cell, Experiment


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class CellRunner:
    """Computes cells' rows in this process, keeping what cells share: the opened datasets, the
    baselines, and each method's scores of a baseline (a method scores a baseline once)."""

    def __init__(self, work_dir: Path, device: torch.device, progress: bool, recompute: Recompute) -> None:
        self.work_dir = work_dir
        self.device = device
        self.progress = progress
        self._datasets: dict[str, tuple[DetectionDataset, DetectionDataset]] = {}
        self._score_caches: dict[str, dict] = {}  # per baseline: each method scores it once
        self.baselines = Baselines(work_dir, device, self.datasets, recompute, progress)
        self.jobs = 1  # how many cells run side by side: recorded with every row's timings

    def datasets(self, experiment: Experiment) -> tuple[DetectionDataset, DetectionDataset]:
        key = json.dumps([experiment.dataset, experiment.data], sort_keys=True)
        if key not in self._datasets:
            self._datasets[key] = open_datasets(experiment, self.work_dir)
        return self._datasets[key]

    def baseline(self, cell: Cell) -> tuple[Detector, Path, dict[str, Any]]:
        """The trained baseline of ``cell`` and its meta: from the cache, or trained once and cached."""
        return self.baselines.get(cell)

    def compute(self, cell: Cell) -> dict[str, Any] | faults.Failure:
        """The cell's row, or why it failed; stores nothing (the driver stores it)."""
        try:
            faults.reached("starting")
            return self.run_base(cell) if cell.method == "base" else self.run_pruned(cell)
        except faults.INPUT_ERRORS:
            raise  # the data is bad for every cell: the run stops with one line
        except Exception as exc:  # noqa: BLE001 - a cell's failure must not stop the suite
            stage = "baseline-training" if isinstance(exc, BaselineFailed) else faults.current()
            failure = faults.Failure.of(exc, stage)
            if stage in BASELINE_STAGES:  # the cells that need this baseline fail at once, untrained
                self.baselines.fail(cell, failure)
            gc.collect()  # what the failed cell held (an out-of-memory cell's activations)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return failure

    def _measure(
        self, model: Detector, cell: Cell, val_set: DetectionDataset, base: Detector | None = None
    ) -> dict[str, Any]:
        """mAP, size, and latency: alone for a base row, paired against ``base`` for a pruned one.
        A speed-only cell (``Cell.speed_only``) is neither evaluated nor timed end to end."""
        metrics, eval_seconds = {}, None
        if not cell.speed_only:
            faults.reached("evaluation")
            start = time.perf_counter()
            metrics = evaluate(model, val_set, cell.evaluate["batch_size"], self.progress)
            eval_seconds = time.perf_counter() - start
        faults.reached("timing")
        image = None if cell.speed_only else val_set[0][0]
        size, timing_of = measure.size(model), measure.Timing.of(cell.measure)
        if base is None:
            timing = measure.latency(model, image, timing_of.warmup, timing_of.rounds)
        else:
            timing = measure.paired_latency(base.to(self.device), model, image, timing_of)
            # speed-up / (base GMACs / pruned GMACs)
            shrink = size["gmacs"] / measure.size(base)["gmacs"]
            timing["efficiency_core"] = timing["speedup_core"] * shrink
            if "onnxruntime" in cell.measure["runtimes"]:  # both exported, checked, then paired
                faults.reached("export")
                with tempfile.TemporaryDirectory(dir=self.work_dir) as folder:
                    timing |= deploy.paired_onnx_latency(
                        base, model, Path(folder), timing_of, device=self.device
                    )
                timing["efficiency_ort"] = timing["speedup_ort"] * shrink
            batches = [b for b in cell.measure["batch_sizes"] if b != 1]
            if batches:
                timing["batch_timings"] = json.dumps(
                    {str(b): self._batch(base, model, cell, b, shrink) for b in batches}, sort_keys=True
                )
        values = {**metrics, **size, **timing, "eval_seconds": eval_seconds}
        return values | {"core_conditions": dict(model.core_conditions), "speed_only": int(cell.speed_only)}

    def _batch(
        self, base: Detector, model: Detector, cell: Cell, batch: int, shrink: float
    ) -> dict[str, Any]:
        """``core`` on ``batch`` images at once, paired as at batch 1, on each of the cell's runtimes
        (ONNX Runtime only where the export's batch axis is dynamic)."""
        timing_of = measure.Timing.of(cell.measure)
        torch_t = measure.paired_latency(base, model, None, timing_of, batch)
        out = {k: v for k, v in torch_t.items() if "predict" not in k}
        out["efficiency_core"] = out["speedup_core"] * shrink
        if "onnxruntime" in cell.measure["runtimes"] and model.dynamic_batch:
            with tempfile.TemporaryDirectory(dir=self.work_dir) as folder:
                ort = deploy.paired_onnx_latency(
                    base, model, Path(folder), timing_of, device=self.device, batch=batch
                )
            out |= {k: v for k, v in ort.items() if k != "ort_provider"}
            out["efficiency_ort"] = out["speedup_ort"] * shrink
        return out

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
            **provenance.provenance(self.device, _runtimes(cell)),
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
            val_set=None if cell.speed_only else val_set,  # no one-shot mAP of untrained weights
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


def _health(baseline: str | None, finetune: str | None = None) -> str | None:
    """A row's training health: "ok", or what was wrong with its baseline's or fine-tuning's loss."""
    problems = [
        f"{what}: {h}" for what, h in (("baseline", baseline), ("fine-tuning", finetune)) if h and h != "ok"
    ]
    if problems:
        return "; ".join(problems)
    return "ok" if baseline or finetune else None


def _runtimes(cell: Cell) -> tuple[str, ...]:
    """The runtimes besides PyTorch a cell's row was timed on (a base row is timed alone)."""
    return () if cell.method == "base" else tuple(r for r in cell.measure["runtimes"] if r != "torch")
