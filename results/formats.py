"""How a table cell shows a figure: fixed digits, ``± std`` where seeds disagree, a speed-up with
its interval; one place, so every table of a suite formats alike."""

from __future__ import annotations

import math
from typing import Any

MISSING = "-"


def fmt(value: float, digits: int, scale: float = 1.0) -> str:
    return MISSING if math.isnan(value) else f"{value * scale:.{digits}f}"


def stat(r: Any, name: str, digits: int, scale: float = 1.0) -> str:
    """The mean, with ``± std`` when several seeds disagree."""
    mean, std = getattr(r, name), getattr(r, f"{name}_std")
    if math.isnan(mean) or math.isnan(std) or round(std * scale, digits) == 0:
        return fmt(mean, digits, scale)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def interval(r: Any, name: str) -> str:
    """One seed: the speed-up ``name`` and its interval over the paired rounds; several: mean ± std."""
    point = getattr(r, name)
    if math.isnan(point):
        return MISSING
    if r.n > 1:
        return stat(r, name, 2)
    return f"{point:.2f} [{getattr(r, f'{name}_lo'):.2f}, {getattr(r, f'{name}_hi'):.2f}]"


def speedup(r: Any) -> str:
    """PyTorch's ``core()`` speed-up (``interval``)."""
    return interval(r, "speedup_core")


def ort_speedup(r: Any) -> str:
    """ONNX Runtime's speed-up as ``speedup`` gives PyTorch's."""
    return interval(r, "speedup_ort")
