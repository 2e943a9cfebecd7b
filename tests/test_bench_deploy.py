"""Benchmark (``tox -e bench``): real-size speed on the runtime that deploys it. YOLOv8-s at
640 px (random weights with BatchNorm statistics drawn at random, so magnitudes differ between
channels as in a trained model), pruned by L1 to params:0.5 with ``round_to`` 1 and 16; each
pruned model timed against its base in PyTorch (eager) and on ONNX Runtime's CPU provider, both
paired and interleaved in this one process, with the ONNX sessions' threads not spin-waiting.
It prints the table; it asserts only what the protocol guarantees (the exports match PyTorch,
intervals contain their point), not a speed, which is the machine's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detectors import build_detector
from methods import PruneContext, Target, build_method, count_gmacs, prune
from runners import deploy
from runners.measure import Timing, paired_latency

pytest.importorskip("onnxruntime", reason="the deploy extra (onnx, onnxruntime) is not installed")


def _randomised_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 1.5 + 0.05
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model


@pytest.mark.bench
def test_yolov8s_at_640_on_pytorch_and_onnxruntime(tmp_path) -> None:
    torch.manual_seed(0)
    base = _randomised_bn(build_detector("yolov8", 80, "s", 640)).eval()
    lines = [f"\nYOLOv8-s at 640 px, {torch.get_num_threads()} threads, l1 to params:0.5, 15 paired rounds"]
    lines.append(
        "round_to | GMACs ratio | PyTorch speed-up [95% CI] (eff.) | ONNX Runtime speed-up [95% CI] (eff.)"
    )
    for round_to in (1, 16):
        pruned = copy.deepcopy(base)
        ctx = PruneContext(round_to=round_to, progress=False)
        prune(build_method("l1"), pruned, ctx, Target.parse("params:0.5"))
        ratio = count_gmacs(base) / count_gmacs(pruned)
        torch_t = paired_latency(base, pruned, torch.rand(3, 640, 640), Timing(warmup=2, rounds=15))
        ort_t = deploy.paired_onnx_latency(base, pruned, tmp_path, Timing(warmup=2, rounds=15))
        assert ort_t["speedup_ort_lo"] <= ort_t["speedup_ort"] <= ort_t["speedup_ort_hi"]
        assert ort_t["export_max_abs_diff"] < 1e-2
        lines.append(
            f"{round_to:>8} | {ratio:11.2f} | {torch_t['speedup_core']:.2f} "
            f"[{torch_t['speedup_core_lo']:.2f}, {torch_t['speedup_core_hi']:.2f}] "
            f"({torch_t['speedup_core'] / ratio:.2f}) | "
            f"{ort_t['speedup_ort']:.2f} [{ort_t['speedup_ort_lo']:.2f}, {ort_t['speedup_ort_hi']:.2f}] "
            f"({ort_t['speedup_ort'] / ratio:.2f}); ms {ort_t['base_ort_core_ms_median']:.0f} -> "
            f"{ort_t['ort_core_ms_median']:.0f}, max abs diff {ort_t['export_max_abs_diff']:.1e}"
        )
    print("\n".join(lines))
