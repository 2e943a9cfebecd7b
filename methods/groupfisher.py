"""Group Fisher pruning (Liu et al., ICML 2021), DESIGN.md §4 "GroupFisher".

Every prunable layer's input channels carry a virtual mask ``m = 1``. For one sample n, the
gradient of the detection loss with respect to that mask is

    g_{n,c} = sum_{h,w} A_n[c,h,w] * dL/dA_n[c,h,w]

(``A`` the layer's input). Layers that consume the same channels (torch-pruning's dependency
group: its in-channel-pruned convolutions) share one mask, so their g are summed *before*
squaring: ``s_c = sum_n (sum_{x in group} g^x_{n,c})^2``, accumulated over ``d`` training
iterations and divided by what removing channel c saves in the *current* network (GMACs by
default, activation memory with ``normalize="memory"``). The lowest normalised channel in the
whole network goes (``channels_per_step`` of them), the accumulators restart, and training
goes on until the budget is met.

How the harness realises it:

* The mask is implicit: a forward pre-hook on each consumer layer hands the layer a fresh view of
  its input and puts a *tensor* hook on that view, so the gradient seen is the one flowing back
  through this layer (and this call: FCOS runs its head convolutions once per pyramid level, the
  calls add up as they would for one shared mask). No module backward hooks. The saved activation
  is a view of the input: an in-place change of it after the layer ran would already make
  autograd fail (the layer saved it for its weight gradient), so it is the one the gradient
  belongs to.
* Channels are removed for real (torch-pruning, one dependency graph kept for the whole run), so
  "the current pruned state" is the model itself; the SGD optimizer is rebuilt after each removal
  (its momentum restarts, which the mask-based original does not need).
* Budget knobs shared by every method: a removal unit is ``round_to`` channels of one group (the
  first unit of a group brings it down to a multiple of ``round_to``), ranked by the mean
  normalised score of its channels (Fisher's loss estimate and the cost are both additive); no
  group goes below ``1 - max_layer_ratio`` of its *original* width; every candidate step is
  first applied to a copy, near the end a unit that alone would overshoot is passed over for a
  smaller one, and the last step is cut short (a search over its units, on copies) so the
  achieved reduction lands within ``ctx.tolerance`` of the target and never beyond it.
* Costs (``channel_costs``) follow fvcore's counting at the model's input size: a channel's
  GMACs are its producers' output channel plus its consumers' input channel (batch norm 2 per
  element); its activation memory is the producing convolutions' output elements, as in the
  official code.
* Training between removals: ``model.loss`` on shuffled ``ctx.train_set`` batches of
  ``ctx.batch_size`` (the calibration batches when there is no training set), SGD with ``lr``,
  ``momentum``, ``weight_decay`` and gradient clipping as in ``runners.train``; train mode in the
  loop, eval mode for graphs, probes and at the end.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from detectors.base import Detector, layer_widths

from .activations import run_core_once
from .base import Method, MethodError, PruneContext, PruneReport, Target, register
from .budget import (
    ROOT_TYPES,
    count_channels,
    count_gmacs,
    count_params,
    dependency_graph,
    measure_size,
    prunable_groups,
)

NORMALIZERS = ("flops", "memory")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


# -- the math, on tensors ------------------------------------------------------------------------


def fisher_per_sample(activations: Tensor, grads: Tensor, channel_dim: int = 1) -> Tensor:
    """``g[n, c] = sum over every other position of A[n, c, ...] * dL/dA[n, c, ...]``.

    ``activations`` and ``grads`` share one shape ``[N, ...]`` with the channels along
    ``channel_dim`` (1 for convolutions, -1 for linear layers); returns ``[N, C]``.
    """
    if activations.shape != grads.shape:
        raise ValueError(f"activations {tuple(activations.shape)} and grads {tuple(grads.shape)} differ")
    prod = (activations * grads).movedim(channel_dim, 1)
    return prod.reshape(prod.shape[0], prod.shape[1], -1).sum(-1)


def group_fisher(contributions: Sequence[tuple[Tensor, Sequence[int], Sequence[int]]], size: int) -> Tensor:
    """One batch's ``s_c = sum_n (sum_x g^x_{n,c})^2`` for a group of ``size`` channels.

    ``contributions``: per coupled layer x, ``(g^x [N, C_x], idxs, root_idxs)``: the layer's input
    channel ``idxs[j]`` is the group's channel ``root_idxs[j]``. The layers' g are summed per
    sample first, then squared: coupled channels are one mask, not several.
    """
    total: Tensor | None = None
    for g, idxs, root_idxs in contributions:
        if total is None:
            total = g.new_zeros(g.shape[0], size, dtype=torch.float64)
        cols = torch.as_tensor(list(idxs), dtype=torch.long, device=g.device)
        rows = torch.as_tensor(list(root_idxs), dtype=torch.long, device=g.device)
        total.index_add_(1, rows, g.index_select(1, cols).to(total.dtype))
    if total is None:
        return torch.zeros(size, dtype=torch.float64)
    return total.pow(2).sum(0)


def normalized_scores(scores: Tensor, cost: Tensor | float) -> Tensor:
    """Fisher score per unit of what removing the channel saves: a costly channel goes first."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    if (cost <= 0).any():
        raise ValueError("a channel's cost must be positive")
    return scores.double() / cost


def removal_units(
    scores: Sequence[Tensor],
    original_sizes: Sequence[int],
    round_to: int = 1,
    max_layer_ratio: float = 0.9,
) -> list[tuple[float, int, int]]:
    """Candidate removals, cheapest first: ``(key, group, channels removed from it after this unit)``.

    A unit is the next ``round_to`` lowest-scored channels of one group (the first unit brings the
    group to a multiple of ``round_to``); its key is the mean score of those channels. No group
    keeps fewer than ``ceil(original * (1 - max_layer_ratio))`` (and at least one) channels.
    """
    units = []
    for gi, (s, orig) in enumerate(zip(scores, original_sizes, strict=True)):
        size = len(s)
        min_keep = max(1, math.ceil(orig * (1 - max_layer_ratio)))
        ordered = torch.sort(s.double(), stable=True).values
        keep = size
        while True:
            nxt = (keep - 1) // round_to * round_to
            if nxt < min_keep:
                break
            units.append((float(ordered[size - keep : size - nxt].mean()), gi, size - nxt))
            keep = nxt
    units.sort()
    return units


def take_units(units: Sequence[tuple[float, int, int]], channels: int) -> list[tuple[float, int, int]]:
    """The cheapest units, until at least ``channels`` channels are removed (at least one unit)."""
    taken, removed, counts = [], 0, {}
    for unit in units:
        if taken and removed >= channels:
            break
        _, gi, after = unit
        removed += after - counts.get(gi, 0)
        counts[gi] = after
        taken.append(unit)
    return taken


def fitting_units(
    units: Sequence[tuple[float, int, int]], saving_per_channel: Tensor, room: float
) -> list[tuple[float, int, int]]:
    """The units whose own estimated saving fits in ``room``, in order.

    A group whose unit does not fit contributes no later unit either (they come after it). This
    lets the last steps pass over a large unit for a smaller one of another group.
    """
    kept, blocked, last = [], set(), {}
    for unit in units:
        _, gi, after = unit
        if gi in blocked:
            continue
        if (after - last.get(gi, 0)) * float(saving_per_channel[gi]) > room:
            blocked.add(gi)
            continue
        last[gi] = after
        kept.append(unit)
    return kept


def first_reaching(
    reduction: Callable[[int], float],
    rate: float,
    n: int,
    predicted: Sequence[float] | None = None,
    close_enough: float = 0.0,
) -> int:
    """The smallest ``k`` in ``1..n`` with ``reduction(k) >= rate``, or any ``k`` probed on the
    way whose reduction is within ``close_enough`` of ``rate``.

    ``reduction`` grows with ``k``, ``reduction(0) < rate <= reduction(n)``; each call is a probe on
    a copy. The first guess is where ``predicted`` (an estimate of ``reduction(0..n)``, accurate for
    small removals) reaches ``rate``; then the bracket shrinks by interpolation along it (a straight
    line without it), rescaled to the exact values at the bracket's ends. When two interpolation
    steps in a row land on the same side without halving the bracket, the next step halves it.
    """
    pred = list(predicted) if predicted is not None else list(range(n + 1))
    lo, hi = 0, n  # reduction(lo) < rate <= reduction(hi)
    stalls, last_side = 0, None
    while hi - lo > 1:
        r_lo, r_hi = reduction(lo), reduction(hi)
        mid = (lo + hi) // 2
        if last_side is None and predicted is not None:  # first guess: the estimate as it is
            mid = next((k for k in range(lo + 1, hi) if pred[k] >= rate), hi - 1)
        elif stalls < 2 and r_hi > r_lo and pred[hi] > pred[lo]:
            scale = (r_hi - r_lo) / (pred[hi] - pred[lo])
            mid = next((k for k in range(lo + 1, hi) if r_lo + (pred[k] - pred[lo]) * scale >= rate), hi - 1)
        else:
            stalls = 0
        width, r_mid = hi - lo, reduction(mid)
        if abs(r_mid - rate) <= close_enough:
            return mid
        side = r_mid >= rate
        if side:
            hi = mid
        else:
            lo = mid
        stalls = stalls + 1 if side == last_side and (hi - lo) * 2 > width else 0
        last_side = side
    return hi


def _counts(units: Sequence[tuple[float, int, int]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, gi, after in units:
        counts[gi] = max(counts.get(gi, 0), after)
    return counts


# -- groups, their costs, and reports (shared with PX) ------------------------------------------


@dataclass
class GroupInfo:
    """A prunable dependency group in the model's current state."""

    root: str
    module: nn.Module
    size: int
    members: list[str]  # conv/linear layers losing output channels (reported)
    producers: list[tuple[str, nn.Module]]  # every named layer losing output channels (costs)
    consumers: list[tuple[str, nn.Module, list[int], list[int]]]  # (name, layer, idxs, root_idxs)


def describe_groups(model: Detector, graph: tp.DependencyGraph) -> list[GroupInfo]:
    names = {m: n for n, m in model.named_modules()}
    infos = []
    for group in prunable_groups(model, graph):
        root_module = group[0].dep.target.module
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
        infos.append(
            GroupInfo(names[root_module], root_module, len(group[0].idxs), members, producers, consumers)
        )
    return infos


@torch.no_grad()
def output_positions(model: Detector) -> dict[str, int]:
    """Per conv/linear/norm layer: output elements per channel over one ``core`` pass at batch 1
    (a layer called several times, like a shared head, sums its calls)."""
    positions: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            positions[name] = positions.get(name, 0) + output.numel() // max(1, channels)

        return record

    for name, module in model.named_modules():
        if isinstance(module, (*ROOT_TYPES, *_NORMS)):
            handles.append(module.register_forward_hook(hook(name)))
    run_core_once(model, handles)
    return positions


def channel_costs(
    groups: Sequence[GroupInfo], positions: dict[str, int], fixed: set[int]
) -> dict[str, Tensor]:
    """What removing one channel of each group saves now, per kind (fvcore's conventions).

    ``flops``: multiply-adds of the producers' output channel (batch-norm: 2 per element, as fvcore
    counts it in eval mode) and of the consumers' input channel; ``params``: the weights and biases
    of both; ``memory``: the producing convolutions' output elements; ``channels``: the prunable
    convolutions among the producers. Exact up to the cross terms of neighbouring groups.
    """
    out = {
        k: torch.zeros(len(groups), dtype=torch.float64) for k in ("flops", "params", "memory", "channels")
    }
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
            elif isinstance(module, _NORMS):
                out["flops"][gi] += pos * (2 if getattr(module, "weight", None) is not None else 1)
        for name, module, _, _ in g.consumers:
            fan = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            out["params"][gi] += module.weight.numel() / fan
            out["flops"][gi] += positions.get(name, 0) * module.weight.numel() / fan
    out["flops"] /= 1e9  # GMACs, like count_gmacs
    return out


def prune_plan(model: Detector, graph: tp.DependencyGraph, plan: dict[str, list[int]]) -> None:
    """Remove channels ``plan[root]`` (indices in the root's current output) of each group."""
    modules = dict(model.named_modules())
    for root, idxs in plan.items():
        if not idxs:
            continue
        layer = modules[root]
        pruner = graph.get_pruner_of_module(layer)
        graph.get_pruning_group(layer, pruner.prune_out_channels, idxs).prune()


def probe_plan(model: Detector, plan: dict[str, list[int]], kind: str) -> float:
    """The size (of ``kind``) the model would have after ``plan``, measured on a copy."""
    probe = copy.deepcopy(model)
    probe.eval()
    prune_plan(probe, dependency_graph(probe), plan)
    return measure_size(probe, kind)


@dataclass
class Snapshot:
    """The unpruned sizes a report compares against."""

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
    """The same report ``prune_to_budget`` writes, for methods that prune on their own."""
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


def group_report(groups: Sequence[GroupInfo]) -> dict[str, dict[str, list[str]]]:
    return {g.root: {"members": list(g.members), "consumers": [c[0] for c in g.consumers]} for g in groups}


# -- collecting the Fisher scores ----------------------------------------------------------------


class FisherCollector:
    """Tensor hooks on the consumer layers' inputs; ``scores[i]`` is group i's accumulated s.

    Use as a context manager around forward/backward passes and call ``fold()`` after each
    backward: that turns the batch's per-sample g into the groups' squared sums.
    """

    def __init__(self, groups: Sequence[GroupInfo]) -> None:
        self.groups = list(groups)
        self.scores = [torch.zeros(g.size, dtype=torch.float64) for g in self.groups]
        self._g: dict[tuple[str, int], Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> FisherCollector:
        layers = {name: module for g in self.groups for name, module, _, _ in g.consumers}
        for name, module in layers.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name, module)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._g.clear()

    def _pre_hook(self, name: str, module: nn.Module):
        channel_dim = -1 if isinstance(module, nn.Linear) else 1

        def pre(mod: nn.Module, inputs: tuple[Any, ...]):
            x = inputs[0]
            if not (torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad):
                return None
            view = x.view_as(x)  # a tensor of this call alone: its gradient is this layer's share
            view.register_hook(self._grad_hook(name, view.detach(), channel_dim))
            return (view, *inputs[1:])

        return pre

    def _grad_hook(self, name: str, activation: Tensor, channel_dim: int):
        def on_grad(grad: Tensor) -> None:
            g = fisher_per_sample(activation.detach(), grad.detach(), channel_dim).double()
            key = (name, g.shape[0])
            self._g[key] = self._g[key] + g if key in self._g else g

        return on_grad

    def fold(self) -> None:
        """Square and accumulate the per-sample sums of the batch just back-propagated."""
        for gi, g in enumerate(self.groups):
            batches: dict[int, list] = {}
            for name, _, idxs, root_idxs in g.consumers:
                for (layer, n), value in self._g.items():
                    if layer == name:
                        batches.setdefault(n, []).append((value, idxs, root_idxs))
            for contributions in batches.values():
                self.scores[gi] += group_fisher(contributions, g.size).cpu()
        self._g.clear()


# -- the method ----------------------------------------------------------------------------------


def _collate(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def training_batches(ctx: PruneContext, seed: int) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Endless shuffled batches of ``ctx.train_set`` (or, without one, the calibration batches)."""
    dataset = ctx.train_set
    if dataset is not None and len(dataset) > 0:
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            dataset,
            batch_size=ctx.batch_size,
            shuffle=True,
            drop_last=len(dataset) > ctx.batch_size,
            collate_fn=_collate,
            generator=generator,
        )

        def endless():
            while True:
                yield from loader

        return endless()
    if ctx.calibration:

        def cycle():
            while True:
                yield from ctx.calibration

        return cycle()
    raise MethodError("groupfisher trains while it prunes: the context has no train_set and no calibration")


@register("groupfisher")
class GroupFisher(Method):
    """Group Fisher pruning: global, iterative, during training (see the module docstring)."""

    scope = "global"
    defaults = {
        "d": 10,  # training iterations between two removals
        "channels_per_step": 1,  # channels removed per removal (the paper: 1)
        "normalize": "flops",  # or "memory": what a channel's score is divided by
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "clip_grad_norm": 10.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["normalize"] not in NORMALIZERS:
            raise MethodError(f"groupfisher: normalize must be one of {', '.join(NORMALIZERS)}")
        if int(o["d"]) < 1 or int(o["channels_per_step"]) < 1:
            raise MethodError("groupfisher: d and channels_per_step must be at least 1")

    def _train(self, model: Detector, batches: Iterator, collector: FisherCollector, iterations: int) -> int:
        """``d`` SGD iterations of the detection loss, accumulating the Fisher scores."""
        o = self.options
        device = next(model.parameters()).device
        optimizer = torch.optim.SGD(
            model.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"]
        )
        model.train()
        for _ in range(int(o["d"])):
            images, targets = next(batches)
            images = [im.to(device) for im in images]
            targets = [
                {k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets
            ]
            loss = sum(model.loss(images, targets).values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"groupfisher: loss became {loss.item()} at iteration {iterations}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            collector.fold()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_grad_norm"])
            optimizer.step()
            iterations += 1
        model.zero_grad(set_to_none=True)
        model.eval()  # graphs, probes and counts run in eval mode: no batch-norm statistics change
        return iterations

    @staticmethod
    def _step(
        model: Detector,
        groups: Sequence[GroupInfo],
        scores: Sequence[Tensor],
        chosen: Sequence[tuple[float, int, int]],
        saving: Tensor,
        target: Target,
        tol: float,
        size0: float,
        achieved: float,
    ) -> tuple[dict[str, list[int]], float, int]:
        """The channels this step removes: all ``chosen`` units unless that overshoots the target
        by more than ``tol``; then the prefix of units closest to it (searched on copies, starting
        from the estimated ``saving`` per channel of each group)."""
        orders = [torch.sort(s, stable=True).indices.tolist() for s in scores]
        cache: dict[int, float] = {0: achieved}

        def plan(k: int) -> dict[str, list[int]]:
            return {groups[gi].root: orders[gi][:n] for gi, n in _counts(chosen[:k]).items()}

        def reduction(k: int) -> float:
            if k not in cache:
                cache[k] = 1 - probe_plan(model, plan(k), target.kind) / size0
            return cache[k]

        k = len(chosen)
        if reduction(k) > target.rate + tol:
            predicted, last = [achieved], {}
            for _, gi, after in chosen:
                predicted.append(predicted[-1] + (after - last.get(gi, 0)) * float(saving[gi]))
                last[gi] = after
            lo = first_reaching(reduction, target.rate, k, predicted, close_enough=tol / 2)
            within = [p for p in (lo - 1, lo) if p in cache and p >= 1 and abs(cache[p] - target.rate) <= tol]
            if within:
                k = min(within, key=lambda p: abs(reduction(p) - target.rate))
            elif lo > 1:
                k = lo - 1  # never overshoot: take what fits and train on
            else:
                raise MethodError(
                    f"{target}: the closest achievable reduction is {reduction(1):.2%}; lower round_to"
                )
        return plan(k), reduction(k), len(cache) - 1

    def prune(self, model: Detector, ctx: PruneContext, target: Target) -> PruneReport:
        start = time.perf_counter()
        o = self.options
        kind, tol = target.kind, ctx.tolerance
        fixed = {id(m) for m in model.prune_ignored()}
        model.eval()
        before = Snapshot.of(model)
        size0 = before.size(kind)
        graph = dependency_graph(model)
        groups = describe_groups(model, graph)
        original = {g.root: g.size for g in groups}
        report_groups = group_report(groups)
        positions = output_positions(model)
        probes = 0

        # fail before any training when even the largest allowed removal misses the target
        widest = _counts(
            removal_units(
                [torch.zeros(g.size) for g in groups],
                [g.size for g in groups],
                ctx.round_to,
                ctx.max_layer_ratio,
            )
        )
        reach = (
            1 - probe_plan(model, {groups[gi].root: list(range(n)) for gi, n in widest.items()}, kind) / size0
        )
        probes += 1
        if reach < target.rate - tol:
            raise MethodError(
                f"{target} is out of reach: removing all allowed channels (max_layer_ratio="
                f"{ctx.max_layer_ratio}) saves {reach:.1%}"
            )

        batches = training_batches(ctx, ctx.seed)
        torch.manual_seed(ctx.seed)
        achieved, steps, iterations, removed = 0.0, 0, 0, 0
        bar = tqdm(total=100, desc=f"groupfisher {target}", disable=not ctx.progress, leave=False)
        while achieved < target.rate - tol:
            groups = describe_groups(model, graph)
            with FisherCollector(groups) as collector:
                iterations = self._train(model, batches, collector, iterations)
            costs = channel_costs(groups, positions, fixed)
            scores = [
                normalized_scores(s, costs[o["normalize"]][gi]) for gi, s in enumerate(collector.scores)
            ]
            units = removal_units(
                scores, [original[g.root] for g in groups], ctx.round_to, ctx.max_layer_ratio
            )
            units = fitting_units(units, costs[kind] / size0, target.rate + tol - achieved)
            chosen = take_units(units, int(o["channels_per_step"]))
            if not chosen:
                raise MethodError(
                    f"{target}: stuck at {achieved:.2%}: no allowed removal fits the tolerance; "
                    "lower round_to"
                )
            step, probed, used = self._step(
                model, groups, scores, chosen, costs[kind] / size0, target, tol, size0, achieved
            )
            probes += used
            prune_plan(model, graph, step)
            achieved = probed  # the same removal, measured on a copy
            removed += sum(len(v) for v in step.values())
            steps += 1
            bar.update(max(0, min(100, round(100 * achieved / target.rate)) - bar.n))
            bar.set_postfix(achieved=f"{achieved:.1%}", iters=iterations)
        bar.close()
        model.eval()
        report = build_report(model, before, target, report_groups)
        report.method = self.name
        report.probes = probes
        report.seconds = time.perf_counter() - start
        report.notes = {
            "steps": steps,
            "iterations": iterations,
            "channels_removed": removed,
            "normalize": o["normalize"],
            "d": int(o["d"]),
            "channels_per_step": int(o["channels_per_step"]),
        }
        return report
