"""HRank (Lin et al., CVPR 2020): a filter whose feature maps have low rank carries little.

``score_c = mean_n rank(F_n[c])`` over post-activation maps of calibration images in eval mode;
local scope (the same share removed from every layer). HRank scores one layer at a time, so a
dependency group is scored by its root layer's maps alone; summing over coupled layers is
DCODP's contribution, not HRank's. Known weakness, shown not hidden: after
SiLU or LeakyReLU almost every map is full rank, so scores tie.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engine.activations import FeatureMapCriterion
from .engine.base import register


def hrank_ranks(feats: Tensor) -> Tensor:
    """Per-image, per-channel matrix rank ``[N, C]`` of maps ``[N, C, H, W]``: one batched call."""
    return torch.linalg.matrix_rank(feats.float()).float()


def hrank_scores(feats: Tensor) -> Tensor:
    """``score_c = mean_n rank(F_n[c])``."""
    return hrank_ranks(feats).mean(dim=0)


@register("hrank")
class HRank(FeatureMapCriterion):
    reducer = staticmethod(hrank_ranks)  # per-image scores; the capture averages them
