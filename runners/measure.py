"""Params, GMACs and latency, measured the same way for every row (DESIGN.md §6)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from detectors.base import Detector
from methods.engine.sizes import count_gmacs, count_params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, warmup: int, rounds: int
) -> tuple[float, float]:
    """Median and p90 in milliseconds; on a GPU the timed region ends with a synchronize."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return median_p90(times)


def median_p90(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


@torch.inference_mode()
def latency(model: Detector, image: Tensor, warmup: int = 3, rounds: int = 20) -> dict[str, float]:
    """``core`` on the fixed-size example and end-to-end ``predict`` on one real image, batch 1,
    of the model's deployed form (``Detector.deployed``)."""
    model = model.eval().deployed()
    device = next(model.parameters()).device
    x = model.example_input()
    image = image.to(device)
    core = time_call(lambda: model.core(x), device, warmup, rounds)
    predict = time_call(lambda: model.predict([image]), device, warmup, rounds)
    return {
        "core_ms_median": core[0],
        "core_ms_p90": core[1],
        "predict_ms_median": predict[0],
        "predict_ms_p90": predict[1],
    }


def paired_times(
    base: Callable[[], object], pruned: Callable[[], object], device: torch.device, warmup: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Both calls timed in the same rounds, alternating which goes first (ABBA), after warm-up:
    whatever the machine does meanwhile (another process, frequency changes) hits both alike."""
    for _ in range(warmup):
        base()
        pruned()
    _sync(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    calls = (base, pruned)
    for i in range(rounds):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            calls[which]()
            _sync(device)
            times[which].append((time.perf_counter() - start) * 1e3)
    return times[0], times[1]


def speedup(
    base_ms: list[float], pruned_ms: list[float], resamples: int = 2000
) -> tuple[float, float, float]:
    """``median(base) / median(pruned)`` and its 95% interval, bootstrapping the paired rounds
    (a round's two times are resampled together, so what they share cancels)."""
    b, p = np.asarray(base_ms), np.asarray(pruned_ms)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(b), size=(resamples, len(b)))
    ratios = np.median(b[idx], axis=1) / np.median(p[idx], axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(np.median(b) / np.median(p)), float(lo), float(hi)


@torch.inference_mode()
def paired_latency(
    base: Detector, pruned: Detector, image: Tensor, warmup: int = 3, rounds: int = 20
) -> dict[str, float]:
    """``pruned`` timed against ``base`` (``core`` on the fixed-size example, ``predict`` on one
    real image, batch 1): its own medians, the base's, and the speed-ups with their intervals.
    Both in their deployed form (``Detector.deployed``)."""
    base, pruned = base.eval().deployed(), pruned.eval().deployed()
    device = next(pruned.parameters()).device
    x, image = pruned.example_input(), image.to(device)
    out: dict[str, float] = {}
    calls = {
        "core": (lambda: base.core(x), lambda: pruned.core(x)),
        "predict": (lambda: base.predict([image]), lambda: pruned.predict([image])),
    }
    for name, (on_base, on_pruned) in calls.items():
        base_ms, pruned_ms = paired_times(on_base, on_pruned, device, warmup, rounds)
        out[f"{name}_ms_median"], out[f"{name}_ms_p90"] = median_p90(pruned_ms)
        out[f"base_{name}_ms_median"] = statistics.median(base_ms)
        point, lo, hi = speedup(base_ms, pruned_ms)
        out |= {f"speedup_{name}": point, f"speedup_{name}_lo": lo, f"speedup_{name}_hi": hi}
    return out


def size(model: Detector) -> dict[str, float]:
    return {"params_m": count_params(model) / 1e6, "gmacs": count_gmacs(model)}
