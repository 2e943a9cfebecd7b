"""Detectors behind one contract; importing the package registers every family."""

from . import faster_rcnn, fcos, gfl, torchvision_models, yolof, yolov7, yolov8, yolox  # noqa: F401  (each registers)
from .base import (
    Detector,
    DetectorError,
    build_detector,
    default_size,
    detector_names,
    layer_widths,
)
from .checkpoints import (
    ChecksumError,
    load_checkpoint,
    load_weights,
    load_weights_file,
    native_state,
    read_state_dict,
    read_weights,
    save_checkpoint,
)

__all__ = [
    "ChecksumError",
    "Detector",
    "DetectorError",
    "build_detector",
    "default_size",
    "detector_names",
    "layer_widths",
    "load_checkpoint",
    "load_weights",
    "load_weights_file",
    "native_state",
    "read_state_dict",
    "read_weights",
    "save_checkpoint",
]
