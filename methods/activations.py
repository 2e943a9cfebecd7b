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

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.GELU, nn.Mish, nn.ELU)
Reducer = Callable[[Tensor], Tensor]


def prunable_convs(model: Detector) -> dict[str, nn.Conv2d]:
    fixed = {id(m) for m in model.prune_ignored()}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in fixed}


def run_core_once(model: Detector, handles: list) -> None:
    """One eval-mode ``core`` pass on the example input, then the hooks go and the mode returns."""
    was_training = model.training
    model.eval()
    try:
        model.core(model.example_input())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def observation_points(model: Detector) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """For each prunable conv: the module whose output to hook, and the activation to apply."""
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
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
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
        bn = consumer_of(*outputs[id(conv)], (nn.BatchNorm2d,))
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
    """Mean over the calibration images of ``reducer``'s per-image scores, for every layer at once."""
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
            scores = reducer(feats).sum(dim=0)
            sums[name] = sums[name] + scores if name in sums else scores

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    images_seen = 0
    try:
        for images, _ in tqdm(batches, desc="activations", disable=not progress, leave=False):
            model.core(model.preprocess(images))
            images_seen += len(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if images_seen == 0:
        raise ValueError("no calibration images: the activation criteria need real data")
    return {name: s / images_seen for name, s in sums.items()}


class LayerScoreImportance:
    """Per-layer channel scores -> one score per channel of a dependency group.

    The scores of every output-pruned layer of the group that has scores are summed per root
    index (``root_only``: the group's root layer alone), so coupled layers lose the same indices.
    """

    def __init__(self, model: nn.Module, layer_scores: dict[str, Tensor], root_only: bool = False) -> None:
        self.layer_scores = layer_scores
        self.names = {m: n for n, m in model.named_modules()}
        self.root_only = root_only

    def __call__(self, group, **kwargs) -> Tensor | None:
        size = len(group[0].idxs)
        total = torch.zeros(size, dtype=torch.float64)
        found = False
        for i, (dep, idxs) in enumerate(group):
            if self.root_only and i > 0:
                break
            name = self.names.get(dep.target.module)
            if name not in self.layer_scores or not dep.handler.__name__.endswith("out_channels"):
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            scores = self.layer_scores[name].to(torch.float64)[list(idxs)]
            total.index_add_(0, torch.tensor(root_idxs), scores)
            found = True
        return total if found else None
