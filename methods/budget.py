"""Matched budgets (DESIGN.md §6): score once, then bisect how much to remove.

Every method's scores become one ordered list of removal steps. A step removes ``round_to``
channels (the lowest-scored remaining ones) from one dependency group. Local scope orders the
steps by the fraction of the group they leave removed, so every layer loses the same share up to
one step; global scope orders them by score. The achieved reduction only grows along that list,
so bisection over its length finds the prefix closest to the target; steps are small enough that
the closest prefix is within ``tolerance`` (0.5 points) on any realistic network.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

from detectors.base import Detector, layer_widths

from .base import MethodError, PruneContext, PruneReport, Target

ROOT_TYPES = (nn.Conv2d, nn.Linear)


@dataclass
class GroupScores:
    """One dependency group: the root layer, the layers coupled to it, channels by ascending score.

    ``members`` lose output channels at the same indices as the root (the root included);
    ``consumers`` lose the matching input channels.
    """

    root: str
    members: list[str]
    order: Tensor
    sorted_scores: Tensor
    consumers: list[str] = field(default_factory=list)


class _Core(nn.Module):
    """``detector.core`` as a module's forward, for tracers that call ``forward``."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.detector.core(x)


def dependency_graph(model: Detector) -> tp.DependencyGraph:
    """torch-pruning traces with autograd, so grad mode is forced on here."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=model.example_input(), forward_fn=lambda m, x: m.core(x), verbose=False
        )


def prunable_groups(model: Detector, graph: tp.DependencyGraph):
    """The groups every method scores: rooted at a conv/linear whose outputs are not fixed."""
    return graph.get_all_groups(ignored_layers=model.prune_ignored(), root_module_types=ROOT_TYPES)


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
    fixed = {id(m) for m in model.prune_ignored()}
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in fixed)


def score_groups(model: Detector, importance: tp.importance.Importance) -> list[GroupScores]:
    """Score every prunable group once, on the unpruned model."""
    was_training = model.training
    model.eval()
    graph = dependency_graph(model)
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in prunable_groups(model, graph):
        with torch.no_grad():
            scores = importance(group)
        if scores is None:
            continue
        scores = scores.detach().double().cpu()
        root = names[group[0].dep.target.module]
        if not torch.isfinite(scores).all():
            raise MethodError(f"importance of group '{root}' is not finite")
        sorted_scores, order = torch.sort(scores, stable=True)
        layers = [
            (dep, names[dep.target.module]) for dep, _ in group if isinstance(dep.target.module, ROOT_TYPES)
        ]
        members = [n for dep, n in layers if graph.is_out_channel_pruning_fn(dep.handler)]
        consumers = [n for dep, n in layers if graph.is_in_channel_pruning_fn(dep.handler)]
        groups.append(GroupScores(root, members, order, sorted_scores, consumers))
    model.train(was_training)
    return groups


def removal_steps(
    groups: list[GroupScores], scope: str, round_to: int = 8, max_layer_ratio: float = 0.9
) -> list[tuple[int, int]]:
    """The ordered steps ``(group index, channels removed from it after this step)``."""
    if scope not in ("local", "global"):
        raise MethodError(f"scope must be 'local' or 'global', not '{scope}'")
    keyed = []
    for gi, g in enumerate(groups):
        size = len(g.order)
        min_keep = max(1, math.ceil(size * (1 - max_layer_ratio)))
        keep = size
        while True:
            keep = (keep - 1) // round_to * round_to  # next multiple of round_to below
            if keep < min_keep:
                break
            removed = size - keep
            key = removed / size if scope == "local" else float(g.sorted_scores[removed - 1])
            keyed.append((key, gi, removed))
    keyed.sort()
    return [(gi, removed) for _, gi, removed in keyed]


def apply_removal(model: Detector, groups: list[GroupScores], counts: dict[int, int]) -> None:
    """Remove the ``counts[g]`` lowest-scored channels of each group, in place."""
    graph = dependency_graph(model)
    modules = dict(model.named_modules())
    for gi, n in sorted(counts.items()):
        if n <= 0:
            continue
        g = groups[gi]
        layer = modules[g.root]
        pruner = graph.get_pruner_of_module(layer)
        graph.get_pruning_group(layer, pruner.prune_out_channels, g.order[:n].tolist()).prune()


def _counts(steps: list[tuple[int, int]], prefix: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for gi, removed in steps[:prefix]:
        counts[gi] = max(counts.get(gi, 0), removed)
    return counts


def measure_size(model: Detector, kind: str) -> float:
    """The model's size in a target's unit: parameters, GMACs or prunable output channels."""
    if kind == "params":
        return float(count_params(model))
    if kind == "flops":
        return count_gmacs(model)
    return float(count_channels(model))


def _search(reduction: Callable[[int], float], lo: int, hi: int, target: float, good: float) -> int:
    """The prefix whose reduction is closest to ``target``, for a non-decreasing ``reduction``.

    Interpolation between the bracket's ends (the reduction is nearly linear in the prefix
    length), falling back to bisection when a step shrinks the bracket by less than half;
    stops early at a prefix within ``good`` of the target. Keeps reduction(lo) < target <= reduction(hi).
    """
    if reduction(hi) < target:
        return hi
    interpolate = True
    while hi - lo > 1:
        f_lo, f_hi = reduction(lo), reduction(hi)
        if interpolate and f_hi > f_lo:
            guess = lo + round((target - f_lo) / (f_hi - f_lo) * (hi - lo))
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        value = reduction(guess)
        if abs(value - target) <= good:
            return guess
        width = hi - lo
        lo, hi = (lo, guess) if value >= target else (guess, hi)
        interpolate = (hi - lo) <= width / 2
    return min((lo, hi), key=lambda p: abs(reduction(p) - target))


def prune_to_budget(
    model: Detector, groups: list[GroupScores], target: Target, ctx: PruneContext, scope: str
) -> PruneReport:
    """Bisect the number of steps until the achieved reduction is closest to the target."""
    steps = removal_steps(groups, scope, ctx.round_to, ctx.max_layer_ratio)
    before = measure_size(model, target.kind)
    cache: dict[int, float] = {}

    def reduction(prefix: int) -> float:
        if prefix not in cache:
            probe = copy.deepcopy(model)
            apply_removal(probe, groups, _counts(steps, prefix))
            cache[prefix] = 1.0 - measure_size(probe, target.kind) / before
        return cache[prefix]

    cache[0] = 0.0
    lo, hi = 0, len(steps)
    if reduction(hi) < target.rate - ctx.tolerance:
        raise MethodError(
            f"{target} is out of reach: removing all allowed channels (max_layer_ratio="
            f"{ctx.max_layer_ratio}) saves {reduction(hi):.1%}"
        )
    best = _search(reduction, lo, hi, target.rate, ctx.tolerance / 2)
    if abs(reduction(best) - target.rate) > ctx.tolerance:
        raise MethodError(
            f"{target}: the closest achievable reduction is {reduction(best):.2%}; lower round_to"
        )

    widths_before = layer_widths(model)
    params_before, gmacs_before, channels_before = (
        count_params(model),
        count_gmacs(model),
        count_channels(model),
    )
    counts = _counts(steps, best)
    apply_removal(model, groups, counts)
    params_after, gmacs_after, channels_after = count_params(model), count_gmacs(model), count_channels(model)
    widths_after = layer_widths(model)
    layers = {
        name: [w["out_channels"], widths_after[name]["out_channels"]]
        for name, w in widths_before.items()
        if "out_channels" in w and w["out_channels"] != widths_after[name]["out_channels"]
    }
    return PruneReport(
        method="",
        target=str(target),
        achieved={
            "params": 1 - params_after / params_before,
            "flops": 1 - gmacs_after / gmacs_before,
            "channels": 1 - channels_after / channels_before,
        },
        params_before=params_before,
        params_after=params_after,
        gmacs_before=gmacs_before,
        gmacs_after=gmacs_after,
        layers=layers,
        groups={g.root: {"members": g.members, "consumers": g.consumers} for g in groups},
        probes=len(cache),
    )
