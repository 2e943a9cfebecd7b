"""Dependency groups and channel removal: what every method's scores are attached to.

torch-pruning builds the dependency graph of ``core`` and groups the layers that must lose the
same channel indices (residual additions, concatenations, FPN laterals, norms). A group is rooted
at a prunable conv/linear; its *members* lose output channels, its *consumers* the matching input
channels. Methods give per-layer channel scores; ``ChannelScores`` turns them into one score per
channel of a group the same way for every method, and ``apply_removal`` removes the lowest ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from detectors.base import Detector

from .types import MethodError

ROOT_TYPES = (nn.Conv2d, nn.Linear)
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Hardswish,
)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def dependency_graph(model: Detector) -> tp.DependencyGraph:
    """torch-pruning traces with autograd, so grad mode is forced on here."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=model.example_input(), forward_fn=lambda m, x: m.core(x), verbose=False
        )


def prunable_groups(model: Detector, graph: tp.DependencyGraph) -> list[tp.Group]:
    """The groups every method scores: rooted at a conv/linear whose outputs are not fixed."""
    return graph.get_all_groups(ignored_layers=model.prune_ignored(), root_module_types=ROOT_TYPES)


def fixed_layers(model: Detector) -> set[int]:
    """Ids of the layers whose output channels the task fixes (predictors)."""
    return {id(m) for m in model.prune_ignored()}


def run_core_once(model: Detector, handles: list) -> None:
    """One eval-mode ``core`` pass on the example input, then the hooks go and the mode returns."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.core(model.example_input())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@dataclass
class Group:
    """A prunable dependency group in the model's current state.

    ``members``: conv/linear layers losing output channels (reported); ``producers``: every named
    layer losing output channels (norms too: costs); ``consumers``: the conv/linear layers losing
    input channels, with ``idxs`` (their channels) and ``root_idxs`` (the group's channels).
    """

    root: str
    size: int
    members: list[str]
    producers: list[tuple[str, nn.Module]]
    consumers: list[tuple[str, nn.Module, list[int], list[int]]]


def describe_groups(model: Detector, graph: tp.DependencyGraph | None = None) -> list[Group]:
    graph = graph if graph is not None else dependency_graph(model)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in prunable_groups(model, graph):
        members, producers, consumers, seen = [], [], [], set()
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            name = names.get(module)
            if name is None or (name, handler) in seen:
                continue
            seen.add((name, handler))
            if graph.is_out_channel_pruning_fn(handler):
                producers.append((name, module))
                if isinstance(module, ROOT_TYPES):
                    members.append(name)
            elif graph.is_in_channel_pruning_fn(handler) and isinstance(module, ROOT_TYPES):
                consumers.append((name, module, list(item.idxs), list(item.root_idxs)))
        out.append(
            Group(names[group[0].dep.target.module], len(group[0].idxs), members, producers, consumers)
        )
    return out


class ChannelScores(tp.importance.Importance):
    """Per-layer channel scores (by layer name) -> one score per channel of a dependency group.

    The one group reduction of every method (torch-pruning's ``Importance.__call__(group)``): the
    scores of the group's layers are summed at the group's indices, each layer once, in the
    group's order. ``layer_scores`` score a layer's output channels and count where the group
    prunes them; ``input_scores`` (L1's consumer weights, ThiNet's next-layer reconstruction)
    score input channels and count where the group prunes those. ``root_only``: the root layer
    alone, for single-layer criteria (and, of ``input_scores``, the group's first consumer: the
    root's next layer). A
    group none of whose layers has a score returns ``None`` (never pruned) and is listed in
    ``unscored``. ``normalizer="mean"`` divides a group's scores by their mean (torch-pruning's
    default group normaliser), so that a global ranking compares each channel with its own
    group's average rather than quantities whose scale differs from layer to layer. ``dtype``: the
    precision of the sum (float64; L1 sums in float32, as torch-pruning's magnitude importance it
    reproduces bit for bit).
    """

    NORMALIZERS = (None, "mean")

    def __init__(
        self,
        model: nn.Module,
        layer_scores: dict[str, Tensor],
        root_only: bool = False,
        normalizer: str | None = None,
        input_scores: dict[str, Tensor] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if normalizer not in self.NORMALIZERS:
            raise MethodError(f"unknown score normalizer '{normalizer}' (expected one of 'mean', none)")
        self.layer_scores = layer_scores
        self.input_scores = input_scores or {}
        self.names = {m: n for n, m in model.named_modules()}
        self.root_only = root_only
        self.normalizer = normalizer
        self.dtype = dtype
        self.unscored: list[str] = []

    @torch.no_grad()
    def __call__(self, group: tp.Group, **kwargs: Any) -> Tensor | None:
        graph = group._DG
        total = torch.zeros(len(group[0].idxs), dtype=self.dtype)
        found, seen = False, set()
        for i, item in enumerate(group):
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                kind, scored = "out", self.layer_scores
            elif graph.is_in_channel_pruning_fn(item.dep.handler):
                kind, scored = "in", self.input_scores
            else:
                continue
            if self.root_only and (
                i > 0 and kind == "out" or kind == "in" and any(k == "in" for _, k in seen)
            ):
                continue  # the root's own scores, and its first scored consumer's
            name = self.names.get(item.dep.target.module)
            if name not in scored or (name, kind) in seen or any(r is None for r in item.root_idxs):
                continue
            seen.add((name, kind))
            scores = scored[name].detach().to("cpu", self.dtype)
            total.index_add_(0, torch.as_tensor(item.root_idxs), scores[torch.as_tensor(item.idxs)])
            found = True
        if not found:
            self.unscored.append(self.names.get(group[0].dep.target.module, "?"))
            return None
        return normalize_scores(total, self.normalizer)


def normalize_scores(scores: Tensor, normalizer: str | None) -> Tensor:
    """``scores / mean(scores)`` for ``"mean"`` (all-zero scores stay zero); ``None``: as they are."""
    if normalizer is None:
        return scores
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


@dataclass
class GroupScores:
    """One scored group: its root, its coupled layers, its channels by ascending score.

    ``unit``: the channels that go together (a GroupNorm's group; 1 without one): ``order``
    then lists whole norm groups, each at its mean score, and removals are multiples of it.
    """

    root: str
    members: list[str]
    order: Tensor
    sorted_scores: Tensor
    consumers: list[str] = field(default_factory=list)
    unit: int = 1


def norm_groups(group: tp.Group) -> tuple[int, Tensor | None]:
    """``(unit, block)``: the GroupNorm group of each of the dependency group's channels.

    A GroupNorm normalises each group of ``num_channels / num_groups`` channels by that group's
    statistics. Removing a whole group leaves every other group's normalisation exactly as it
    was; removing channels here and there would regroup the rest (torch-pruning keeps
    ``num_groups`` and narrows the groups). So a group with GroupNorms is pruned in whole norm
    groups, and every GroupNorm in it must group the channels the same way.
    """
    size = len(group[0].idxs)
    block: Tensor | None = None
    unit = 1
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, nn.GroupNorm) or any(r is None for r in item.root_idxs):
            continue
        width = module.num_channels // module.num_groups
        mine = torch.full((size,), -1, dtype=torch.int64)
        mine[torch.as_tensor(item.root_idxs)] = torch.as_tensor(item.idxs) // width
        if block is not None and not (unit == width and torch.equal(mine, block)):
            raise MethodError(
                f"GroupNorms coupled with different groupings ({unit} and {width} channels a group)"
            )
        if (mine < 0).any():
            raise MethodError("a GroupNorm covers only part of its dependency group's channels")
        block, unit = mine, width
    return unit, block


def _by_norm_group(scores: Tensor, block: Tensor, unit: int) -> tuple[Tensor, Tensor]:
    """``(sorted_scores, order)`` listing whole norm groups by their mean channel score."""
    count = int(block.max()) + 1
    means = torch.zeros(count, dtype=scores.dtype).index_add_(0, block, scores) / unit
    ranked = torch.sort(means, stable=True).indices
    order = torch.cat([torch.nonzero(block == b).flatten() for b in ranked.tolist()])
    return means[block[order]], order


def score_groups(model: Detector, importance: tp.importance.Importance) -> list[GroupScores]:
    """Score every prunable group of the model as it is now (eval mode)."""
    was_training = model.training
    model.eval()
    graph = dependency_graph(model)
    described = {g.root: g for g in describe_groups(model, graph)}
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
        unit, block = norm_groups(group)
        if block is None:
            sorted_scores, order = torch.sort(scores, stable=True)
        else:
            sorted_scores, order = _by_norm_group(scores, block, unit)
        info = described[root]
        consumers = [c[0] for c in info.consumers]
        groups.append(GroupScores(root, info.members, order, sorted_scores, consumers, unit))
    model.train(was_training)
    return groups


def apply_removal(
    model: Detector, groups: list[GroupScores], counts: dict[str, int]
) -> dict[str, dict[str, list[int]]]:
    """Remove the ``counts[root]`` lowest-scored channels of each group, in place, in group order.
    Returns, for every conv that lost channels, the indices (as they were before this removal) of
    the input and output channels it kept: ``{name: {"in": [...], "out": [...]}}``, what a method
    that refits the layers it pruned (ThiNet) needs."""
    graph = dependency_graph(model)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    norms = {m: m.num_channels // m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    kept: dict[str, dict[str, list[int]]] = {}
    for g in groups:
        n = counts.get(g.root, 0)
        if n <= 0:
            continue
        if n % g.unit:
            raise MethodError(
                f"'{g.root}': {n} channels is not a whole number of its {g.unit}-channel norm groups"
            )
        layer = modules[g.root]
        pruner = graph.get_pruner_of_module(layer)
        group = graph.get_pruning_group(layer, pruner.prune_out_channels, g.order[:n].tolist())
        for item in group:  # indices in the conv's current numbering: map them back to the original
            conv = item.dep.target.module
            if not isinstance(conv, nn.Conv2d) or conv not in names:
                continue
            side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            if side == "in" and not graph.is_in_channel_pruning_fn(item.dep.handler):
                continue
            record = kept.setdefault(
                names[conv], {"in": list(range(conv.in_channels)), "out": list(range(conv.out_channels))}
            )
            gone = set(item.idxs)
            record[side] = [c for k, c in enumerate(record[side]) if k not in gone]
        group.prune()
    for norm, width in norms.items():  # whole groups went: the rest keep their width
        norm.num_groups = norm.num_channels // width
    return kept
