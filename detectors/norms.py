"""BatchNorm for a head shared across pyramid levels: one affine, running statistics per level.

Why: FCOS, ATSS and GFL run one tower over P3..P7. In training a BatchNorm there normalises each
level by that level's own batch statistics, but a plain ``nn.BatchNorm2d`` keeps a single running
mean and variance, an average over levels that differ a lot (on tiny ATSS at 128 px, P7 is one
location per image): measured on a 32-epoch tiny ATSS, the first classification-tower norm sees
variance 9.8 at P3, where every positive lies, against a running variance of 2.7. Evaluation then
normalises P3 by the wrong statistics, and what is decoded is not what was trained. detectron2's
answer (``CycleBatchNormList``, "domain-specific BN" in its RetinaNet head) keeps statistics per
level and shares the affine; so does this, with the same parameters as one BatchNorm (published
parameter counts are unchanged) and the running buffers stored ``[C, levels]`` so that
torch-pruning's BatchNorm pruner, which indexes the buffers' first dimension, prunes them as it
prunes any BatchNorm.

A tower takes its level from the order of its calls within one pass of the head:
``track_levels(head)`` resets the count when the head starts and advances it per tower call
(the heads call each tower once per level, in order).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DetectorError


class LevelBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics are kept per pyramid level (see the module doc)."""

    def __init__(self, num_features: int, levels: int, **options: Any) -> None:
        super().__init__(num_features, **options)
        if not self.track_running_stats or self.momentum is None:
            raise ValueError("LevelBatchNorm2d needs running statistics with a fixed momentum")
        self.levels = levels
        self.level = 0  # set by the tower's pre-hook before each call
        self.running_mean = torch.zeros(num_features, levels)
        self.running_var = torch.ones(num_features, levels)

    def statistics(self) -> tuple[Tensor, Tensor]:
        """The running mean and variance of the current level, ``[C]`` each."""
        if not 0 <= self.level < self.levels:
            raise RuntimeError(f"level {self.level} of a norm kept for {self.levels} levels")
        return self.running_mean[:, self.level], self.running_var[:, self.level]

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        column_mean, column_var = self.statistics()
        mean, var = column_mean.contiguous(), column_var.contiguous()  # updated in place when training
        out = F.batch_norm(x, mean, var, self.weight, self.bias, self.training, self.momentum, self.eps)
        if self.training:
            with torch.no_grad():
                column_mean.copy_(mean)
                column_var.copy_(var)
        return out

    def _load_from_state_dict(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        mean = state.get(prefix + "running_mean")
        if mean is not None and mean.dim() != 2:  # saved when the head kept one set for all levels
            raise DetectorError(
                f"the checkpoint's {prefix}running_mean is {tuple(mean.shape)}, from before the head "
                "kept statistics per level; train or prune that model again"
            )
        super()._load_from_state_dict(state, prefix, *args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels}"


def _start_pass(head: nn.Module, args: Any) -> None:
    for module in head.modules():
        if hasattr(module, "next_level"):
            module.next_level = 0


def _enter_level(tower: nn.Module, args: Any) -> None:
    for module in tower.modules():
        if isinstance(module, LevelBatchNorm2d):
            module.level = tower.next_level
    tower.next_level += 1


def track_levels(head: nn.Module, towers: list[nn.Module]) -> None:
    """Have each of ``towers`` (called once per level by ``head``) use its level's statistics.

    The hooks are module-level functions of their module argument, so deep copies (PX's path
    copies, a pruned model's original) keep working on their own modules.
    """
    for tower in towers:
        tower.next_level = 0
        tower.register_forward_pre_hook(_enter_level)
    head.register_forward_pre_hook(_start_pass)


class FixedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm whose statistics and affine never change: torchvision's ``FrozenBatchNorm2d``
    as a ``BatchNorm2d``, so torch-pruning prunes it (it has no pruner for the frozen one).

    Pretrained torchvision detectors freeze their backbone's norms (batches of two images give no
    usable statistics); this keeps that while training, in either mode, and keeps the affine out
    of the optimiser's reach (detached, so no gradient reaches it even after a reload)."""

    @classmethod
    def like(cls, norm: nn.Module) -> FixedBatchNorm2d:
        """The same normalisation as ``norm`` (a ``BatchNorm2d`` or a ``FrozenBatchNorm2d``)."""
        fixed = cls(norm.weight.shape[0], eps=norm.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(fixed, name).copy_(getattr(norm, name))
        fixed.weight.requires_grad_(False)
        fixed.bias.requires_grad_(False)
        return fixed.to(norm.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight.detach(),
            self.bias.detach(),
            False,
            0.0,
            self.eps,
        )
