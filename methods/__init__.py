"""Pruning methods behind one interface; importing the package registers every method.

One file per criterion beside ``engine/``, the machinery they share (``methods/engine``).
"""

from . import chip, dcodp, groupfisher, hrank, l1, ldt, px, random, slimming, thinet  # noqa: F401  (registers)
from .engine import prune
from .engine.base import Method, build_method, method_names, register
from .engine.sizes import count_channels, count_gmacs, count_params
from .engine.types import PRUNE_DEFAULTS, MethodError, PruneContext, PruneReport, Target

__all__ = [
    "PRUNE_DEFAULTS",
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
    "prune",
    "register",
]
