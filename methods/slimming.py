"""Network Slimming (Liu et al., ICCV 2017): a channel matters as much as the scale γ of the
normalisation that follows its convolution, and training with an L1 penalty on every γ drives
the scales of unneeded channels towards zero, so a single global threshold finds them.

* **Scores**: ``|γ_c|`` of the norm right after each prunable conv (BatchNorm in the paper; here
  also torchvision's FrozenBatchNorm2d and GroupNorm, which scale each channel the same way),
  found by tracing as HRank's hook points are (``engine.activations.observation_points``).
* **Coupling** (``coupling``): ``"root"``, the paper's per-layer reading, scores a dependency group
  by its root conv's norm; a group whose root conv has no norm after it (an FPN lateral, a
  predictor's input layer) is then not pruned, listed as unscored in the row's report. ``"sum"``
  (DCODP's inter-layer coupling) adds the ``|γ|`` of every coupled conv's norm at each index, so
  such a group is scored by the norms of the layers coupled to it.
* **Ranking**: global, one ranking of all channels, as the paper prunes "a certain percentile
  among all channels" (the engine's ``max_layer_ratio`` keeps every layer alive).
* **Regime** (``regime = "slimming"``): the baseline trains with ``λ Σ|γ|`` over every norm's
  scale added to the detection loss (``sparsity`` = λ, the paper's 1e-4 by default; its
  subgradient is ``λ sign(γ)``, what the official code adds to γ's gradient), so slimming's cells
  start from their own baseline (``base (slimming)`` rows); ``sparsity = 0`` scores the plain
  baseline. Fine-tuning runs without the penalty, as the paper's does (``finetune_loss``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detectors.base import Detector

from .engine.activations import observation_points
from .engine.base import CoupledCriterion, register
from .engine.groups import ChannelScores
from .engine.types import Batch, Losses, Maps, MethodError, PruneContext

NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm)


def slimming_scores(gamma: Tensor) -> Tensor:
    """A channel's score: ``|γ_c|``, the magnitude of its norm's scale."""
    return gamma.detach().abs()


def sparsity_penalty(gammas: Iterable[Tensor], sparsity: float) -> Tensor:
    """``λ Σ |γ|`` over every scale given (its gradient: ``λ sign(γ)``)."""
    return sparsity * sum(gamma.abs().sum() for gamma in gammas)


def norm_scales(model: nn.Module) -> list[Tensor]:
    """The trainable per-channel scales the penalty acts on (frozen norms have none)."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None and m.weight.requires_grad
    ]


@register("slimming")
class Slimming(CoupledCriterion):
    scope = "global"
    finetune_loss = False
    defaults = {"coupling": "root", "sparsity": 1e-4}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        sparsity = self.options["sparsity"]
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or sparsity < 0:
            raise MethodError(f"slimming: sparsity must be a number >= 0, not {sparsity!r}")
        # without the sparsity training, slimming scores the plain baseline that others share
        self.regime = "slimming" if sparsity > 0 else "plain"  # type: ignore[misc]

    def regime_options(self) -> dict[str, Any]:
        return {"sparsity": self.options["sparsity"]} if self.regime != "plain" else {}

    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        scores = {
            name: slimming_scores(norm.weight)
            for name, (norm, _) in observation_points(model, NORMS).items()
            if isinstance(norm, NORMS) and getattr(norm, "weight", None) is not None
        }
        return ChannelScores(model, scores, root_only=self.root_only)

    def train_loss(
        self, model: Detector, ctx: PruneContext, batch: Batch, losses: Losses, neck: Maps | None = None
    ) -> Tensor | None:
        if self.regime == "plain":
            return None
        scales = norm_scales(model)
        return sparsity_penalty(scales, self.options["sparsity"]) if scales else torch.zeros(())
