"""WongKinYiu/yolov7's official weights read as detprune's ``yolov7``: the name map from the
training yaml's layer indices, and the anchors the file carries.

detprune's YOLOv7 is ``cfg/training/yolov7.yaml`` and ``yolov7-tiny.yaml`` layer for layer
(``yolov7.py``), with the yaml's flat layer list grouped into blocks: an ELAN's two 1x1 branches
are ``cv1`` (the first layer of the block) and ``cv2`` (the second, which the 3x3 chain ``m``
continues), its fusing 1x1 conv ``cv_out``; an MP transition's convs are ``cv_pool`` (after the
max-pool), ``cv1`` and ``cv2`` (the strided 3x3); SPPCSPC, RepConv and IDetect keep yolov7's own
names. The tables below give each yaml layer's module here; inside a layer the names are yolov7's
(``conv``, ``bn``; RepConv's ``rbr_dense.0`` ...).

An official ``yolov7.pt`` is a pickle of yolov7's own classes (``models.yolo.Model``), which only
that repository can unpickle: save its state_dict there first (``SAVE_STATE_DICT``). The file's
IDetect anchors (``anchor_grid``, in pixels) become the model's ``anchors`` option, since a
checkpoint may carry auto-anchored values rather than the yaml's.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from .base import DetectorError

SAVE_STATE_DICT = "torch.save(torch.load('yolov7.pt')['model'].float().state_dict(), 'sd.pt')"


def _elan(first: int, path: str, n: int) -> dict[int, str]:
    """An ELAN written out in the yaml: two 1x1 branches, ``n`` 3x3 convs, a concat, the fuse."""
    layers = {first: f"{path}.cv1", first + 1: f"{path}.cv2"}
    layers.update({first + 2 + i: f"{path}.m.{i}" for i in range(n)})
    layers[first + 2 + n + 1] = f"{path}.cv_out"
    return layers


def _mp(first: int, path: str) -> dict[int, str]:
    """An MP transition in the yaml: max-pool, 1x1 on it, 1x1 on the input, strided 3x3, concat."""
    return {first + 1: f"{path}.cv_pool", first + 2: f"{path}.cv1", first + 3: f"{path}.cv2"}


TINY_LAYERS: dict[int, str] = {
    0: "backbone.stem.0",
    1: "backbone.stem.1",
    **_elan(2, "backbone.stem.2", 2),
    **_elan(9, "backbone.stage3.1", 2),
    **_elan(16, "backbone.stage4.1", 2),
    **_elan(23, "backbone.stage5.1", 2),
    29: "pan.spp.cv1",
    30: "pan.spp.cv2",
    35: "pan.spp.cv3",
    37: "pan.spp.cv4",
    38: "pan.reduce5",
    40: "pan.lateral4",
    **_elan(42, "pan.td4", 2),
    48: "pan.reduce4",
    50: "pan.lateral3",
    **_elan(52, "pan.td3", 2),
    58: "pan.down3",
    **_elan(60, "pan.bu4", 2),
    66: "pan.down4",
    **_elan(68, "pan.bu5", 2),
    74: "head.convs.0",
    75: "head.convs.1",
    76: "head.convs.2",
}
BASE_LAYERS: dict[int, str] = {
    **{i: f"backbone.stem.{i}" for i in range(4)},
    **_elan(4, "backbone.stem.4", 4),
    **_mp(12, "backbone.stage3.0"),
    **_elan(17, "backbone.stage3.1", 4),
    **_mp(25, "backbone.stage4.0"),
    **_elan(30, "backbone.stage4.1", 4),
    **_mp(38, "backbone.stage5.0"),
    **_elan(43, "backbone.stage5.1", 4),
    51: "pan.spp",
    52: "pan.reduce5",
    54: "pan.lateral4",
    **_elan(56, "pan.td4", 4),
    64: "pan.reduce4",
    66: "pan.lateral3",
    **_elan(68, "pan.td3", 4),
    **_mp(76, "pan.down3"),
    **_elan(81, "pan.bu4", 4),
    **_mp(89, "pan.down4"),
    **_elan(94, "pan.bu5", 4),
    102: "head.convs.0",
    103: "head.convs.1",
    104: "head.convs.2",
}
DETECT = {"tiny": 77, "base": 105}
LAYERS = {"tiny": TINY_LAYERS, "base": BASE_LAYERS}
_KEY = re.compile(r"model\.(\d+)\.(.+)")


def official_size(state: dict[str, Any]) -> str | None:
    """``tiny`` or ``base`` where ``state`` names its tensors as yolov7's training model does."""
    for size, detect in DETECT.items():
        if f"model.{detect}.anchor_grid" in state and f"model.{detect}.m.0.weight" in state:
            return size
    return None


def from_official(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An official yolov7 state_dict in detprune's names (float32) and the build spec its shapes
    say: ``{"size", "num_classes", "options": {"anchors"}}`` (anchors in pixels, 3 levels x 6)."""
    size = official_size(state)
    if size is None:
        raise DetectorError("not a state_dict of WongKinYiu/yolov7's training model (no IDetect anchors)")
    detect, layers = DETECT[size], LAYERS[size]
    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _KEY.fullmatch(key)
        index, rest = (int(match.group(1)), match.group(2)) if match else (-1, key)
        if index == detect:
            if rest in ("anchors", "anchor_grid"):
                continue
            name = f"head.{rest}"
        elif index in layers:
            name = f"{layers[index]}.{rest}"
        else:
            raise DetectorError(f"'{key}' is not a tensor of yolov7's {size} training model")
        ours[name] = value.float() if value.is_floating_point() else value
    grid = state[f"model.{detect}.anchor_grid"].float().reshape(3, 6)
    anchors = [[round(float(v), 4) for v in level] for level in grid]
    outputs = int(state[f"model.{detect}.m.0.weight"].shape[0])
    return ours, {"size": size, "num_classes": outputs // 3 - 5, "options": {"anchors": anchors}}


def to_official(
    state: dict[str, Tensor], size: str, anchors: Tensor, strides: tuple[int, ...]
) -> dict[str, Tensor]:
    """detprune's YOLOv7 state_dict in yolov7's names, with the IDetect anchors put back (grid
    units in ``anchors``, pixels in ``anchor_grid``, as yolov7's ``Model`` keeps them)."""
    detect, paths = DETECT[size], {path: index for index, path in LAYERS[size].items()}
    theirs: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("head.") and not key.startswith("head.convs."):
            theirs[f"model.{detect}.{key[len('head.') :]}"] = value
            continue
        path = max((p for p in paths if key.startswith(p + ".")), key=len, default=None)
        if path is None:
            raise DetectorError(f"'{key}' has no counterpart in yolov7's {size} training model")
        theirs[f"model.{paths[path]}.{key[len(path) + 1 :]}"] = value
    pixels = anchors.float().view(3, 3, 2)
    theirs[f"model.{detect}.anchors"] = pixels / torch.tensor(strides, dtype=torch.float32).view(3, 1, 1)
    theirs[f"model.{detect}.anchor_grid"] = pixels.view(3, 1, 3, 1, 1, 2)
    return theirs


def is_official_pickle(error: BaseException) -> bool:
    """Whether ``torch.load(..., weights_only=True)`` refused a file for pickling yolov7's ``models.yolo``."""
    return "models.yolo" in str(error)
