"""L1-norm filter pruning (Li et al., ICLR 2017): the magnitude floor every method must beat.

A channel's score is the sum of |weights| that go with it over its coupled group: the producing
convolutions' filters, the consumers' input slices and the norms' scales, as torch-pruning's
``GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)`` scored it before L1
went through the shared reduction (``ChannelScores``); ``tests/test_l1.py`` holds them equal.
Like it, L1 passes over depthwise convolutions (torch-pruning gives them their own pruner, which
its magnitude importance did not recognise): they are scored by the layers coupled with them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detectors.base import Detector

from .engine.base import Method, register
from .engine.groups import ChannelScores
from .engine.types import PruneContext

CONVS = (nn.modules.conv._ConvNd, nn.Linear)
SCALES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def output_l1(weight: Tensor, transposed: bool = False) -> Tensor:
    """``Σ|w|`` per output channel ``[C_out]`` of a conv/linear weight (a transposed conv stores
    its output channels second)."""
    w = weight.transpose(1, 0) if transposed else weight
    return w.flatten(1).abs().sum(1)


def input_l1(weight: Tensor, transposed: bool = False, groups: int = 1, in_channels: int = 0) -> Tensor:
    """``Σ|w|`` per input channel ``[C_in]``; a grouped conv's per-group slice repeats per group."""
    w = weight if transposed else weight.transpose(0, 1)
    scores = w.flatten(1).abs().sum(1)
    if groups not in (1, in_channels):
        scores = scores.repeat(groups)
    return scores


def is_depthwise(module: nn.Module) -> bool:
    """torch-pruning's test for a depthwise convolution (``ops.module2type``)."""
    out = getattr(module, "out_channels", 0)
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == out and out > 1


@torch.no_grad()
def l1_layer_scores(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(outputs, inputs)``: every layer's per-channel ``Σ|w|`` by name (norms: ``|γ|``)."""
    names = {m: n for n, m in model.named_modules()}  # the name ChannelScores looks a layer up by
    outputs: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}
    for module, name in names.items():
        if isinstance(module, CONVS) and not is_depthwise(module):
            transposed = bool(getattr(module, "transposed", False))
            outputs[name] = output_l1(module.weight.data, transposed)
            groups, in_channels = getattr(module, "groups", 1), getattr(module, "in_channels", 0)
            inputs[name] = input_l1(module.weight.data, transposed, groups, in_channels)
        elif isinstance(module, SCALES) and getattr(module, "weight", None) is not None:
            outputs[name] = module.weight.data.abs()
    return outputs, inputs


@register("l1")
class L1(Method):
    """Sum of |weights| per filter, over the coupled group; same ratio in every layer."""

    scope = "local"

    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        outputs, inputs = l1_layer_scores(model)
        return ChannelScores(model, outputs, input_scores=inputs, dtype=torch.float32)
