"""What happens when things go wrong inside a run: the stage a cell is in, a failed cell's
record, and a test-only hook that kills the process at a named stage.

The stage is what a failed cell's record names, so a reader knows whether a method's criterion,
its training or the measurement failed. The stages a run reaches, in order (``faults.reached``):

- ``starting`` (a cell begins), ``baseline-training``, ``baseline-step``, ``baseline-saved``
  (``baselines.py``: only when the baseline is trained, not when it is found in the cache);
- a pruned cell's ``scoring`` (scoring and pruning), ``one-shot-evaluation``, ``fine-tuning``,
  ``finetune-step`` (``prune.py``), then ``saving`` (``cells.py``: the pruned checkpoint);
- ``evaluation``, ``timing`` (``cells.py``: every cell, base or pruned), and ``export`` for a
  pruned cell timed on ONNX Runtime too (``measure.runtimes``: both models exported and checked);
- ``store`` (``executors/driver.py``: the row is written), ``tables`` (``cli.py``: after the cells).

A failure recorded at stage ``ray`` is a Ray task that raised outside a cell, or was lost with
its worker or node (``executors/ray_cluster.py``).

``DETPRUNE_KILL_AT=STAGE[:N]`` (tests only) sends SIGKILL to this process the N-th time (default
the first) it reaches STAGE: a kill at a chosen point, not between cells only, which is what a
resume must survive. Stages with a step count (``baseline-step``, ``finetune-step``) are reached
once per training step.
"""

from __future__ import annotations

import os
import signal
import traceback
from dataclasses import dataclass
from typing import Any

from datasets.base import DatasetError
from methods.engine.training import TrainingHook

KILL_ENV = "DETPRUNE_KILL_AT"
# a failure of the input, not of a cell: it would fail every cell that reads it, so the run stops
# with one line (exit 2) instead of recording each cell as failed
INPUT_ERRORS: tuple[type[BaseException], ...] = (DatasetError,)

_current = {"stage": "starting"}
_reached: dict[str, int] = {}


def reached(stage: str) -> None:
    """Enter ``stage``: remembered for a failure's record; the test-only kill fires here."""
    _current["stage"] = stage
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != stage:
        return
    _reached[stage] = _reached.get(stage, 0) + 1
    if _reached[stage] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def current() -> str:
    return _current["stage"]


class StageHook(TrainingHook):
    """A training-loop hook that reaches ``stage`` after every backward pass (a kill mid-training)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def after_backward(self, model: Any) -> None:
        reached(self.stage)


@dataclass(frozen=True)
class Failure:
    """Why a cell has no row: the stage it was in, the error in one line, the traceback's tail."""

    stage: str
    error: str
    detail: str

    @classmethod
    def of(cls, exc: BaseException, stage: str | None = None) -> Failure:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        tail = "".join(traceback.format_exception(exc)[-6:])
        return cls(stage or current(), error[:500], tail[-4000:])
