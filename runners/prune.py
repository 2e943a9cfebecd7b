"""Prune one model and fine-tune it: the same steps for a suite's cell and ``detprune prune``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datasets.base import DetectionDataset
from detectors.base import Detector
from methods import PRUNE_DEFAULTS, Method, PruneContext, PruneReport, Target, engine
from methods.engine.training import Schedule, train

from . import faults
from .evaluate import evaluate


def calibration_batches(dataset: DetectionDataset, images: int, batch_size: int = 16) -> list:
    """The first ``images`` training images, in a fixed order, as (images, targets) batches."""
    count = min(images, len(dataset))
    samples = [dataset[i] for i in range(count)]
    return [
        ([s[0] for s in samples[i : i + batch_size]], [s[1] for s in samples[i : i + batch_size]])
        for i in range(0, count, batch_size)
    ]


@dataclass
class Pruned:
    report: PruneReport
    finetune: dict[str, Any]  # the loop's stats: loss, seconds, health
    context: PruneContext
    oneshot: dict[str, float] | None  # mAP right after pruning, before fine-tuning


def prune_and_finetune(
    model: Detector,
    method: Method,
    train_set: DetectionDataset,
    target: Target,
    finetune: Schedule,
    *,
    prune: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    score_cache: dict[str, Any] | None = None,
    desc: str = "fine-tune",
    val_set: DetectionDataset | None = None,
    eval_batch_size: int = 16,
) -> Pruned:
    """Prune ``model`` in place with the shared engine, evaluate what the criterion chose on
    ``val_set`` (one-shot mAP), then fine-tune (``finetune.epochs`` may be 0). ``prune``: the
    budget knobs, ``PRUNE_DEFAULTS`` for any left out. Training inside the engine (GroupFisher)
    uses the fine-tuning schedule; the method's loss is in both."""
    knobs = {**PRUNE_DEFAULTS, **(prune or {})}
    ctx = PruneContext(
        calibration=calibration_batches(train_set, knobs["calibration_images"]),
        seed=seed,
        round_to=knobs["round_to"],
        max_layer_ratio=knobs["max_layer_ratio"],
        tolerance=knobs["tolerance"],
        progress=progress,
        train_set=train_set,
        schedule=finetune,
        score_cache=score_cache,
    )
    faults.reached("scoring")
    report = engine.prune(method, model, ctx, target)
    faults.reached("one-shot-evaluation")
    oneshot = evaluate(model, val_set, eval_batch_size, progress) if val_set is not None else None
    stats: dict[str, Any] = {"loss": float("nan"), "seconds": 0.0, "health": None}
    if finetune.epochs > 0:
        faults.reached("fine-tuning")
        stats = train(
            model,
            train_set,
            finetune,
            seed=seed,
            extra_loss=method.loss_hook(ctx) if method.finetune_loss else None,
            hooks=(*method.regime_hooks(), faults.StageHook("finetune-step")),
            desc=desc,
            progress=progress,
        )
    report.notes["method_stats"] = method.stats()  # after fine-tuning: its counters too
    return Pruned(report, stats, ctx, oneshot)
