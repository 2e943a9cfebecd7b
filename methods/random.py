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
    scope = "local"

    def importance(self, model: Detector, ctx: PruneContext) -> tp.importance.Importance:
        return SeededRandomImportance(ctx.seed)
