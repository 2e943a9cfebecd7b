"""The deployed model: a detector's ``core()`` exported to ONNX and checked on ONNX Runtime.

What an edge engineer ships is not the PyTorch module but its graph on a runtime, so a pruned
model is worth only what survives export. ``export_onnx`` writes the deployed form's ``core()``
(``Detector.deployed``: YOLOv7's RepConv folded, ...) with a named input ``images``, outputs
``output0..`` in ``core``'s order and a dynamic batch axis (a fixed one where ``core`` fixes it:
``Detector.dynamic_batch``, Faster R-CNN's proposals); ``check_onnx`` runs the file on ONNX Runtime
and compares every output with PyTorch's on the same inputs (batch 1 and 2, so the batch axis is
checked too). A file that fails the check is never left at its path.

The exporter is torch's TorchScript-based one (``dynamo=False``): on torch 2.14 it exports every
registered detector with a dynamic batch in under a second at the tiny sizes, where the
torch.export-based exporter took 5-10x longer and rejected Faster R-CNN's dynamic batch
(2026-12-05, Intel Xeon). ``onnx`` and ``onnxruntime`` are the ``deploy`` extra, imported only here.

ONNX Runtime's intra-op threads spin-wait by default; timed in one process beside PyTorch they
steal the CPU from whichever model runs next, so every session here turns spinning off.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detectors.base import Detector
from results.files import write_atomically

from . import measure

OPSET = 17
ATOL, RTOL = 1e-4, 1e-3  # |onnx - torch| <= ATOL + RTOL * |torch|, elementwise (np.allclose's rule)
EXTRA = "pip install 'detprune[deploy]' (onnx, onnxruntime)"


class DeployError(ValueError):
    """A model that does not export, a mismatch beyond the tolerance, a missing extra: one line."""


def onnxruntime() -> ModuleType:
    """ONNX Runtime, or a one-line error naming the extra that brings it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DeployError(f"ONNX export and ONNX Runtime timing need the deploy extra: {EXTRA}") from None
    return ort


def available() -> bool:
    """Whether the deploy extra is installed (ONNX Runtime figures are then measured)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def onnx_module() -> ModuleType:
    try:
        import onnx
    except ImportError:
        raise DeployError(f"ONNX export needs the deploy extra: {EXTRA}") from None
    return onnx


class CoreGraph(nn.Module):
    """``core()`` as a module's ``forward``: what the exporter traces."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.detector.core(images))


def _export(model: Detector, path: Path, example: Tensor) -> int:
    """Write ``model.core`` to ``path``; returns how many outputs it has."""
    graph = CoreGraph(model).eval()
    with torch.no_grad():
        count = len(graph(example))
    outputs = [f"output{i}" for i in range(count)]
    axes = {name: {0: "batch"} for name in ["images", *outputs]} if model.dynamic_batch else None
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice, chosen above
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), str(path), input_names=["images"], output_names=outputs,
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    onnx_module().checker.check_model(str(path))
    return count


def session(path: Path, threads: int, device: torch.device | str = "cpu") -> Any:
    """An ONNX Runtime session on ``threads`` intra-op threads without spin-waiting; the CUDA
    provider first when ``device`` is a GPU and this ONNX Runtime has it."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


@dataclass(frozen=True)
class Check:
    """How far ONNX Runtime's outputs are from PyTorch's on the same inputs."""

    max_abs_diff: float
    within: bool  # every element within ATOL + RTOL * |torch|
    outputs: int


def check_onnx(model: Detector, path: Path, example: Tensor, atol: float = ATOL, rtol: float = RTOL) -> Check:
    """Run ``path`` on ONNX Runtime's CPU provider against ``model.core``: at ``example``'s batch,
    and at twice it where the batch axis is dynamic."""
    runner = session(path, torch.get_num_threads())
    inputs = [example, torch.cat([example, example.flip(-1)])] if model.dynamic_batch else [example]
    worst, within, count = 0.0, True, 0
    for x in inputs:
        with torch.no_grad():
            expected = [t.detach().cpu().numpy() for t in model.core(x)]
        got = runner.run(None, {"images": x.detach().cpu().numpy()})
        count = len(got)
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
            return Check(float("inf"), False, count)
        for g, e in zip(got, expected, strict=True):
            worst = max(worst, float(np.abs(g - e).max(initial=0.0)))
            within = within and bool(np.allclose(g, e, atol=atol, rtol=rtol))
    return Check(worst, within, count)


def export_onnx(
    model: Detector, path: Path, atol: float = ATOL, rtol: float = RTOL, example: Tensor | None = None
) -> Check:
    """Export ``model``'s deployed ``core()`` to ``path`` and check it; a failure to export or a
    mismatch beyond the tolerance raises ``DeployError`` and leaves nothing at ``path``."""
    onnxruntime()
    onnx_module()
    deployed = model.eval().deployed().eval()  # the caller's model stays where it is
    if next(deployed.parameters()).device.type != "cpu":
        deployed = copy.deepcopy(deployed).cpu()
    x = deployed.example_input() if example is None else example.cpu()
    path = Path(path)
    found: list[Check] = []

    def write(tmp: Path) -> None:
        try:
            _export(deployed, tmp, x)
        except Exception as exc:  # the exporter's own message, on one line, says what it could not do
            raise DeployError(
                f"{type(model).__name__} does not export to ONNX: {type(exc).__name__}: {exc}"
            ) from exc
        check = check_onnx(deployed, tmp, x, atol, rtol)
        if not check.within:
            raise DeployError(
                f"ONNX Runtime's outputs differ from PyTorch's beyond {atol:g} + {rtol:g} x |torch| "
                f"(max abs difference {check.max_abs_diff:.3g}); nothing written to {path}"
            )
        found.append(check)

    if not path.parent.is_dir():
        raise DeployError(f"cannot write {path}: {path.parent} is not a folder")
    try:
        write_atomically(path, write)
    except PermissionError as exc:
        raise DeployError(f"cannot write {path}: {exc.strerror or exc}") from None
    return found[0]


def paired_onnx_latency(
    base: Detector,
    pruned: Detector,
    folder: Path,
    timing: measure.Timing | None = None,
    threads: int | None = None,
    device: torch.device | str = "cpu",
    batch: int = 1,
) -> dict[str, Any]:
    """``pruned`` against ``base`` on ONNX Runtime: both exported and checked into ``folder``,
    then ``core()`` timed in the same paired, interleaved rounds as PyTorch's
    (``measure.paired_times``) on ``threads`` intra-op threads (torch's count by default), on the
    CUDA provider where ``device`` is a GPU and this ONNX Runtime has it, else the CPU's; on
    ``batch`` example images at once (the export's batch axis is dynamic: ``Detector.dynamic_batch``)."""
    threads, timing = threads or torch.get_num_threads(), timing or measure.Timing()
    checks = {name: export_onnx(model, Path(folder) / f"{name}.onnx") for name, model in
              (("base", base), ("pruned", pruned))}  # fmt: skip
    runners = {name: session(Path(folder) / f"{name}.onnx", threads, device) for name in checks}
    x = pruned.example_input(batch).detach().cpu().numpy()
    base_ms, pruned_ms = measure.paired_times(
        lambda: runners["base"].run(None, {"images": x}),
        lambda: runners["pruned"].run(None, {"images": x}),
        torch.device("cpu"), timing,  # run() returns host arrays: the GPU's work is done by then
    )  # fmt: skip
    point, lo, hi = measure.speedup(base_ms, pruned_ms)
    return {
        "ort_core_ms_median": measure.median_p90(pruned_ms)[0],
        "base_ort_core_ms_median": measure.median_p90(base_ms)[0],
        "speedup_ort": point,
        "speedup_ort_lo": lo,
        "speedup_ort_hi": hi,
        "export_max_abs_diff": max(check.max_abs_diff for check in checks.values()),
        "ort_timing_rounds": len(pruned_ms),
        "ort_provider": runners["pruned"].get_providers()[0],
    }
