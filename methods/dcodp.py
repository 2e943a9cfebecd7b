"""DCODP (Gu et al., Neural Processing Letters 2025): dual coupledness.

Inter-layer coupling: layers that consume the same parent form one group and lose the same
channel indices — torch-pruning's dependency group; the groups found are reported.
Intra-layer coupling: ``CP_c = | ||O||_* - ||M_c ⊙ O||_* |`` on the flattened output O of the
group's parent layer; a small CP means channel c is well expressed by the others (strongly
coupled), so the lowest CP is pruned. Scores of all coupled layers are summed per index
(``coupling = "sum"``; the ablation ``coupling = "root"`` scores from the parent alone, the
switch every per-layer criterion has). Local pruning, as in the paper, and the same Gram-matrix
speed-up as CHIP.
"""

from __future__ import annotations

from torch import Tensor

from .chip import nuclear_norm_drops
from .engine.activations import FeatureMapCriterion
from .engine.base import register


def coupling_per_image(feats: Tensor) -> Tensor:
    """``[N, C]``: ``| ||O_n||_* - ||M_c ⊙ O_n||_* |``."""
    return nuclear_norm_drops(feats).abs()


def coupling_scores(feats: Tensor) -> Tensor:
    """``CP_c`` averaged over the images."""
    return coupling_per_image(feats).mean(dim=0)


@register("dcodp")
class DCODP(FeatureMapCriterion):
    defaults = {"coupling": "sum"}  # inter-layer coupling: the paper's; "root" is its ablation

    reducer = staticmethod(coupling_per_image)
