"""PX, Path eXclusion (Iurada et al., CVPR 2024), at the filter level; DESIGN.md §4 "PX".

A ReLU network is a sum over paths: input -> one weight per layer -> output, each path switched
on or off by the activation pattern of the input. PX keeps the weights that carry most of the
network's path kernel. For every calibration image x, three passes of ``core``:

(a) the real network (eval mode) records the activation pattern ``a(x) = 1[pre-activation > 0]``
    of every call of every activation module (the same gate for ReLU, SiLU, LeakyReLU, GELU...),
    and the positions each max-pool picks;
(b) a copy with every weight 1 replays that pattern (activations multiply their input by the
    recorded gate, max-pools route through the recorded positions) on the input ``x ⊙ x``:
    ``z1(x)``, the data-dependent path activations;
(c) a copy with squared weights ``θ²``, identity activations and an all-ones input: ``z2``, the
    data-independent path values (the copy's parameters are ``θ²``, so autograd gives dR/d(θ²)).

``R = Σ_x Σ_k z1_k(x) z2_k`` over *every* tensor ``core`` returns, and a weight's saliency is
``S(θ) = θ² |∂R/∂(θ²)|``: since ``z2`` is multilinear in the squared weights, S(θ) is exactly the
part of R carried by the paths through θ. As z1 is summed over the images and z2 does not depend
on them, pass (c) runs once per input shape, with one backward.

What the copies do with the other layers, so that both stay sums over input-to-output paths:

* Biases (conv/linear biases, batch-norm shifts β and the running-mean shift) start no path
  from the input: they are zero in both copies. A path's value is the product of its weights only.
* Batch norm in eval mode is a per-channel affine map ``y = a x + b``, ``a = γ / sqrt(var + eps)``;
  ``a`` is a diagonal weight on every path through the channel. The unit copy uses ``a = 1``
  (every weight 1); the squared copy uses ``a² = γ² / (var + eps)`` with ``γ²`` the parameter, so
  ``S(γ) = γ² |∂R/∂(γ²)|`` is the flow through the channel, on the same footing as a conv
  weight's. (Without affine parameters the squared copy scales by ``1 / (var + eps)``; a batch norm
  without running statistics, and a GroupNorm, have no fixed ``a``: their normalisation is dropped
  and only ``γ`` (resp. ``γ²``) remains.)
* Residual additions, concatenations, nearest upsampling and average pooling are linear: they add
  paths, nothing to change. Max-pooling is a data-dependent selection like a gate: in (b) it routes
  through the positions the real network picked; in (c) (identity activations, all-ones input,
  non-negative values) it stays a max-pool, as in the official code.
* Activation modules are found generically (``ACTIVATIONS``) and hooked per call, so a module used
  twice per block (torchvision's BasicBlock ReLU) replays its two gates in order; the copies are
  made non-inplace so a hook sees the pre-activation. Activations written as functions
  (``F.relu`` in torchvision's ``LastLevelP6P7``) are not modules and are not gated: in both copies
  every value is non-negative, so they act as the identity there (an always-open gate in (b)).
* Everything runs in float64: with unit weights, z1 grows like (fan-in)^depth (about 1e53 on tiny
  FCOS at 128 px, past float32's range).
* ``x`` is the detector's preprocessed input (``model.preprocess``: resized, normalised).

Against the official code (iurada/px-ntk-pruning): it squares every state entry of the
path-kernel copy, running statistics and biases included, and accumulates ``(dR_b/dθ²)²`` per
batch; here batch norm enters as its effective scale, biases start no path, and R is summed over
all calibration images before one gradient, as DESIGN.md states it.

Structured adaptation (ours, per the LDT paper's comparison): a filter's score is the sum of S
over its weights plus its batch-norm γ, summed over the dependency group's output-pruned layers
(the filters removed together). Both terms measure the same flow through the channel (every path
through it crosses one weight of the filter and γ), so this is twice that flow; the consumers'
input slices would count it once more and are left out, as the design says. The design ranks
globally (below: why the default ranks per layer); ``rounds`` rounds (declared to the shared
engine), each rescoring the pruned network and removing an equal share of the remaining budget.

The harness's defaults, and why (measured on the trained smoke FCOS-tiny and ATSS-tiny, 128 px,
params 0.3; the faithful reading is ``PX.FAITHFUL``, kept as options to show the difference):

* ``scope="local"`` (every layer loses the same share, ranked by PX within it). In a chain every
  input-to-output path crosses every layer once, so each layer's channel flows sum to about the
  same R (1e57 to 1e58 for every backbone layer and head tower): a channel's raw flow is about
  R / width and varies 10x to 60x within the head towers, so one global ranking of raw flows
  empties wide and skewed layers first. It took the FCOS classification tower from 64 to 7
  channels (the ``max_layer_ratio`` floor): one-shot mAP 0.1 against random's 18.9 (x100).
  ``normalize="mean"`` (each group's scores over their mean, for ``scope="global"``) does not
  cure it: the towers still fall to 7 to 20 channels, one-shot mAP 0.0.
* ``bn_variance=False``: a batch norm enters the squared copy as ``γ²``, not ``γ² / var``. With the
  variance, a filter's score tracks ``|w_c|² / var_c`` (Spearman 0.84 to 0.97 in every backbone
  layer), which is largest for a filter whose output barely varies (it lies in low-variance
  directions of its input): the faithful score keeps near-constant channels and removes the
  varying ones (one-shot mAP 0.0 with local scope). Batch norm makes a channel's signal
  ``γ · x̂`` with ``x̂`` of unit variance whatever the filter, so ``γ²`` is the scale that signal
  carries. (The score still depends on ``|w_c|²``, a scale batch norm leaves free; weight decay
  keeps the filters of one layer on a similar scale.)

With both (the default), one-shot at params 0.3: FCOS mAP 12.8, ATSS AP50 38.5; random scores on
the same baselines over six draws: 17.7 ± 4.4 and 36.7 ± 5.7 (the faithful reading: 0.1 and
2.8). ``γ²`` with one global ranking reaches 32.7 and 33.5 one-shot but still takes the
classification tower to 7 channels, and after fine-tuning falls to 42.5 and 54.5 where the
default keeps 49.2 and 80.3 (``runners/suites/px_ablation.toml``, AMD EPYC, one seed).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.base import Detector

from .engine.base import Method, register
from .engine.groups import ACTIVATIONS, NORMS, ChannelScores
from .engine.types import MethodError, PruneContext

LINEAR_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# -- the math, on tensors ------------------------------------------------------------------------


def px_saliency(weight: Tensor, grad_wrt_squared: Tensor) -> Tensor:
    """``S(θ) = θ² · |∂R/∂(θ²)|``."""
    return weight.detach().double().pow(2) * grad_wrt_squared.detach().double().abs()


def activation_gate(pre_activation: Tensor) -> Tensor:
    """The activation pattern ``1[pre-activation > 0]`` (bool), whatever the activation."""
    return pre_activation > 0


def path_objective(z1: Iterable[Tensor], z2: Iterable[Tensor]) -> Tensor:
    """``R = Σ_k z1_k z2_k`` over every output tensor (z1 already summed over the images)."""
    return sum((a * b).sum() for a, b in zip(z1, z2, strict=True))


def filter_saliency(saliency: Tensor) -> Tensor:
    """Per output channel: the sum of S over the filter (dim 0), or S itself for a norm's γ."""
    return saliency.reshape(saliency.shape[0], -1).sum(1) if saliency.dim() > 1 else saliency


# -- the three passes ----------------------------------------------------------------------------


def _channel_view(t: Tensor, dim_size: int) -> list[int]:
    return [1, dim_size] + [1] * (t.dim() - 2)


class _Patterns:
    """Pass (a) records, pass (b) replays: per module name, one entry per call, in call order."""

    def __init__(self) -> None:
        self.recorded: dict[str, list[Tensor]] = {}
        self.cursor: dict[str, int] = {}

    def reset(self) -> None:
        self.recorded.clear()
        self.cursor.clear()

    def push(self, name: str, value: Tensor) -> None:
        self.recorded.setdefault(name, []).append(value)

    def pop(self, name: str) -> Tensor:
        i = self.cursor.get(name, 0)
        calls = self.recorded.get(name, [])
        if i >= len(calls):
            raise MethodError(f"px: '{name}' ran more often with unit weights than on the data")
        self.cursor[name] = i + 1
        return calls[i]

    def check_replayed(self) -> None:
        for name, calls in self.recorded.items():
            if self.cursor.get(name, 0) != len(calls):
                raise MethodError(f"px: '{name}' ran fewer times with unit weights than on the data")


def _record_hooks(model: nn.Module, patterns: _Patterns) -> list[Any]:
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ACTIVATIONS):

            def gate(mod: nn.Module, inputs: tuple[Any, ...], name: str = name) -> None:
                patterns.push(name, activation_gate(inputs[0]))  # before an inplace op runs

            handles.append(module.register_forward_pre_hook(gate))
        elif isinstance(module, nn.MaxPool2d):

            def picks(mod: nn.MaxPool2d, inputs: tuple[Any, ...], name: str = name) -> None:
                _, idx = F.max_pool2d(
                    inputs[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode, True
                )
                patterns.push(name, idx)

            handles.append(module.register_forward_pre_hook(picks))
    return handles


def _norm_scale(module: nn.Module, squared: bool, bn_variance: bool = True) -> Tensor | None:
    """The per-channel factor a norm layer applies in a copy (None: the identity).

    ``bn_variance=False``: a batch norm scales by ``γ²`` alone, as one without running statistics.
    """
    if not squared:
        return None
    scale = module.weight if getattr(module, "weight", None) is not None else None
    if bn_variance and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
        # a norm shared by pyramid levels keeps one variance per level: the current one's
        var = module.statistics()[1] if hasattr(module, "statistics") else module.running_var
        inv = 1.0 / (var.detach() + module.eps)
        return inv if scale is None else scale * inv
    return scale


def _make_copy(
    model: Detector, squared: bool, patterns: _Patterns | None, bn_variance: bool = True
) -> tuple[Detector, list[Any]]:
    """The unit-weight copy (b) or the squared-weight copy (c), in float64 and eval mode."""
    twin = copy.deepcopy(model).double().eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    handles = []
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, LINEAR_LAYERS):
                if squared:
                    module.weight.pow_(2)
                    module.weight.requires_grad_(True)
                else:
                    module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, NORMS):
                if squared and getattr(module, "weight", None) is not None:
                    module.weight.pow_(2)
                    module.weight.requires_grad_(True)

                def norm(mod: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
                    x = inputs[0]
                    scale = _norm_scale(mod, squared, bn_variance)
                    return x if scale is None else x * scale.view(_channel_view(x, scale.numel()))

                handles.append(module.register_forward_hook(norm))
            elif isinstance(module, ACTIVATIONS):
                if hasattr(module, "inplace"):
                    module.inplace = False

                def act(mod: nn.Module, inputs: tuple[Any, ...], output: Tensor, name: str = name) -> Tensor:
                    x = inputs[0]
                    return x if patterns is None else x * patterns.pop(name).to(x.dtype)

                handles.append(module.register_forward_hook(act))
            elif isinstance(module, nn.MaxPool2d) and patterns is not None:

                def route(
                    mod: nn.Module, inputs: tuple[Any, ...], output: Tensor, name: str = name
                ) -> Tensor:
                    x, idx = inputs[0], patterns.pop(name)
                    return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

                handles.append(module.register_forward_hook(route))
    return twin, handles


class PathPasses:
    """The three passes over one model: ``z1(x)`` records (a) on the model and replays it on the
    unit copy (b); ``z2(shape)`` runs the squared copy (c). Use as a context manager: the hooks on
    the model come off at exit and the model is left as it was. ``bn_variance``: whether a batch
    norm's squared factor includes ``1 / (var + eps)`` (the faithful effective scale)."""

    def __init__(self, model: Detector, bn_variance: bool = True) -> None:
        self.model = model
        self.patterns = _Patterns()
        self._was_training = model.training
        model.eval()
        self.unit, unit_handles = _make_copy(model, squared=False, patterns=self.patterns)
        self.squared, squared_handles = _make_copy(model, True, None, bn_variance)
        self._handles = [*unit_handles, *squared_handles, *_record_hooks(model, self.patterns)]

    def __enter__(self) -> PathPasses:
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.train(self._was_training)

    @torch.no_grad()
    def z1(self, x: Tensor) -> tuple[Tensor, ...]:
        """(a) then (b): every output of the unit copy on ``x ⊙ x`` under the data's gates."""
        self.patterns.reset()
        self.model.core(x)
        out = self.unit.core(x.double().pow(2))
        self.patterns.check_replayed()
        self.patterns.reset()
        return tuple(out)

    def z2(self, shape: tuple[int, ...]) -> tuple[Tensor, ...]:
        """(c): every output of the squared copy on an all-ones input of ``shape`` (batch 1)."""
        device = next(self.squared.parameters()).device
        return tuple(self.squared.core(torch.ones((1, *shape), dtype=torch.float64, device=device)))


def px_saliencies(model: Detector, inputs: Iterable[Tensor], bn_variance: bool = True) -> dict[str, Tensor]:
    """``S`` for every conv/linear weight and norm γ of ``model``, by parameter name.

    ``inputs``: preprocessed batches (what ``core`` takes). The model is left as it was.
    ``bn_variance``: see ``PathPasses``.
    """
    z1_sums: dict[tuple[int, ...], list[Tensor]] = {}
    with PathPasses(model, bn_variance) as passes:
        for x in inputs:
            sums = [z.sum(0) for z in passes.z1(x)]  # z1 summed over the images, per input shape
            key = tuple(x.shape[1:])
            z1_sums[key] = (
                [s + t for s, t in zip(z1_sums[key], sums, strict=True)] if key in z1_sums else sums
            )
        for key, sums in z1_sums.items():  # (c): one pass and one backward per input shape
            path_objective(sums, [z[0] for z in passes.z2(key)]).backward()
        squared = passes.squared
    params = dict(model.named_parameters())
    out = {}
    for name, p in squared.named_parameters():
        if p.requires_grad:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if not torch.isfinite(grad).all():
                raise MethodError(f"px: dR/d(θ²) of '{name}' is not finite (too deep for float64)")
            out[name] = px_saliency(params[name], grad).cpu()
    return out


def filter_scores(saliency: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per layer (by name): each output channel's S summed over its weights (or a norm's γ)."""
    return {
        name[: -len(".weight")]: filter_saliency(s)
        for name, s in saliency.items()
        if name.endswith(".weight")
    }


# -- the method ----------------------------------------------------------------------------------


@register("px")
class PX(Method):
    """Path eXclusion, filter-level, in ``rounds`` rescored rounds; per-layer ranking and ``γ²``
    for batch norm by default, ``PX.FAITHFUL`` for the design's global reading (module docstring)."""

    scope = "local"
    defaults = {"rounds": 3, "scope": "local", "bn_variance": False, "normalize": "none"}
    # the structured reading of the paper's criterion, as DESIGN.md §4 first stated it
    FAITHFUL = {"scope": "global", "bn_variance": True, "normalize": "none"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if int(self.options["rounds"]) < 1:
            raise MethodError("px: rounds must be at least 1")
        if self.options["normalize"] not in ("mean", "none"):
            raise MethodError(f"px: normalize must be 'mean' or 'none', not '{self.options['normalize']}'")
        if self.options["scope"] not in ("global", "local"):
            raise MethodError(f"px: scope must be 'global' or 'local', not '{self.options['scope']}'")
        if not isinstance(self.options["bn_variance"], bool):
            raise MethodError("px: bn_variance must be true or false")
        self.scope = self.options["scope"]
        self.rounds = int(self.options["rounds"])
        self.normalizer = None if self.options["normalize"] == "none" else "mean"

    def saliencies(self, model: Detector, ctx: PruneContext) -> dict[str, Tensor]:
        if not ctx.calibration:
            raise MethodError("px needs calibration images (ctx.calibration)")
        device = next(model.parameters()).device
        with torch.no_grad():
            inputs = [model.preprocess([im.to(device) for im in images]) for images, _ in ctx.calibration]
        return px_saliencies(model, inputs, bn_variance=self.options["bn_variance"])

    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        """A filter's S and its norm's γ, summed over the group's output-pruned layers, then
        divided by the group's mean unless ``normalize="none"``."""
        scores = filter_scores(self.saliencies(model, ctx))
        return ChannelScores(model, scores, normalizer=self.normalizer)
