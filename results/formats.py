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


def speedup(r: Any) -> str:
    """One seed: the speed-up and its interval over the paired rounds; several: mean ± std."""
    if math.isnan(r.speedup_core):
        return MISSING
    if r.n > 1:
        return stat(r, "speedup_core", 2)
    return f"{r.speedup_core:.2f} [{r.speedup_core_lo:.2f}, {r.speedup_core_hi:.2f}]"


def ort_speedup(r: Any) -> str:
    """ONNX Runtime's speed-up as ``speedup`` gives PyTorch's."""
    if math.isnan(r.speedup_ort):
        return MISSING
    if r.n > 1:
        return stat(r, "speedup_ort", 2)
    return f"{r.speedup_ort:.2f} [{r.speedup_ort_lo:.2f}, {r.speedup_ort_hi:.2f}]"
