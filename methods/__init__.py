"""Pruning methods behind one interface; importing the package registers every method."""

from . import chip, dcodp, engine, groupfisher, hrank, l1, ldt, px, random  # noqa: F401  (registers the methods)
from .base import Method, build_method, method_names, register, use_engine
from .sizes import count_channels, count_gmacs, count_params
from .types import PRUNE_DEFAULTS, MethodError, PruneContext, PruneReport, Target

use_engine(engine.prune)

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
    "register",
]
