"""ThiNet (Luo, Wu & Lin, ICCV 2017): prune a layer's channels by what the *next* layer needs.

For a conv that reads channels ``c = 1..C`` (the output of the layer being pruned), its output at
one sampled position (image n, output channel o, location y, x) is a sum of per-channel
contributions, ``ŷ = Σ_c x̂_c`` with ``x̂_c = Σ_{k} W[o, c, k] · x[n, c, y s + k]``. ThiNet removes
the set T of channels whose contributions sum closest to zero at the sampled positions,
``min_T Σ_i (Σ_{c∈T} x̂_{i,c})²``, greedily: T grows one channel at a time, each step taking the
channel that keeps the sum smallest (``thinet_greedy``; one matrix-vector product per step over all
candidates). The order in which channels join T is a channel's score (first to join, first
pruned): the engine's local budget then removes a prefix of it from every layer. Afterwards the
kept channels are weighed to undo what was lost, ``ŵ = argmin_w Σ_i (ŷ_i − wᵀ x̂_i)²`` by least
squares over the kept contributions (``thinet_refit``), each kept channel's slice of the next
layer's weights scaled by its ``ŵ_c``, as the paper's Section 3.3 does (``after_removal``), where
there are at least two samples per kept channel (``calibration_images × samples ≥ 2 K``; a
layer with fewer keeps its weights as they are).

Sampling: ``samples`` positions per calibration image and consumer conv (the paper's 10), each
with a random output channel and location, seeded by the cell's seed. The greedy is exact when
the channels' contributions are orthogonal over the samples (the error is then additive, and the
smallest-norm channels are the optimum); with correlated contributions a channel's value depends
on the others already in T, and greedy may miss the optimum subset (``tests/test_thinet.py``
shows both). The paper prunes and refits one layer at a time on the already-pruned network; the
harness scores and refits every layer on the unpruned network's features in one shot, like every
other one-shot criterion here.

Coupling: the channels a group removes are the inputs of every layer that reads them (a residual
chain, the convs after a concatenation). ``coupling = "root"`` scores them by the root layer's
next layer alone (the first consumer torch-pruning lists); ``"sum"`` adds the scores from every
consumer (each consumer's removal order, as a fraction of its width). Grouped (depthwise) convs
are not scored as consumers. ThiNet keeps state from its own scoring pass for the refit, so its
scores are not shared between the targets of one baseline (``shares_scores``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.base import Detector

from .engine.activations import prunable_convs
from .engine.base import CoupledCriterion, register
from .engine.groups import ChannelScores
from .engine.types import MethodError, PruneContext


def thinet_greedy(contributions: Tensor) -> Tensor:
    """ThiNet's greedy channel selection over ``contributions`` ``[m, C]`` (sample i, channel c):
    the order in which channels join the removed set T, each step adding the channel that keeps
    ``Σ_i (Σ_{c∈T} x̂_{i,c})²`` smallest. ``|s + x̂_c|² = |s|² + 2 sᵀx̂_c + |x̂_c|²``, so one step is
    one matrix-vector product over every candidate."""
    x = contributions.double()
    norms = (x * x).sum(dim=0)
    running = torch.zeros(x.shape[0], dtype=x.dtype)
    taken = torch.zeros(x.shape[1], dtype=torch.bool)
    order = []
    for _ in range(x.shape[1]):
        cost = 2 * (running @ x) + norms
        cost[taken] = float("inf")
        c = int(torch.argmin(cost))
        order.append(c)
        taken[c] = True
        running += x[:, c]
    return torch.tensor(order, dtype=torch.long)


def thinet_scores(contributions: Tensor) -> Tensor:
    """A channel's score: its place in the greedy removal order as a fraction of the width (the
    first channel to join T scores 0, the last (C - 1) / C)."""
    order = thinet_greedy(contributions)
    scores = torch.empty(order.numel(), dtype=torch.float64)
    scores[order] = torch.arange(order.numel(), dtype=torch.float64) / order.numel()
    return scores


def thinet_refit(kept: Tensor, outputs: Tensor) -> Tensor:
    """ThiNet's channel weights: ``ŵ = argmin_w Σ_i (ŷ_i − wᵀ x̂_i)²`` over the kept channels'
    contributions ``[m, K]`` and the unpruned outputs ``[m]`` (least squares, float64)."""
    return torch.linalg.lstsq(kept.double(), outputs.double()[:, None], driver="gelsd").solution[:, 0]


def _sample_contributions(conv: nn.Conv2d, x: Tensor, per_image: int, generator: torch.Generator) -> tuple:
    """``per_image`` random (output channel, location) positions per image of ``x`` (the conv's
    input): each input channel's contribution ``[m, C]`` there and the output channels sampled."""
    if isinstance(conv.padding, str):
        raise MethodError("thinet: convs with string padding are not supported")
    b = x.shape[0]
    out = conv.weight.shape[0]
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = conv.stride, conv.dilation, conv.padding
    padded = F.pad(x, (pw, pw, ph, ph))
    oh = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    m = b * per_image
    image = torch.arange(b).repeat_interleave(per_image)
    o = torch.randint(0, out, (m,), generator=generator)
    oy = torch.randint(0, oh, (m,), generator=generator)
    ox = torch.randint(0, ow, (m,), generator=generator)
    rows = oy[:, None] * sh + torch.arange(kh)[None, :] * dh  # [m, kh]
    cols = ox[:, None] * sw + torch.arange(kw)[None, :] * dw  # [m, kw]
    dev = x.device
    patches = padded[image.to(dev)[:, None, None], :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]
    weights = conv.weight[o.to(dev)].permute(0, 2, 3, 1)  # [m, kh, kw, C], as the patches
    return (patches * weights).sum(dim=(1, 2)).detach().cpu(), o


@register("thinet")
class ThiNet(CoupledCriterion):
    scope = "local"
    shares_scores = False
    defaults = {"coupling": "root", "samples": 10}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        samples = self.options["samples"]
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise MethodError(f"thinet: samples must be a whole number >= 1, not {samples!r}")
        self.collected: dict[str, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def prepare(self, model: Detector, ctx: PruneContext) -> None:
        """Every consumer conv's sampled contributions over the calibration images, in one pass
        per batch (a pre-hook on each conv reads its input)."""
        if not ctx.calibration:
            raise MethodError("thinet samples the next layers' inputs: the context has no calibration images")
        generator = torch.Generator().manual_seed(ctx.seed)
        parts: dict[str, list[tuple[Tensor, Tensor]]] = {}
        names = {m: n for n, m in model.named_modules()}
        # the fixed predictors read pruned channels too: their reconstruction counts as well
        readers = [
            *prunable_convs(model).values(),
            *(m for m in model.prune_ignored() if isinstance(m, nn.Conv2d)),
        ]

        def hook(module: nn.Module, inputs: tuple) -> None:
            sampled = _sample_contributions(module, inputs[0], self.options["samples"], generator)
            parts.setdefault(names[module], []).append(sampled)

        handles = [conv.register_forward_pre_hook(hook) for conv in readers if conv.groups == 1]
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for images, _ in ctx.calibration:
                model.core(model.preprocess([im.to(device) for im in images]))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        self.collected = {
            n: (torch.cat([c for c, _ in p]), torch.cat([o for _, o in p])) for n, p in parts.items()
        }

    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        scores = {name: thinet_scores(contrib) for name, (contrib, _) in self.collected.items()}
        return ChannelScores(model, {}, root_only=self.root_only, input_scores=scores)

    @torch.no_grad()
    def after_removal(
        self, model: Detector, ctx: PruneContext, kept: dict[str, dict[str, list[int]]]
    ) -> None:
        """Weigh each pruned consumer's kept input channels by ``thinet_refit`` (samples whose
        output channel was itself removed are left out)."""
        modules = dict(model.named_modules())
        for name, record in kept.items():
            if name not in self.collected:
                continue
            conv = modules[name]
            contrib, sampled = self.collected[name]
            if len(record["in"]) == contrib.shape[1]:
                continue  # its inputs are whole: nothing to refit
            rows = torch.isin(sampled, torch.tensor(record["out"]))
            if int(rows.sum()) < 2 * len(record["in"]):
                continue  # fewer than two samples per unknown: a refit would fit the samples' noise
            w = thinet_refit(contrib[rows][:, record["in"]], contrib[rows].sum(dim=1))
            conv.weight.mul_(w.to(conv.weight)[None, :, None, None])
