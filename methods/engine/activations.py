"""One shared activation capture for the feature-map criteria (HRank, CHIP, DCODP).

Each prunable convolution is observed at its post-activation output, as the official HRank code
hooks the ReLU after each conv: conv -> (BatchNorm) -> activation when the activation directly
follows; otherwise (a residual add comes first, or the conv is linear like an FPN lateral) the
normalised conv output itself. The activation is found by tracing one forward pass and is
re-applied out of place in the hook, so in-place and shared activation modules (torchvision's
BasicBlock reuses one ReLU) are handled alike.

Statistics are reduced per batch inside the hooks — every layer in the same pass — so no
feature maps are kept: a reducer maps ``[B, C, H, W]`` to per-image scores ``[B, C]``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from detectors.base import Detector

from .base import CoupledCriterion
from .groups import ACTIVATIONS, ChannelScores, fixed_layers, run_core_once
from .types import PruneContext

Reducer = Callable[[Tensor], Tensor]


def prunable_convs(model: Detector) -> dict[str, nn.Conv2d]:
    fixed = fixed_layers(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in fixed}


@torch.no_grad()
def observation_points(
    model: Detector, norms: tuple[type[nn.Module], ...] = (nn.BatchNorm2d,)
) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """For each prunable conv: the module whose output to hook (the norm of a kind in ``norms``
    that directly follows it, else the conv), and the activation to apply."""
    # (module, input, input version, output, output version); tensors kept alive so ids stay unique.
    # Versions tell "directly follows" from "follows after an in-place op" (BasicBlock's ``+=``).
    calls: list[tuple[nn.Module, Tensor, int, Tensor | None, int]] = []

    def record_output(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor):
            calls.append((module, inputs[0], -1, output, output._version))

    def record_input(module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            calls.append((module, inputs[0], inputs[0]._version, None, -1))

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, *norms)):
            handles.append(m.register_forward_hook(record_output))
        elif isinstance(m, ACTIVATIONS):
            handles.append(m.register_forward_pre_hook(record_input))
    run_core_once(model, handles)

    def consumer_of(output: Tensor, version: int, kinds: tuple[type, ...]) -> nn.Module | None:
        for module, inp, inp_version, _, _ in calls:
            if inp is output and isinstance(module, kinds):
                if inp_version == -1 or inp_version == version:
                    return module
        return None

    outputs = {id(m): (out, v) for m, _, _, out, v in calls if out is not None}  # shared modules: last call
    points = {}
    for name, conv in prunable_convs(model).items():
        if id(conv) not in outputs:
            continue  # not used by core()
        hooked: nn.Module = conv
        bn = consumer_of(*outputs[id(conv)], norms)
        if bn is not None:
            hooked = bn
        act = consumer_of(*outputs[id(hooked)], ACTIVATIONS)
        if act is not None:
            act = copy.deepcopy(act)
            if hasattr(act, "inplace"):
                act.inplace = False
        points[name] = (hooked, act)
    return points


@torch.no_grad()
def capture(
    model: Detector,
    batches: Sequence[tuple[list[Tensor], list[dict]]],
    reducer: Reducer,
    layers: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Mean over the calibration images of ``reducer``'s per-image scores, for every layer at once.

    Batches go to the model's device; the per-layer sums come back to the CPU.
    """
    points = observation_points(model)
    if layers is not None:
        points = {n: p for n, p in points.items() if n in set(layers)}
    sums: dict[str, Tensor] = {}
    handles = []
    for name, (module, act) in points.items():

        def hook(
            _m: nn.Module, _i: tuple, out: Tensor, name: str = name, act: nn.Module | None = act
        ) -> None:
            feats = act(out) if act is not None else out
            scores = reducer(feats).sum(dim=0).cpu()
            sums[name] = sums[name] + scores if name in sums else scores

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images_seen = 0
    try:
        for images, _ in tqdm(batches, desc="activations", disable=not progress, leave=False):
            model.core(model.preprocess([im.to(device) for im in images]))
            images_seen += len(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if images_seen == 0:
        raise ValueError("no calibration images: the activation criteria need real data")
    return {name: s / images_seen for name, s in sums.items()}


class FeatureMapCriterion(CoupledCriterion):
    """A criterion on the captured maps: ``reducer`` gives per-image channel scores ``[N, C]``."""

    scope = "local"

    reducer: Reducer

    def prepare(self, model: Detector, ctx: PruneContext) -> None:
        self.layer_scores = capture(model, ctx.calibration, self.reducer, progress=ctx.progress)

    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        return ChannelScores(model, self.layer_scores, root_only=self.root_only)
