"""Params, GMACs and latency, measured the same way for every row (DESIGN.md §6)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from detectors.base import Detector
from methods.budget import count_gmacs, count_params


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
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return statistics.median(times), p90


@torch.inference_mode()
def latency(model: Detector, image: Tensor, warmup: int = 3, rounds: int = 20) -> dict[str, float]:
    """``core`` on the fixed-size example and end-to-end ``predict`` on one real image, batch 1."""
    model.eval()
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


def size(model: Detector) -> dict[str, float]:
    return {"params_m": count_params(model) / 1e6, "gmacs": count_gmacs(model)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, object]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "gpu": gpu,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
