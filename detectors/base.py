"""The Detector contract (DESIGN.md §3), the registry, and checkpoints that survive pruning.

Methods and runners only see this contract; a method never knows which detector it prunes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_REGISTRY: dict[str, Callable[..., Detector]] = {}


class DetectorError(ValueError):
    """Bad detector name, size or checkpoint, reported as one line."""


class Detector(nn.Module):
    """A detector as the harness sees it.

    ``core`` is the bare network on a fixed-size tensor (pruning graphs, FLOPs, latency use it);
    ``loss``/``predict`` wrap it with the detector's own pre/post-processing.
    """

    spec: dict[str, Any]
    strides: tuple[int, ...]
    input_size: int
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

    @property
    def neck(self) -> nn.Module:
        raise TypeError(f"{type(self).__name__} does not define neck")

    def prune_ignored(self) -> list[nn.Module]:
        """Layers whose output channels are fixed by the task (class/box predictors)."""
        return []

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch: for losses that switch on late (YOLOX's L1)."""

    def example_input(self, batch: int = 1) -> Tensor:
        """A fixed-size input for tracing, FLOPs and latency, on the model's device."""
        device = next(self.parameters()).device
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, self.input_size, self.input_size, generator=generator)
        return x.to(device)


def letterbox(images: list[Tensor], size: int, pad: float = 0.0) -> tuple[Tensor, list[float]]:
    """Resize each image by ``min(size / H, size / W)`` and pad it, top-left, to ``size x size``.

    The pure-PyTorch detectors (YOLOX, YOLOF, ...) preprocess this way: a box scales by the
    returned factor, which is the mapping LDT assumes (``methods.ldt.map_instances``).
    """
    batch = images[0].new_full((len(images), 3, size, size), pad)
    scales = []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        scale = min(size / h, size / w)
        nh, nw = min(size, round(h * scale)), min(size, round(w * scale))
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        batch[i, :, :nh, :nw] = image
        scales.append(scale)
    return batch, scales


def register(name: str) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    """Register a detector builder ``builder(num_classes, size, input_size, **options)``."""

    def wrap(builder: Callable[..., Detector]) -> Callable[..., Detector]:
        if name in _REGISTRY:
            raise DetectorError(f"detector '{name}' registered twice")
        _REGISTRY[name] = builder
        return builder

    return wrap


def detector_names() -> list[str]:
    return sorted(_REGISTRY)


def build_detector(
    name: str, num_classes: int, size: str = "tiny", input_size: int = 128, **options: Any
) -> Detector:
    """Build a detector by name; no weights are ever downloaded."""
    if name not in _REGISTRY:
        raise DetectorError(f"unknown detector '{name}'; known: {', '.join(detector_names())}")
    model = _REGISTRY[name](num_classes=num_classes, size=size, input_size=input_size, **options)
    model.spec = {"name": name, "num_classes": num_classes, "size": size, "input_size": input_size, **options}
    return model


# -- checkpoints ---------------------------------------------------------------------------------
# A structurally pruned model has the unpruned module tree with narrower layers, so a checkpoint
# stores the build spec plus every layer's width; loading builds the spec, narrows the layers,
# then loads the weights. Only tensors and plain values are saved (``weights_only`` loading).

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


def _narrow(model: nn.Module, widths: dict[str, dict[str, int]], state: dict[str, Tensor]) -> None:
    """Give every layer the width and tensor shapes recorded in ``widths``/``state``."""
    for name, module in model.named_modules():
        if name not in widths:
            continue
        for attr, value in widths[name].items():
            setattr(module, attr, value)
        prefix = f"{name}." if name else ""
        for pname, param in list(module.named_parameters(recurse=False)):
            shape = state[prefix + pname].shape
            setattr(module, pname, nn.Parameter(torch.empty(shape, dtype=param.dtype)))
        for bname, buf in list(module.named_buffers(recurse=False)):
            key = prefix + bname
            if buf is not None and key in state:
                module.register_buffer(bname, torch.empty_like(state[key]))


def save_checkpoint(model: Detector, path: Path, meta: dict[str, Any] | None = None) -> Path:
    """Write atomically: a killed run never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "spec": model.spec,
        "widths": layer_widths(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[Detector, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
        spec = dict(payload["spec"])
    except Exception as exc:  # a foreign or truncated file: say which, not where torch failed
        raise DetectorError(f"not a detprune checkpoint: {path} ({exc.__class__.__name__})") from exc
    name = spec.pop("name")
    model = build_detector(name, **spec)
    _narrow(model, payload["widths"], payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model, payload.get("meta", {})
