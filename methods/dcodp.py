"""DCODP (Gu et al., Neural Processing Letters 2025): dual coupledness.

Inter-layer coupling: layers that consume the same parent form one group and lose the same
channel indices — torch-pruning's dependency group; the groups found are reported.
Intra-layer coupling: ``CP_c = | ||O||_* - ||M_c ⊙ O||_* |`` on the flattened output O of the
group's parent layer; a small CP means channel c is well expressed by the others (strongly
coupled), so the lowest CP is pruned. Scores of all coupled layers are summed per index (the
ablation ``parent_only`` scores from the parent alone). Local pruning, as in the paper, and the
same Gram-matrix speed-up as CHIP.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import Tensor

from detectors.base import Detector

from .activations import LayerScoreImportance, capture
from .base import Method, PruneContext, register
from .chip import nuclear_norm_drops


def coupling_per_image(feats: Tensor) -> Tensor:
    """``[N, C]``: ``| ||O_n||_* - ||M_c ⊙ O_n||_* |``."""
    return nuclear_norm_drops(feats).abs()


def coupling_scores(feats: Tensor) -> Tensor:
    """``CP_c`` averaged over the images."""
    return coupling_per_image(feats).mean(dim=0)


@register("dcodp")
class DCODP(Method):
    scope = "local"
    defaults = {"parent_only": False}

    def prepare(self, model: Detector, ctx: PruneContext) -> None:
        self.layer_scores = capture(model, ctx.calibration, coupling_per_image, progress=ctx.progress)

    def importance(self, model: Detector, ctx: PruneContext) -> tp.importance.Importance:
        return LayerScoreImportance(model, self.layer_scores, root_only=self.options["parent_only"])
