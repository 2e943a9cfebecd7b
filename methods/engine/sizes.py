"""Sizes and costs (DESIGN.md §6): parameters, GMACs, prunable filters, what a channel costs,
and the one report of what a pruning achieved."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

from detectors.base import Detector, layer_widths

from .groups import NORMS, ROOT_TYPES, Group, fixed_layers, run_core_once
from .types import PruneReport, Target


class _Core(nn.Module):
    """``detector.core`` as a module's forward, for tracers that call ``forward``."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.detector.core(x)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: Detector, shape: tuple[int, int] | None = None) -> float:
    """fvcore's count (one multiply-add = one) of ``core`` at batch 1, in billions.

    At the model's square ``input_size`` unless ``shape`` gives ``(height, width)``: papers state
    FLOPs at non-square inputs too (MMDetection's 1280 x 800).
    """
    was_training = model.training
    model.eval()
    x = model.example_input()
    if shape is not None:
        x = x.new_zeros(1, 3, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(_Core(model), x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = analysis.total()
    model.train(was_training)
    return total / 1e9


def count_channels(model: Detector) -> int:
    """Output channels of the prunable convolutions (DCODP's ratio of filters)."""
    fixed = fixed_layers(model)
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in fixed)


def measure_size(model: Detector, kind: str) -> float:
    """The model's size in a target's unit: parameters, GMACs or prunable output channels."""
    if kind == "params":
        return float(count_params(model))
    if kind == "flops":
        return count_gmacs(model)
    return float(count_channels(model))


def output_positions(model: Detector) -> dict[str, int]:
    """Per conv/linear/norm layer: output elements per channel over one ``core`` pass at batch 1
    (a layer called several times, like a shared head, sums its calls)."""
    positions: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            positions[name] = positions.get(name, 0) + output.numel() // max(1, channels)

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (*ROOT_TYPES, *NORMS))
    ]
    run_core_once(model, handles)
    return positions


def channel_costs(groups: Sequence[Group], positions: dict[str, int], fixed: set[int]) -> dict[str, Tensor]:
    """What removing one channel of each group saves now, per kind (fvcore's conventions).

    ``flops``: multiply-adds of the producers' output channel (batch-norm: 2 per element, as fvcore
    counts it in eval mode) and of the consumers' input channel; ``params``: the weights and biases
    of both; ``memory``: the producing convolutions' output elements; ``channels``: the prunable
    convolutions among the producers. Exact up to the cross terms of neighbouring groups.
    """
    kinds = ("flops", "params", "memory", "channels")
    out = {k: torch.zeros(len(groups), dtype=torch.float64) for k in kinds}
    for gi, g in enumerate(groups):
        for name, module in g.producers:
            pos = positions.get(name, 0)
            own = [p for p in module.parameters(recurse=False) if p.dim() >= 1]
            out["params"][gi] += sum(p.numel() / p.shape[0] for p in own)
            if isinstance(module, ROOT_TYPES):
                out["flops"][gi] += pos * module.weight[0].numel()
                out["memory"][gi] += pos
                if isinstance(module, nn.Conv2d) and id(module) not in fixed:
                    out["channels"][gi] += 1
            elif isinstance(module, NORMS):
                out["flops"][gi] += pos * (2 if getattr(module, "weight", None) is not None else 1)
        for name, module, _, _ in g.consumers:
            fan = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            out["params"][gi] += module.weight.numel() / fan
            out["flops"][gi] += positions.get(name, 0) * module.weight.numel() / fan
    out["flops"] /= 1e9  # GMACs, like count_gmacs
    return out


@dataclass
class Snapshot:
    """A model's sizes and layer widths, for the report to compare against."""

    params: int
    gmacs: float
    channels: int
    widths: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: Detector) -> Snapshot:
        return cls(count_params(model), count_gmacs(model), count_channels(model), layer_widths(model))

    def size(self, kind: str) -> float:
        return float({"params": self.params, "flops": self.gmacs, "channels": self.channels}[kind])


def build_report(
    model: Detector, before: Snapshot, target: Target, groups: dict[str, dict[str, list[str]]]
) -> PruneReport:
    """Achieved reductions and every narrowed layer's ``[before, after]`` output width."""
    after = Snapshot.of(model)
    layers = {
        name: [w["out_channels"], after.widths[name]["out_channels"]]
        for name, w in before.widths.items()
        if "out_channels" in w and w["out_channels"] != after.widths[name]["out_channels"]
    }
    return PruneReport(
        method="",
        target=str(target),
        achieved={
            "params": 1 - after.params / before.params,
            "flops": 1 - after.gmacs / before.gmacs,
            "channels": 1 - after.channels / before.channels,
        },
        params_before=before.params,
        params_after=after.params,
        gmacs_before=before.gmacs,
        gmacs_after=after.gmacs,
        layers=layers,
        groups=groups,
    )
