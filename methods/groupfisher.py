"""Group Fisher pruning (Liu et al., ICML 2021), DESIGN.md §4 "GroupFisher".

Every prunable layer's input channels carry a virtual mask ``m = 1``. For one sample n, the
gradient of the detection loss with respect to that mask is

    g_{n,c} = sum_{h,w} A_n[c,h,w] * dL/dA_n[c,h,w]

(``A`` the layer's input). Layers that consume the same channels (torch-pruning's dependency
group: its in-channel-pruned convolutions) share one mask, so their g are summed *before*
squaring: ``s_c = sum_n (sum_{x in group} g^x_{n,c})^2``, accumulated over ``d`` training
iterations and divided by what removing channel c saves in the *current* network (GMACs by
default, activation memory with ``normalize="memory"``). The lowest normalised channels in the
whole network go (``channels_per_step`` of them), the accumulators restart, and training goes
on until the budget is met.

How the harness realises it: the method declares ``train_iterations = d`` and
``channels_per_round = channels_per_step``; the shared engine trains (the shared loop: the
cell's fine-tuning schedule, warm-up, flips, clipping), lets ``FisherCollector`` hook those
iterations, then ranks the normalised scores globally and removes channels for real
(torch-pruning), never overshooting the target. The optimizer restarts after each removal
(the parameters changed shape), which the mask-based original does not need.

* The mask is implicit: a forward pre-hook on each consumer layer hands the layer a fresh view of
  its input and puts a *tensor* hook on that view, so the gradient seen is the one flowing back
  through this layer (and this call: FCOS runs its head convolutions once per pyramid level, the
  calls add up as they would for one shared mask). No module backward hooks.
* Costs (``methods.engine.sizes.channel_costs``) follow fvcore's counting at the model's input size: a
  channel's GMACs are its producers' output channel plus its consumers' input channel (batch
  norm 2 per element); its activation memory is the producing convolutions' output elements, as
  in the official code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detectors.base import Detector

from .engine.base import Method, register
from .engine.groups import ChannelScores, Group, describe_groups, fixed_layers
from .engine.sizes import channel_costs, output_positions
from .engine.training import TrainingHook
from .engine.types import MethodError, PruneContext

NORMALIZERS = ("flops", "memory")


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


# -- collecting the Fisher scores ----------------------------------------------------------------


class FisherCollector(TrainingHook):
    """Tensor hooks on the consumer layers' inputs; ``scores[i]`` is group i's accumulated s.

    Use as a context manager around forward/backward passes and call ``fold()`` after each
    backward: that turns the batch's per-sample g into the groups' squared sums. As a hook of
    the shared training loop, ``before_train``/``after_backward``/``after_train`` do the same.
    """

    def __init__(self, groups: Sequence[Group]) -> None:
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

    def before_train(self, model: nn.Module) -> None:
        self.__enter__()

    def after_backward(self, model: nn.Module) -> None:
        self.fold()

    def after_train(self, model: nn.Module) -> None:
        self.__exit__()

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


@register("groupfisher")
class GroupFisher(Method):
    """Group Fisher pruning: global, iterative, during training (see the module docstring)."""

    scope = "global"
    defaults = {
        "d": 10,  # training iterations between two removals
        "channels_per_step": 1,  # channels removed per removal (the paper: 1)
        "normalize": "flops",  # or "memory": what a channel's score is divided by
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["normalize"] not in NORMALIZERS:
            raise MethodError(f"groupfisher: normalize must be one of {', '.join(NORMALIZERS)}")
        if int(o["d"]) < 1 or int(o["channels_per_step"]) < 1:
            raise MethodError("groupfisher: d and channels_per_step must be at least 1")
        self.train_iterations = int(o["d"])
        self.channels_per_round = int(o["channels_per_step"])
        self._collector: FisherCollector | None = None

    def training_hooks(self, model: Detector, ctx: PruneContext) -> list[Any]:
        self._collector = FisherCollector(describe_groups(model))
        return [self._collector]

    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        """The collected Fisher sums per unit of saving, attached to each group's root layer."""
        if self._collector is None:
            raise MethodError("groupfisher scores what its training collected: run it through the engine")
        groups, sums = self._collector.groups, self._collector.scores
        costs = channel_costs(groups, output_positions(model), fixed_layers(model))[self.options["normalize"]]
        scores = {
            g.root: normalized_scores(s, costs[gi])
            for gi, (g, s) in enumerate(zip(groups, sums, strict=True))
        }
        self._collector = None
        return ChannelScores(model, scores, root_only=True)
