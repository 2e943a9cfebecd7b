"""Params, GMACs and latency, measured the same way for every row (DESIGN.md §6)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
def latency(model: Detector, image: Tensor | None, warmup: int = 3, rounds: int = 20) -> dict[str, float]:
    """``core`` on the fixed-size example and end-to-end ``predict`` on one real image (none: a
    speed-only row), batch 1, of the model's deployed form (``Detector.deployed``)."""
    model = model.eval().deployed()
    device = next(model.parameters()).device
    x = model.example_input()
    core = time_call(lambda: model.core(x), device, warmup, rounds)
    out = {"core_ms_median": core[0], "core_ms_p90": core[1]}
    if image is not None:
        image = image.to(device)
        predict = time_call(lambda: model.predict([image]), device, warmup, rounds)
        out |= {"predict_ms_median": predict[0], "predict_ms_p90": predict[1]}
    return out


@dataclass(frozen=True)
class Timing:
    """How long a pair is timed: ``warmup`` calls of each, then at least ``rounds`` paired rounds;
    with ``halfwidth`` > 0, more rounds (in blocks of half as many) until the speed-up's 95%
    interval is at most ``halfwidth`` of the speed-up either side, or ``max_seconds`` have passed."""

    warmup: int = 3
    rounds: int = 20
    halfwidth: float = 0.0  # 0: exactly ``rounds`` rounds
    max_seconds: float = 120.0

    @classmethod
    def of(cls, measure: dict[str, Any]) -> Timing:
        """A suite's ``[measure]`` table's timing keys."""
        return cls(
            **{k: measure[k] for k in ("warmup", "rounds", "halfwidth", "max_seconds") if k in measure}
        )

    def settled(self, base_ms: list[float], pruned_ms: list[float], started: float) -> bool:
        """Whether the rounds so far are enough: the interval narrow enough, or the time spent."""
        if self.halfwidth <= 0 or time.perf_counter() - started >= self.max_seconds:
            return True
        point, lo, hi = speedup(base_ms, pruned_ms)
        return (hi - lo) / 2 <= self.halfwidth * point


def paired_times(
    base: Callable[[], object], pruned: Callable[[], object], device: torch.device, timing: Timing
) -> tuple[list[float], list[float]]:
    """Both calls timed in the same rounds, alternating which goes first (ABBA), after warm-up:
    whatever the machine does meanwhile (another process, frequency changes) hits both alike.
    As many rounds as ``timing`` asks (``len`` of either list: the rounds taken)."""
    started = time.perf_counter()
    for _ in range(timing.warmup):
        base()
        pruned()
    _sync(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    calls, block = (base, pruned), timing.rounds
    while True:
        for i in range(block):
            for which in (0, 1) if i % 2 == 0 else (1, 0):
                start = time.perf_counter()
                calls[which]()
                _sync(device)
                times[which].append((time.perf_counter() - start) * 1e3)
        if timing.settled(times[0], times[1], started):
            return times[0], times[1]
        half = max(2, timing.rounds // 2)
        block = half + half % 2  # even: ABBA stays balanced


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
    base: Detector, pruned: Detector, image: Tensor | None, timing: Timing = Timing(), batch: int = 1
) -> dict[str, float]:
    """``pruned`` timed against ``base`` (``core`` on the fixed-size example, ``predict`` on one
    real image, batch 1): its own medians, the base's, and the speed-ups with their intervals.
    Both in their deployed form (``Detector.deployed``). Without ``image``, ``core`` alone (a
    speed-only row: ``predict``'s time on untrained weights is their boxes', not the network's).
    ``batch``: ``core`` on that many example images at once (``predict`` is timed at batch 1)."""
    base, pruned = base.eval().deployed(), pruned.eval().deployed()
    device = next(pruned.parameters()).device
    x = pruned.example_input(batch)
    out: dict[str, float] = {}
    calls = {"core": (lambda: base.core(x), lambda: pruned.core(x))}
    if image is not None:
        image = image.to(device)
        calls["predict"] = (lambda: base.predict([image]), lambda: pruned.predict([image]))
    for name, (on_base, on_pruned) in calls.items():
        base_ms, pruned_ms = paired_times(on_base, on_pruned, device, timing)
        out[f"{name}_ms_median"], out[f"{name}_ms_p90"] = median_p90(pruned_ms)
        out[f"base_{name}_ms_median"] = statistics.median(base_ms)
        point, lo, hi = speedup(base_ms, pruned_ms)
        out |= {f"speedup_{name}": point, f"speedup_{name}_lo": lo, f"speedup_{name}_hi": hi}
        if name == "core":
            out["timing_rounds"] = len(pruned_ms)
    return out


def size(model: Detector) -> dict[str, float]:
    return {"params_m": count_params(model) / 1e6, "gmacs": count_gmacs(model)}
