"""Random channel selection: the floor a criterion must beat to mean anything."""

from __future__ import annotations

import torch
from torch import Tensor

from detectors.base import Detector

from .engine.base import Method, register
from .engine.groups import ChannelScores, dependency_graph, prunable_groups
from .engine.types import PruneContext


def random_scores(sizes: dict[str, int], seed: int) -> dict[str, Tensor]:
    """Uniform scores for each layer of ``sizes`` in its order, from one generator of ``seed``:
    the same draws in the same order for the same model, so a cell's choice is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(size, generator=generator) for name, size in sizes.items()}


@register("random")
class Random(Method):
    """``draw``: which of several random choices on one baseline (0: the cell's seed itself), so a
    suite can show how far random scores alone move a figure (``runners/suites/px_ablation.toml``)."""

    scope = "local"
    defaults = {"draw": 0}

    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        """One draw per prunable group, at its root, in the order the engine scores the groups."""
        names = {m: n for n, m in model.named_modules()}
        groups = prunable_groups(model, dependency_graph(model))
        sizes = {names[g[0].dep.target.module]: len(g[0].idxs) for g in groups}
        scores = random_scores(sizes, score_seed(ctx.seed, int(self.options["draw"])))
        return ChannelScores(model, scores, root_only=True)


def score_seed(seed: int, draw: int) -> int:
    """The generator seed of ``draw`` on a cell of ``seed``: the seed itself for draw 0."""
    return seed + 1_000_003 * draw
