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
# |onnx - torch| <= ATOL + RTOL * max |torch| over the output, every element: float32 rounding
# grows with the magnitudes a network computes with, not with each output element's own value (a
# YOLOv8-n whose logits reach 360 differs by 1e-4 at its median and 3e-3 at worst, elements near
# zero included; np.allclose's elementwise rule refused it, a transposed or wrong graph is off by
# the output's whole range)
ATOL, RTOL = 1e-4, 1e-3
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

    @property
    def dynamic_batch(self) -> bool:
        """Whether the file takes any batch size (``Detector.dynamic_batch``)."""
        return self.detector.dynamic_batch

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.detector.core(images))


class UltralyticsGraph(CoreGraph):
    """The one output ``yolo export format=onnx`` writes, ``[B, 4 + C, A]`` (boxes as centre and
    size in input pixels, sigmoid class scores; ``YOLOv8.ultralytics_output``), so deployment code
    written for Ultralytics' ONNX files takes a pruned model unchanged."""

    @property
    def dynamic_batch(self) -> bool:
        """Batch 1, as ``yolo export`` writes by default: Ultralytics' loader reads a free batch
        axis as free height and width too, and would feed it images of other sizes."""
        return False

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return (self.detector.ultralytics_output(images),)


def ultralytics_metadata(model: Detector, names: list[str] | None) -> dict[str, str]:
    """The metadata ``yolo export`` writes into its ONNX files, which Ultralytics' own loader
    (``YOLO("model.onnx")``) reads for the class names, input size and stride."""
    classes = names or [f"class{i}" for i in range(model.spec["num_classes"])]
    return {
        "description": f"{model.spec['name']}-{model.spec['size']} pruned by detprune",
        "author": "detprune",
        "task": "detect",
        "stride": str(max(model.strides)),
        "batch": "1",
        "channels": "3",
        "imgsz": str([model.input_size, model.input_size]),
        "names": str(dict(enumerate(classes))),
        "args": str({"batch": 1, "half": False, "int8": False, "dynamic": False, "nms": False}),
    }


# what an exported file's outputs are: detprune's core() (any detector), or Ultralytics' layout
LAYOUTS: dict[str, type[CoreGraph]] = {"core": CoreGraph, "ultralytics": UltralyticsGraph}


def graph_of(model: Detector, layout: str = "core") -> CoreGraph:
    """The module to trace for ``layout``; a layout the detector cannot give is one line."""
    if layout not in LAYOUTS:
        raise DeployError(f"unknown ONNX layout '{layout}'; known: {', '.join(LAYOUTS)}")
    if layout == "ultralytics" and not hasattr(model, "ultralytics_output"):
        raise DeployError(f"the ultralytics layout is YOLOv8's; {model.spec['name']} exports as 'core'")
    return LAYOUTS[layout](model).eval()


def _export(graph: CoreGraph, path: Path, example: Tensor, metadata: dict[str, str] | None = None) -> int:
    """Write ``graph`` (a detector's outputs in one layout) to ``path`` with ``metadata`` as the
    file's metadata properties; returns how many outputs it has."""
    with torch.no_grad():
        count = len(graph(example))
    outputs = [f"output{i}" for i in range(count)]
    axes = {name: {0: "batch"} for name in ["images", *outputs]} if graph.dynamic_batch else None
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice, chosen above
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), str(path), input_names=["images"], output_names=outputs,
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    if metadata:
        onnx = onnx_module()
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(path))
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
    within: bool  # every element within ATOL + RTOL * max |torch| of its output
    outputs: int


def check_onnx(
    graph: CoreGraph, path: Path, example: Tensor, atol: float = ATOL, rtol: float = RTOL
) -> Check:
    """Run ``path`` on ONNX Runtime's CPU provider against ``graph`` (a detector's ``core``, or
    its outputs in another layout): at ``example``'s batch, and at twice it where the batch axis
    is dynamic."""
    runner = session(path, torch.get_num_threads())
    dynamic = graph.dynamic_batch
    inputs = [example, torch.cat([example, example.flip(-1)])] if dynamic else [example]
    worst, within, count = 0.0, True, 0
    for x in inputs:
        with torch.no_grad():
            expected = [t.detach().cpu().numpy() for t in graph(x)]
        got = runner.run(None, {"images": x.detach().cpu().numpy()})
        count = len(got)
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
            return Check(float("inf"), False, count)
        for g, e in zip(got, expected, strict=True):
            worst = max(worst, float(np.abs(g - e).max(initial=0.0)))
            within = within and bool(np.all(np.abs(g - e) <= atol + rtol * np.abs(e).max(initial=0.0)))
    return Check(worst, within, count)


def export_onnx(
    model: Detector,
    path: Path,
    atol: float = ATOL,
    rtol: float = RTOL,
    example: Tensor | None = None,
    layout: str = "core",
    metadata: dict[str, str] | None = None,
) -> Check:
    """Export ``model``'s deployed ``core()`` (or its outputs in another ``layout``) to ``path``
    with ``metadata`` in the file, and check it; a failure to export or a mismatch beyond the
    tolerance raises ``DeployError`` and leaves nothing at ``path``."""
    onnxruntime()
    onnx_module()
    graph_of(model, layout)  # a layout the detector cannot give fails before anything is built
    deployed = model.eval().deployed().eval()  # the caller's model stays where it is
    if next(deployed.parameters()).device.type != "cpu":
        deployed = copy.deepcopy(deployed).cpu()
    graph = graph_of(deployed, layout)
    x = deployed.example_input() if example is None else example.cpu()
    path = Path(path)
    found: list[Check] = []

    def write(tmp: Path) -> None:
        try:
            _export(graph, tmp, x, metadata)
        except Exception as exc:  # the exporter's own message, on one line, says what it could not do
            raise DeployError(
                f"{type(model).__name__} does not export to ONNX: {type(exc).__name__}: {exc}"
            ) from exc
        check = check_onnx(graph, tmp, x, atol, rtol)
        if not check.within:
            raise DeployError(
                f"ONNX Runtime's outputs differ from PyTorch's beyond {atol:g} + {rtol:g} x max |torch| "
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
