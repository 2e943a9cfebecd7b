"""Benchmark (``tox -e bench``): the paired timing against itself. Two copies of one tiny FCOS
are timed as "base" and "pruned" exactly as a pruned cell is timed against its base; the
speed-up it finds must be 1.0 within its interval, else the timing protocol has a bias.

Also a unit check (in the default tests) that the bootstrap interval covers a known ratio.
"""

from __future__ import annotations

import copy

import pytest
import torch

from detectors import build_detector
from runners.measure import Timing, paired_latency, speedup


def test_speedup_interval_covers_the_true_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    base = (10.0 + torch.rand(40, generator=g)).tolist()
    pruned = [b / 2.0 for b in base]  # exactly twice as fast in every round
    point, lo, hi = speedup(base, pruned)
    assert point == pytest.approx(2.0) and lo <= 2.0 <= hi
    noisy = (5.0 + torch.rand(40, generator=g)).tolist()
    _, lo, hi = speedup(noisy, list(noisy))
    assert lo == hi == 1.0  # a round's two times are resampled together


@pytest.mark.bench
def test_two_copies_of_one_model_time_alike() -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 128).eval()
    twin = copy.deepcopy(model)
    timing = paired_latency(model, twin, torch.rand(3, 128, 128), Timing(warmup=10, rounds=200))
    print(
        f"\ntwo copies of fcos-tiny at 128 px, {torch.get_num_threads()} threads, 200 paired rounds: "
        f"core speed-up {timing['speedup_core']:.3f} [{timing['speedup_core_lo']:.3f}, "
        f"{timing['speedup_core_hi']:.3f}], predict {timing['speedup_predict']:.3f} "
        f"[{timing['speedup_predict_lo']:.3f}, {timing['speedup_predict_hi']:.3f}]"
    )
    assert timing["speedup_core_lo"] <= 1.0 <= timing["speedup_core_hi"]
    assert timing["speedup_predict_lo"] <= 1.0 <= timing["speedup_predict_hi"]
