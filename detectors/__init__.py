"""Detectors behind one contract; importing the package registers every family."""

from . import fcos  # noqa: F401  (registers fcos, atss)
from .base import (
    Detector,
    DetectorError,
    build_detector,
    detector_names,
    layer_widths,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "Detector",
    "DetectorError",
    "build_detector",
    "detector_names",
    "layer_widths",
    "load_checkpoint",
    "save_checkpoint",
]
