"""The Detector contract (DESIGN.md §3), the registry, and the layer widths a checkpoint records.

Methods and runners only see this contract; a method never knows which detector it prunes. What
the families share beyond the contract (letterbox, the predict tail, conv blocks, assigners) is
in ``common.py``; checkpoints that survive pruning are written and read by ``checkpoints.py``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

_REGISTRY: dict[str, Callable[..., Detector]] = {}
_DEFAULT_SIZES: dict[str, str] = {}


class DetectorError(ValueError):
    """Bad detector name, size or checkpoint, reported as one line."""


class Detector(nn.Module):
    """A detector as the harness sees it (DESIGN.md §3):

    * ``loss(images, targets) -> dict[str, Tensor]`` in training mode;
    * ``predict(images) -> list[dict[str, Tensor]]`` (``"boxes"``, ``"scores"``, ``"labels"`` in
      each image's pixels), in eval mode, post-processed;
    * ``core(x) -> tuple[Tensor, ...]``: the bare network on a fixed-size ``[B, 3, H, W]`` tensor,
      without pre/post-processing (pruning graphs, FLOPs and latency use it); ``loss`` and
      ``predict`` wrap it with the detector's own pre/post-processing (``preprocess``);
    * ``neck`` and ``strides``: the per-scale maps right before the head, and their strides;
    * ``prune_ignored() -> list[nn.Module]``: the layers whose output channels are fixed.
    """

    spec: dict[str, Any]
    strides: tuple[int, ...]
    input_size: int
    # an input size must be a multiple of this, the backbone's output stride, for every level's
    # maps to align in the top-down merges (FPN's extra P6/P7 are strided convolutions: any size)
    size_divisor: int = 32
    # ``core`` on a batch of any size traces to one graph (an exported ONNX file then takes any
    # batch); False where the graph fixes it (Faster R-CNN's per-image proposal list)
    dynamic_batch: bool = True
    # what ``core`` fixes that the real pipeline would not (Faster R-CNN's proposal count): the
    # tables state it next to FLOPs and latency
    core_conditions: dict[str, Any] = {}

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        raise TypeError(f"{type(self).__name__} does not define loss()")

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        raise TypeError(f"{type(self).__name__} does not define predict()")

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        raise TypeError(f"{type(self).__name__} does not define core()")

    def preprocess(self, images: list[Tensor]) -> Tensor:
        """Images in the sample format -> the batch tensor ``core`` consumes."""
        raise TypeError(f"{type(self).__name__} does not define preprocess()")

    def input_offsets(self, images: list[Tensor]) -> list[tuple[float, float]]:
        """Where each image's top-left pixel lands in ``preprocess``'s tensor, ``(x, y)``: the
        origin for every detector that resizes into the top-left corner; a centred letterbox
        (Ultralytics' pipeline) says its padding here, so box mappings (LDT's) stay exact."""
        return [(0.0, 0.0)] * len(images)

    @property
    def neck(self) -> nn.Module:
        """The module whose output is the per-scale feature maps right before the head (LDT reads
        them, at ``strides``)."""
        raise TypeError(f"{type(self).__name__} does not define neck")

    def prune_ignored(self) -> list[nn.Module]:
        """Layers whose output channels are fixed by the task (class/box/objectness predictors, RPN
        predictors): pruning leaves their outputs whole."""
        return []

    def deployed(self) -> Detector:
        """The form to time: the model itself, or an eval-mode copy folded for inference with the
        same outputs (YOLOv7's RepConv branches summed into one conv). Latency is measured on it;
        parameters, GMACs and pruning see the training-time form."""
        return self

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch: for losses that switch on late (YOLOX's L1)."""

    def example_input(self, batch: int = 1) -> Tensor:
        """A fixed-size input for tracing, FLOPs and latency, on the model's device."""
        device = next(self.parameters()).device
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, self.input_size, self.input_size, generator=generator)
        return x.to(device)


def register(
    name: str, default_size: str = "tiny"
) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    """Register a detector builder ``builder(num_classes, size, input_size, **options)``;
    ``default_size`` is the size a suite or the CLI gets when it names none."""

    def wrap(builder: Callable[..., Detector]) -> Callable[..., Detector]:
        if name in _REGISTRY:
            raise DetectorError(f"detector '{name}' registered twice")
        _REGISTRY[name] = builder
        _DEFAULT_SIZES[name] = default_size
        return builder

    return wrap


def detector_names() -> list[str]:
    return sorted(_REGISTRY)


def default_size(name: str) -> str:
    """The size ``name`` is built at when none is named ("tiny" for an unknown name: the build
    then says the name is unknown)."""
    return _DEFAULT_SIZES.get(name, "tiny")


def build_detector(
    name: str, num_classes: int, size: str | None = None, input_size: int = 128, **options: Any
) -> Detector:
    """Build a detector by name (at its default size unless ``size``); nothing is downloaded."""
    size = size if size is not None else default_size(name)
    if name not in _REGISTRY:
        near = difflib.get_close_matches(str(name), detector_names(), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise DetectorError(f"unknown detector '{name}'{hint}; known: {', '.join(detector_names())}")
    model = _REGISTRY[name](num_classes=num_classes, size=size, input_size=input_size, **options)
    model.spec = {"name": name, "num_classes": num_classes, "size": size, "input_size": input_size, **options}
    return model


# -- layer widths (what a checkpoint records of a pruned model; see checkpoints.py) ------------
_WIDTH_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm2d: ("num_features",),
    nn.GroupNorm: ("num_channels", "num_groups"),
}


def layer_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    widths = {}
    for name, module in model.named_modules():
        for kind, attrs in _WIDTH_ATTRS.items():
            if isinstance(module, kind):
                widths[name] = {a: int(getattr(module, a)) for a in attrs}
    return widths
