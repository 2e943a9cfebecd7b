"""Pruning methods behind one interface; importing the package registers every method."""

from . import chip, dcodp, groupfisher, hrank, l1, ldt, px, random  # noqa: F401  (registers the methods)
from .base import (
    Method,
    MethodError,
    PruneContext,
    PruneReport,
    Target,
    build_method,
    method_names,
    register,
)
from .budget import count_channels, count_gmacs, count_params

__all__ = [
    "Method",
    "MethodError",
    "PruneContext",
    "PruneReport",
    "Target",
    "build_method",
    "count_channels",
    "count_gmacs",
    "count_params",
    "method_names",
    "register",
]
