"""The Method interface, its registry, targets and the report of a pruning (DESIGN.md §3, §6).

A method supplies scores (a torch-pruning ``Importance``); removing channels, keeping coupled
layers consistent and meeting the budget are shared by every method (``methods.budget``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import Tensor

from detectors.base import Detector

_REGISTRY: dict[str, type[Method]] = {}
TARGET_KINDS = ("params", "flops", "channels")


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
            raise MethodError(
                f"bad target '{text}': expected KIND:RATE with KIND in {', '.join(TARGET_KINDS)}"
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
    """What a method may use besides the model: calibration data and the shared budget knobs."""

    calibration: Sequence[tuple[list[Tensor], list[dict[str, Tensor]]]] = ()
    seed: int = 0
    round_to: int = 8
    max_layer_ratio: float = 0.9
    tolerance: float = 0.005
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    # the training split and batch size, for methods that train while they prune (GroupFisher)
    train_set: Any = None
    batch_size: int = 8
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


class Method:
    """A pruning criterion. Subclasses set ``scope`` and return an ``Importance``."""

    name: ClassVar[str] = ""
    scope: ClassVar[str] = "local"  # local: same ratio per layer; global: one ranking
    regime: str = "plain"  # the baseline training this method's cells start from (per instance)
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise MethodError(f"method '{self.name}' has no option(s) {', '.join(sorted(unknown))}")
        self.options = {**self.defaults, **options}

    def regime_options(self) -> dict[str, Any]:
        """The options that shape this method's baseline training (none for the plain regime)."""
        return dict(self.options) if self.regime != "plain" else {}

    def stats(self) -> dict[str, Any]:
        """Counters a method keeps while training or scoring (LDT's skipped scales), for the rows."""
        return {}

    def prepare(self, model: Detector, ctx: PruneContext) -> None:
        """Collect statistics over ``ctx.calibration`` before scoring; nothing by default."""

    def importance(self, model: Detector, ctx: PruneContext) -> tp.importance.Importance:
        raise MethodError(f"method '{self.name}' defines no importance")

    def train_loss(
        self, model: Detector, ctx: PruneContext, batch: Any, losses: dict[str, Tensor]
    ) -> Tensor | None:
        """An extra (re)training loss; LDT uses it, the others add nothing."""
        return None

    def prune(self, model: Detector, ctx: PruneContext, target: Target) -> PruneReport:
        """Score once, then bisect the amount removed until the budget is met; prunes in place."""
        from .budget import prune_to_budget, score_groups

        start = time.perf_counter()
        key = json.dumps(
            [self.name, self.options, len(ctx.calibration), ctx.seed], sort_keys=True, default=str
        )
        cache = ctx.score_cache if ctx.score_cache is not None else {}
        cached = key in cache
        if not cached:
            self.prepare(model, ctx)
            cache[key] = (score_groups(model, self.importance(model, ctx)), time.perf_counter() - start)
        groups, scoring_seconds = cache[key]
        report = prune_to_budget(model, groups, target, ctx, scope=self.scope)
        report.method = self.name
        # a cached score still cost its scoring time: count it, so every row's time is comparable
        report.seconds = time.perf_counter() - start + (scoring_seconds if cached else 0.0)
        report.notes |= {"scoring_seconds": scoring_seconds, "scores_cached": cached}
        return report


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise MethodError(f"method '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def build_method(name: str, **options: Any) -> Method:
    """``name`` or ``name:variant`` (a named variant: same method, its own options in a suite)."""
    base = name.partition(":")[0]
    if base not in _REGISTRY:
        raise MethodError(f"unknown method '{base}'; known: {', '.join(method_names())}")
    return _REGISTRY[base](**options)
