"""Random channel selection: the floor a criterion must beat to mean anything."""

from __future__ import annotations

import torch
import torch_pruning as tp

from detectors.base import Detector

from .base import Method, register
from .types import PruneContext


class SeededRandomImportance(tp.importance.Importance):
    """Uniform scores from a seeded generator, so a cell's random choice is reproducible."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group, **kwargs) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


@register("random")
class Random(Method):
    """``draw``: which of several random choices on one baseline (0: the cell's seed itself), so a
    suite can show how far random scores alone move a figure (``runners/suites/px_ablation.toml``)."""

    scope = "local"
    defaults = {"draw": 0}

    def importance(self, model: Detector, ctx: PruneContext) -> tp.importance.Importance:
        return SeededRandomImportance(score_seed(ctx.seed, int(self.options["draw"])))


def score_seed(seed: int, draw: int) -> int:
    """The generator seed of ``draw`` on a cell of ``seed``: the seed itself for draw 0."""
    return seed + 1_000_003 * draw
