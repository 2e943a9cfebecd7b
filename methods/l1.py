"""L1-norm filter pruning (Li et al., ICLR 2017): the magnitude floor every method must beat."""

from __future__ import annotations

import torch_pruning as tp

from detectors.base import Detector

from .base import Method, register
from .types import PruneContext


@register("l1")
class L1(Method):
    """Sum of |weights| per filter, over the coupled group; same ratio in every layer."""

    scope = "local"

    def importance(self, model: Detector, ctx: PruneContext) -> tp.importance.Importance:
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
