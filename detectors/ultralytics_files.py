"""Ultralytics' YOLOv8 files read as detprune's ``yolov8``: the name map, the size and class
count read from the tensors' shapes, and the pickled ``best.pt`` a training run leaves.

detprune's YOLOv8 is Ultralytics' ``DetectionModel`` built from ``yolov8.yaml`` layer for layer
(``yolov8.py``), with module names that say what a layer is instead of the yaml's layer index.
The map below is that correspondence: yaml layer ``i`` is a module path here, and inside each
layer the names are the same (Conv's ``conv``/``bn``, C2f's ``cv1``/``cv2``/``m.k``, SPPF's
``cv1``/``cv2``). The Detect layer (22) keeps its branches as ``cv2`` (box: two Convs then the
1x1 predictor) and ``cv3`` (class), one per level; its ``dfl.conv.weight`` is a frozen
``arange(16)`` that detprune keeps as a fixed projection instead, so it is checked and dropped.

A training checkpoint (``best.pt``, ``last.pt``) is a pickle of Ultralytics' own classes: reading
it imports ``ultralytics`` and runs whatever code the file names, which detprune does nowhere else
(every other file is read with ``weights_only``). So it is read only when the user says so
(``trust``), and only with the ``ultralytics`` extra installed (AGPL-3.0: imported here, never
elsewhere); a plain ``state_dict`` in Ultralytics' names needs neither.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import DetectorError

EXTRA = "pip install 'detprune[ultralytics]'"
SAVE_STATE_DICT = "torch.save(YOLO('best.pt').model.state_dict(), 'sd.pt')"
REG_MAX = 16

# yolov8.yaml's layer index -> the module here (10, 13: Upsample; 11, 14, 17, 20: Concat)
YOLOV8_LAYERS: dict[int, str] = {
    0: "backbone.stem",
    1: "backbone.stage1.0",
    2: "backbone.stage1.1",
    3: "backbone.stage2.0",
    4: "backbone.stage2.1",
    5: "backbone.stage3.0",
    6: "backbone.stage3.1",
    7: "backbone.stage4.0",
    8: "backbone.stage4.1",
    9: "backbone.stage4.2",
    12: "neck.top_down_p4",
    15: "neck.top_down_p3",
    16: "neck.down_p3",
    18: "neck.bottom_up_p4",
    19: "neck.down_p4",
    21: "neck.bottom_up_p5",
}
DETECT = 22
DFL_KEY = f"model.{DETECT}.dfl.conv.weight"
# the stem's width and C2f's bottleneck count in layer 2 name the scale (yolov8.yaml's scales)
YOLOV8_SCALES: dict[tuple[int, int], str] = {
    (16, 1): "n",
    (32, 1): "s",
    (48, 2): "m",
    (64, 3): "l",
    (80, 3): "x",
}

_HEAD = re.compile(rf"model\.{DETECT}\.(cv2|cv3)\.(\d+)\.(\d+)\.(.+)")
_LAYER = re.compile(r"model\.(\d+)\.(.+)")


def is_ultralytics_yolov8(state: dict[str, Any]) -> bool:
    """Whether ``state`` names its tensors as Ultralytics' YOLOv8 ``DetectionModel`` does."""
    return "model.0.conv.weight" in state and f"model.{DETECT}.cv3.0.2.weight" in state


def _ours(key: str) -> str | None:
    """Ultralytics' name -> detprune's (None: the DFL projection, which is no parameter here)."""
    if key == DFL_KEY:
        return None
    head = _HEAD.fullmatch(key)
    if head:
        branch, level, index, rest = head.groups()
        kind = "box" if branch == "cv2" else "cls"
        if index == "2":
            return f"head.{kind}_preds.{level}.{rest}"
        return f"head.{kind}_convs.{level}.{index}.{rest}"
    layer = _LAYER.fullmatch(key)
    if layer and int(layer.group(1)) in YOLOV8_LAYERS:
        return f"{YOLOV8_LAYERS[int(layer.group(1))]}.{layer.group(2)}"
    raise DetectorError(f"'{key}' is not a tensor of Ultralytics' YOLOv8 (yolov8.yaml has no such layer)")


def _theirs(key: str) -> str:
    """detprune's name -> Ultralytics' (the inverse of ``_ours``)."""
    head = re.fullmatch(r"head\.(box|cls)_(convs|preds)\.(\d+)\.(.+)", key)
    if head:
        kind, part, level, rest = head.groups()
        branch = "cv2" if kind == "box" else "cv3"
        return f"model.{DETECT}.{branch}.{level}.2.{rest}" if part == "preds" else (
            f"model.{DETECT}.{branch}.{level}.{rest}"
        )  # fmt: skip
    for index, path in YOLOV8_LAYERS.items():
        if key.startswith(path + "."):
            return f"model.{index}.{key[len(path) + 1 :]}"
    raise DetectorError(f"'{key}' has no counterpart in Ultralytics' YOLOv8")


def yolov8_scale(state: dict[str, Tensor]) -> str:
    """The yolov8.yaml scale (n/s/m/l/x) an Ultralytics state_dict was built at."""
    width = int(state["model.0.conv.weight"].shape[0])
    depth = len({k.split(".")[3] for k in state if k.startswith("model.2.m.")})
    if (width, depth) not in YOLOV8_SCALES:
        raise DetectorError(
            f"an Ultralytics YOLOv8 of stem width {width} and {depth} bottlenecks per C2f is none of "
            f"yolov8.yaml's scales (n, s, m, l, x)"
        )
    return YOLOV8_SCALES[(width, depth)]


def from_ultralytics(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An Ultralytics YOLOv8 state_dict in detprune's names (float32), and the build spec its
    shapes name: ``{"size": n/s/m/l/x, "num_classes": C, "options": {"pipeline": "ultralytics"}}``
    (a model read from Ultralytics predicts as Ultralytics does, unless told otherwise). Its DFL
    projection must be the ``arange`` Ultralytics fixes (anything else is another network)."""
    dfl = state.get(DFL_KEY)
    if dfl is not None and not torch.equal(dfl.float().flatten(), torch.arange(REG_MAX, dtype=torch.float32)):
        raise DetectorError(f"'{DFL_KEY}' is not Ultralytics' fixed arange({REG_MAX}): not a YOLOv8 DFL head")
    ours = {}
    for key, value in state.items():
        name = _ours(key)
        if name is not None:
            ours[name] = value.float() if value.is_floating_point() else value
    classes = int(state[f"model.{DETECT}.cv3.0.2.weight"].shape[0])
    spec = {"size": yolov8_scale(state), "num_classes": classes, "options": {"pipeline": "ultralytics"}}
    return ours, spec


def to_ultralytics(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """detprune's YOLOv8 state_dict in Ultralytics' names, with the DFL projection put back: what
    ``DetectionModel.load_state_dict`` takes (pruned widths need a model of those widths)."""
    theirs = {_theirs(k): v for k, v in state.items()}
    theirs[DFL_KEY] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)
    return theirs


# -- the pickled training checkpoint --------------------------------------------------------------


def is_ultralytics_pickle(error: BaseException) -> bool:
    """Whether ``torch.load(..., weights_only=True)`` refused a file for pickling Ultralytics' classes."""
    return "ultralytics" in str(error)


def read_checkpoint(path: Path, trust: bool) -> tuple[dict[str, Tensor], list[str] | None]:
    """The state_dict and class names of an Ultralytics training checkpoint: its EMA model where
    it has one (as Ultralytics itself loads it), else its model, in float32."""
    if not trust:
        raise DetectorError(
            f"{path} is an Ultralytics training checkpoint (pickled Ultralytics classes): reading it "
            f"runs code from the file, so detprune does it only when told (--trust-checkpoint, or "
            f"trust = true beside weights in a suite); or save a plain state_dict: {SAVE_STATE_DICT}"
        )
    if importlib.util.find_spec("ultralytics") is None:
        raise DetectorError(
            f"{path} is an Ultralytics training checkpoint; unpickling it needs the ultralytics extra: "
            f"{EXTRA} (AGPL-3.0), or save a plain state_dict where Ultralytics is installed: "
            f"{SAVE_STATE_DICT}"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - whatever the pickle raises, said in one line
        raise DetectorError(
            f"{path}: the Ultralytics checkpoint does not load ({type(exc).__name__}: {exc})"
        ) from None
    model = None
    if isinstance(checkpoint, dict):  # Ultralytics loads the EMA weights where the file has them
        model = checkpoint.get("ema") if checkpoint.get("ema") is not None else checkpoint.get("model")
    if model is None or not hasattr(model, "state_dict"):
        raise DetectorError(f"{path}: an Ultralytics file without a 'model' or 'ema' network")
    names = getattr(model, "names", None) or (
        checkpoint.get("names") if isinstance(checkpoint, dict) else None
    )
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    state = {
        k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()
    }
    return state, list(names) if names else None
