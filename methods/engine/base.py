"""The Method interface and its registry (DESIGN.md §3).

A method *scores*: ``importance`` (abstract) returns a ``ChannelScores`` built from its per-layer
channel scores, which reduces them to one score per channel of each dependency group (lower =
pruned first), the same way for every method. Everything else is the engine's
(``methods.engine.prune(method, model, ctx, target)``): removing channels, keeping coupled layers
consistent, meeting the budget, and scheduling rounds and training. A method only *declares* what
its schedule needs:

* ``scope``: "local" (the same share from every layer) or "global" (one ranking);
* ``rounds``: rescored rounds, each removing an equal share of what is left of the budget;
* ``channels_per_round``: instead, every round removes this many channels until the target;
* ``train_iterations``: iterations of the shared training loop before each round's scoring,
  with ``training_hooks`` (``TrainingHook``s) running inside them (GroupFisher's Fisher sums);
* ``train_loss``: an extra loss in every training of its cells (LDT's discriminant loss), given
  the neck maps of the step's own forward pass.

The engine imports this module, never the reverse: a method does not prune itself, its callers
hand it to the engine.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from detectors.base import Detector

from .groups import ChannelScores
from .training import TrainingHook
from .types import Batch, Losses, Maps, MethodError, PruneContext

_REGISTRY: dict[str, type[Method]] = {}


class Method(abc.ABC):
    """A pruning criterion: ``importance`` plus the declarations above."""

    name: ClassVar[str] = ""
    scope: ClassVar[str] = "local"
    regime: str = "plain"  # the baseline training this method's cells start from (per instance)
    defaults: ClassVar[dict[str, Any]] = {}
    rounds: int = 1
    channels_per_round: int | None = None
    train_iterations: int = 0
    # whether ``train_loss`` also shapes fine-tuning (LDT's does); Slimming's sparsity penalty is
    # its baseline's training only, as its paper fine-tunes without it
    finetune_loss: ClassVar[bool] = True
    # whether one scoring of a baseline may serve every target (``ctx.score_cache``); False for a
    # method that keeps state from its own pass for ``after_removal`` (ThiNet's samples)
    shares_scores: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            near = difflib.get_close_matches(unknown[0], list(self.defaults), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise MethodError(
                f"method '{self.name}' has no option(s) {', '.join(unknown)}{hint}; "
                f"its options: {', '.join(sorted(self.defaults)) or 'none'}"
            )
        self.options = {**self.defaults, **options}

    def regime_options(self) -> dict[str, Any]:
        """The options that shape this method's baseline training (none for the plain regime)."""
        return dict(self.options) if self.regime != "plain" else {}

    def loss_hook(self, ctx: PruneContext) -> Callable[..., Tensor | None] | None:
        """``train_loss`` as the training loop's ``extra_loss`` (None for a method that adds none,
        so the loop need not capture neck maps)."""
        if type(self).train_loss is Method.train_loss:
            return None
        return lambda model, batch, losses, neck: self.train_loss(model, ctx, batch, losses, neck)

    def regime_hooks(self) -> list[TrainingHook]:
        """Hooks for every training with ``train_loss`` (baseline and fine-tuning): LDT logs its
        per-epoch trajectory through one. None by default."""
        return []

    def stats(self) -> dict[str, Any]:
        """Counters a method keeps while training or scoring (LDT's skipped scales), for the rows."""
        return {}

    def scoring_notes(self, model: Detector) -> dict[str, Any]:
        """What the last scoring found, for the report (kept with cached scores)."""
        return {}

    def prepare(self, model: Detector, ctx: PruneContext) -> None:  # noqa: B027  (optional: no-op)
        """Collect statistics over ``ctx.calibration`` before scoring; nothing by default."""

    @abc.abstractmethod
    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        """The method's per-layer channel scores (by layer name) as ``ChannelScores``: the one
        reduction to a score per channel of each dependency group, shared by every method."""

    def after_removal(  # noqa: B027  (optional: no-op)
        self, model: Detector, ctx: PruneContext, kept: dict[str, dict[str, list[int]]]
    ) -> None:
        """Called after each round's removal with the channels every changed conv kept
        (``groups.apply_removal``): ThiNet refits the layers it pruned. Nothing by default."""

    def training_hooks(self, model: Detector, ctx: PruneContext) -> list[TrainingHook]:
        """Hooks for the training before each round (``train_iterations`` > 0); none by default."""
        return []

    def train_loss(
        self, model: Detector, ctx: PruneContext, batch: Batch, losses: Losses, neck: Maps | None = None
    ) -> Tensor | None:
        """An extra (re)training loss; ``neck``: the maps of the pass that computed ``losses``."""
        return None


COUPLINGS = ("root", "sum")


class CoupledCriterion(Method):
    """A per-layer criterion with DCODP's inter-layer coupling as a switch, ``coupling``:
    ``"root"`` scores a dependency group by its root layer alone (what a single-layer criterion
    such as HRank, CHIP or Slimming does in its paper), ``"sum"`` sums the scores of every coupled
    layer at each index (DCODP's inter-layer coupling). The default is each method's own."""

    defaults: ClassVar[dict[str, Any]] = {"coupling": "root"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["coupling"] not in COUPLINGS:
            raise MethodError(
                f"{self.name}: coupling must be one of {', '.join(COUPLINGS)}, "
                f"not {self.options['coupling']!r}"
            )

    @property
    def root_only(self) -> bool:
        return self.options["coupling"] == "root"


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
        near = difflib.get_close_matches(base, method_names(), n=1, cutoff=0.5)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise MethodError(f"unknown method '{base}'{hint}; known: {', '.join(method_names())}")
    return _REGISTRY[base](**options)
