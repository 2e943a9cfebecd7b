"""Detectors behind one contract; importing the package registers every family."""

from . import faster_rcnn, fcos, gfl, yolof, yolox  # noqa: F401  (each registers its detectors)
from .base import (
    Detector,
    DetectorError,
    build_detector,
    detector_names,
    layer_widths,
)
from .checkpoints import ChecksumError, load_checkpoint, load_weights, save_checkpoint

__all__ = [
    "ChecksumError",
    "Detector",
    "DetectorError",
    "build_detector",
    "detector_names",
    "layer_widths",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]
