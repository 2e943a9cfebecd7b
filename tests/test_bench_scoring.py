"""Benchmark (``tox -e bench``): what one scoring costs, as a multiple of one pass over the
calibration images — a forward pass (eval, no gradients) for criteria that only read activations
or weights, a forward + backward of the detection loss for those that need gradients.

Tiny FCOS at 128 px, 32 synthetic-COCO calibration images in batches of 16, the smoke's settings;
each method scores a fresh copy once (``prepare`` + ``importance`` + the per-group reduction, as the
engine's ``_score`` does). GroupFisher's scores are what ``d`` training iterations collect, so its
figure includes those iterations (its scoring *is* training). Set ``DETPRUNE_BENCH_TABLE`` to a
path to write the table there.
"""

from __future__ import annotations

import copy
import os
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from datasets import build_dataset
from detectors import build_detector
from detectors.base import Detector
from methods import Method, PruneContext, build_method
from methods.engine.groups import score_groups
from methods.engine.training import Schedule, Trainer
from runners.prune import calibration_batches

pytestmark = pytest.mark.bench
METHODS = ["l1", "random", "hrank", "chip", "dcodp", "px", "ldt", "groupfisher"]
GRADIENTS = {"px", "ldt", "groupfisher"}  # criteria that run backward passes


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _score(method: Method, model: Detector, ctx: PruneContext) -> None:
    """One scoring as the engine's ``_score`` does it, after the training a method scores from."""
    if method.train_iterations:
        trainer = Trainer(model, ctx.train_set, ctx.schedule, progress=False)
        trainer.steps(method.train_iterations, method.training_hooks(model, ctx))
    method.prepare(model, ctx)
    score_groups(model, method.importance(model, ctx))


def test_scoring_cost_in_passes_over_the_calibration_images(tmp_path: Path) -> None:
    data = build_dataset("synthetic-coco", "train", root=tmp_path, num_train=64, num_val=0, image_size=128)
    torch.manual_seed(0)
    model = build_detector("fcos", len(data.classes), "tiny", 128)
    batches = calibration_batches(data, 32)
    schedule = Schedule(optimizer="adamw", batch_size=8, lr=5e-4, warmup_iters=10)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            for images, _ in batches:
                model.core(model.preprocess(images))

    def forward_backward() -> None:
        model.train()
        for images, targets in batches:
            sum(model.loss(images, targets).values()).backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    forward(), forward_backward()  # warm-up
    fwd = min(_seconds(forward) for _ in range(3))
    fwd_bwd = min(_seconds(forward_backward) for _ in range(3))
    rows = []
    for name in METHODS:
        method = build_method(name, **({"channels_per_step": 64} if name == "groupfisher" else {}))
        ctx = PruneContext(calibration=batches, round_to=1, progress=False, train_set=data, schedule=schedule)
        seconds = _seconds(partial(_score, method, copy.deepcopy(model).eval(), ctx))
        unit = fwd_bwd if name in GRADIENTS else fwd
        rows.append((name, seconds, "forward + backward" if name in GRADIENTS else "forward", seconds / unit))
    lines = [
        f"one pass over 32 images: forward {fwd * 1e3:.0f} ms, forward + backward {fwd_bwd * 1e3:.0f} ms "
        f"({torch.get_num_threads()} threads)",
        "",
        "| method | scoring (s) | measured against | × one pass |",
        "| --- | ---: | --- | ---: |",
        *(f"| {n} | {s:.2f} | {u} | {r:.1f} |" for n, s, u, r in rows),
    ]
    print("\n" + "\n".join(lines))
    if os.environ.get("DETPRUNE_BENCH_TABLE"):
        Path(os.environ["DETPRUNE_BENCH_TABLE"]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert all(r[1] > 0 for r in rows)
