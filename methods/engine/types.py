"""The types every part of pruning shares: targets, the context, the report, the one error.

They live apart from ``Method`` and from the engine so that the training loop, the method
interface and the engine name them without importing one another (DESIGN.md §3, §6).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .training import Schedule

TARGET_KINDS = ("params", "flops", "channels")
Batch = tuple[list[Tensor], list[dict[str, Tensor]]]  # images and targets in the sample format
Maps = list[Tensor]  # per-scale feature maps (a neck's output)
Losses = dict[str, Tensor]  # a detector's named loss terms
# the budget knobs, the same for every method; suites, the CLI and PruneContext read them here
PRUNE_DEFAULTS: dict[str, Any] = {
    "round_to": 8,
    "max_layer_ratio": 0.9,
    "tolerance": 0.005,
    "calibration_images": 256,
}


class MethodError(ValueError):
    """Bad method name, option or target, reported as one line."""


@dataclass(frozen=True)
class Target:
    """A budget: remove ``rate`` of the detector's ``kind`` (params, flops or channels)."""

    kind: str
    rate: float

    @classmethod
    def parse(cls, text: str) -> Target:
        kind, sep, rate = str(text).partition(":")
        if not sep or kind not in TARGET_KINDS:
            near = difflib.get_close_matches(kind, TARGET_KINDS, n=1) if sep else []
            hint = f" (did you mean '{near[0]}:{rate}'?)" if near else ""
            raise MethodError(
                f"bad target '{text}': expected KIND:RATE with KIND in {', '.join(TARGET_KINDS)}{hint}"
            )
        try:
            value = float(rate)
        except ValueError:
            raise MethodError(f"bad target '{text}': rate '{rate}' is not a number") from None
        if not 0.0 < value < 1.0:
            raise MethodError(f"bad target '{text}': rate must lie in (0, 1)")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.rate:g}"


@dataclass
class PruneContext:
    """What a method and the engine may use besides the model.

    ``calibration``: fixed batches for statistics-based criteria; ``train_set`` and
    ``schedule``: what training between pruning rounds uses (GroupFisher), ``batch_size``
    overriding the schedule's (the calibration batches stand in when there is no training set).
    Everything runs on the model's device.
    """

    calibration: Sequence[Batch] = ()
    seed: int = 0
    round_to: int = PRUNE_DEFAULTS["round_to"]
    max_layer_ratio: float = PRUNE_DEFAULTS["max_layer_ratio"]
    tolerance: float = PRUNE_DEFAULTS["tolerance"]
    progress: bool = True
    train_set: Any = None
    batch_size: int | None = None
    schedule: Schedule = field(default_factory=Schedule)
    # scores depend only on the unpruned model, the data and the options: a runner shares this
    # dict across the targets of one baseline so each method scores it once
    score_cache: dict[str, Any] | None = None


@dataclass
class PruneReport:
    """What a pruning did: achieved reductions, and every pruned layer's channel count."""

    method: str
    target: str
    achieved: dict[str, float]
    params_before: int
    params_after: int
    gmacs_before: float
    gmacs_after: float
    layers: dict[str, list[int]]
    groups: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    probes: int = 0
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
