"""Checkpoints that survive pruning, and that say when they are damaged or do not fit.

A structurally pruned model has the unpruned module tree with narrower layers, so a checkpoint
stores the build spec plus every layer's width; loading builds the spec, narrows the layers,
then loads the weights. Only tensors and plain values are saved (``weights_only`` loading).

Each checkpoint is written through a temporary file unique to its writer and renamed into place,
with its SHA-256 beside it (``<file>.sha256``; ``results.files`` writes and checks both). Loading
compares the two, so a truncated or overwritten file is a ``ChecksumError``, never a model with
silently wrong weights.
"""

from __future__ import annotations

import difflib
import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from results.files import checksum_problem, write_with_checksum

from . import ultralytics_files, yolov7_files
from .base import Detector, DetectorError, build_detector, detector_names, layer_widths


class ChecksumError(DetectorError):
    """The file is not the one detprune wrote (truncated, overwritten, or its checksum is missing)."""


def verify(path: Path, required: bool = False) -> None:
    """Compare ``path`` with its recorded checksum; ``required``: a missing record is an error too."""
    problem = checksum_problem(Path(path), required)
    if problem is not None:
        raise ChecksumError(f"{path}: {problem}")


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
    """Write atomically, then record the checksum: a killed run never leaves a truncated
    checkpoint under the real name, and two runs never write the same temporary name."""
    payload = {
        "spec": model.spec,
        "widths": layer_widths(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_verified(path, buffer.getvalue())


def write_verified(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically with its checksum beside it (a checkpoint's bytes,
    also when they arrive from another machine through an executor)."""
    return write_with_checksum(path, data)


def read_verified(path: Path) -> bytes:
    """The bytes of a checkpoint that matches its recorded checksum (a ChecksumError otherwise)."""
    verify(path, required=True)
    return Path(path).read_bytes()


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", require_checksum: bool = False
) -> tuple[Detector, dict[str, Any]]:
    """The model and meta of a detprune checkpoint, checked against its recorded checksum
    (``require_checksum``: a file without one is refused, as a cache must)."""
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"checkpoint not found: {path}")
    verify(path, required=require_checksum)
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


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _likeliest(state: dict[str, Tensor], spec: dict[str, Any]) -> str | None:
    """The registered detector whose layer names the file matches best (on the error path only)."""
    best, score = None, 0.0
    for name in detector_names():
        try:  # layer names only: built on the meta device, no memory, no initialisation
            with torch.device("meta"):
                keys = set(build_detector(name, spec["num_classes"], None, spec["input_size"]).state_dict())
        except Exception:  # noqa: BLE001 - a detector that cannot be built so is no candidate
            continue
        overlap = len(keys & set(state)) / max(1, len(set(state) | keys))
        if overlap > score:
            best, score = name, overlap
    return best if score > 0.5 else None


def read_weights(path: Path, trust: bool = False) -> tuple[dict[str, Tensor], list[str] | None]:
    """The ``state_dict`` in a weights file as PyTorch users save them, and its class names where
    the file has them: a plain ``state_dict`` (torchvision's published files, one in Ultralytics'
    names), a checkpoint dict holding one under ``state_dict`` or ``model`` (torchvision's
    reference scripts), read with ``weights_only`` (no code runs); or, only with ``trust``, an
    Ultralytics training checkpoint (``best.pt``: pickled classes, ``ultralytics_files``)."""
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch says of a file that is no state_dict
        if ultralytics_files.is_ultralytics_pickle(exc):
            return ultralytics_files.read_checkpoint(path, trust)
        if yolov7_files.is_official_pickle(exc):  # only yolov7's own code unpickles it
            raise DetectorError(
                f"{path} is a pickled WongKinYiu/yolov7 checkpoint; save its state_dict in that "
                f"repository and give that file: {yolov7_files.SAVE_STATE_DICT}"
            ) from None
        raise DetectorError(f"{path}: not a PyTorch weights file ({type(exc).__name__})") from None
    if isinstance(state, dict):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DetectorError(f"{path}: holds a {type(state).__name__} that is not a state_dict of tensors")
    return state, None


def read_state_dict(path: Path, trust: bool = False) -> dict[str, Tensor]:
    """``read_weights`` without the class names."""
    return read_weights(path, trust)[0]


def native_state(name: str, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``state`` in detector ``name``'s own tensor names, and what the file says of the build
    where it came in another tool's names (Ultralytics' YOLOv8, the official YOLOv7): ``size``,
    ``num_classes`` and the detector ``options`` it implies (YOLOv7's anchors, YOLOv8's Ultralytics
    pipeline); a file already in detprune's names comes back as it is, with nothing said."""
    if name == "yolov8" and ultralytics_files.is_ultralytics_yolov8(state):
        return ultralytics_files.from_ultralytics(state)
    if name == "yolov7" and yolov7_files.official_size(state):
        return yolov7_files.from_official(state)
    return state, {}


def load_weights_file(model: Detector, path: Path, trust: bool = False) -> None:
    """``load_weights`` from a file as ``read_weights`` reads it, in the model's own names; a
    file in another tool's names must be of the model's size (and YOLOv7's, of its anchors)."""
    spec = model.spec
    state, found = native_state(spec["name"], read_state_dict(path, trust))
    size = found.get("size")
    if size is not None and size != spec["size"] and not (size == "n" and spec["size"] == "tiny"):
        raise DetectorError(
            f"{path} holds a {spec['name']}-{size}; the model to load it into is size '{spec['size']}'"
        )
    theirs = torch.tensor(found.get("options", {}).get("anchors", []), dtype=torch.float32)
    if theirs.numel() and not torch.allclose(theirs, model.anchors.view(3, 6).cpu(), atol=1e-3):
        raise DetectorError(
            f"{path} carries its own anchors {theirs.tolist()}: give them as the detector option "
            f"anchors (the model to load it into has {model.anchors.view(3, 6).tolist()})"
        )
    load_weights(model, state, path)


def load_weights(model: Detector, state: dict[str, Tensor], source: Path | str) -> None:
    """Load a plain ``state_dict`` into ``model``, or say in one line which layer does not fit:
    the first missing or unexpected key (and the detector the file looks like), or the first
    layer whose shape differs (another class count, another size)."""
    spec = model.spec
    what = f"{spec['name']}-{spec['size']} with {spec['num_classes']} classes"
    own = model.state_dict()
    # a FrozenBatchNorm2d (torchvision's pretrained backbones) has no batch counter: the count
    # only matters to a BatchNorm without a momentum, so the model's own stands in for it
    state = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked")}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        looks = "yolov8" if ultralytics_files.is_ultralytics_yolov8(state) else _likeliest(state, spec)
        hint = (
            f"; it looks like a '{looks}' checkpoint (--detector {looks})"
            if looks and looks != spec["name"]
            else "; no registered detector has its layer names"
            if not looks
            else ""
        )
        if missing:
            near = difflib.get_close_matches(missing[0], unexpected, n=1)
            found = f" (the file has '{near[0]}')" if near else ""
            raise DetectorError(
                f"{source} does not fit {what}: no '{missing[0]}'{found}, "
                f"{len(missing)} of its {len(own)} tensors missing{hint}"
            )
        raise DetectorError(
            f"{source} does not fit {what}: it has '{unexpected[0]}', which {what} lacks{hint}"
        )
    for key, value in own.items():
        theirs = state[key]
        if not isinstance(theirs, Tensor) or theirs.shape != value.shape:
            got = _shape(theirs) if isinstance(theirs, Tensor) else type(theirs).__name__
            raise DetectorError(
                f"{source} does not fit {what}: layer '{key}' is {got} in the file, {_shape(value)} here"
            )
    model.load_state_dict(state)
