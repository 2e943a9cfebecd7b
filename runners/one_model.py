"""``detprune prune`` and ``detprune export``: one trained model pruned, measured and deployed.

What an edge engineer runs on their own detector (a detprune checkpoint, a ``state_dict`` in
detprune's or Ultralytics' names, or, trusted, Ultralytics' ``best.pt``): prune to a budget,
fine-tune, print mAP before / one-shot / after and the paired speed-ups, and write the pruned
checkpoint and, with ``--export onnx``, its checked ONNX file (Ultralytics' layout for YOLOv8).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import tomllib
from pathlib import Path

import torch

from datasets import build_dataset, dataset_names
from detectors import (
    ChecksumError,
    Detector,
    DetectorError,
    build_detector,
    load_checkpoint,
    load_weights,
    native_state,
    read_weights,
    save_checkpoint,
)
from methods import PRUNE_DEFAULTS, MethodError, Target, build_method
from methods.engine.training import Schedule

from . import deploy, measure, provenance
from .evaluate import evaluate
from .inputs import check_device
from .prune import prune_and_finetune

DEFAULT_INPUT_SIZE = 128  # the harness's CPU size for a file in detprune's names
FOREIGN_INPUT_SIZE = 640  # Ultralytics' and yolov7's imgsz, for a file in their names


def parse_options(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs; values are read as TOML literals (``32``, ``true``, ``"flops"``), else as text."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MethodError(f"bad --option '{pair}': expected KEY=VALUE")
        try:
            options[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = value
    return options


def _load_model(
    checkpoint: Path, args: argparse.Namespace, num_classes: int
) -> tuple[Detector, list[str] | None]:
    """A detprune checkpoint, or a ``state_dict`` of the named ``--detector`` trained elsewhere
    (in detprune's names or Ultralytics': then the size and class count come from the file), and
    the file's class names where it has them; one that does not fit is one line naming the first
    layer that does not."""
    try:
        return load_checkpoint(checkpoint)[0], None
    except ChecksumError:
        raise
    except DetectorError:
        if not args.detector:
            raise DetectorError(f"{checkpoint} is not a detprune checkpoint: name its --detector") from None
    state, names = read_weights(checkpoint, trust=args.trust_checkpoint)
    state, found = native_state(args.detector, state)
    if args.size and found.get("size") and args.size != found["size"]:
        raise DetectorError(f"{checkpoint} holds a {args.detector}-{found['size']}, not --size {args.size}")
    options = parse_options(args.detector_option)  # built with the file's class count where it says
    options = {**found.get("options", {}), **options}  # what the file implies, unless told otherwise
    input_size = args.input_size or (FOREIGN_INPUT_SIZE if found else DEFAULT_INPUT_SIZE)
    classes = found.get("num_classes", num_classes)
    model = build_detector(args.detector, classes, found.get("size", args.size), input_size, **options)
    load_weights(model, state, checkpoint)
    return model, names


def export_layout(model: Detector, layout: str | None) -> str:
    """The ONNX layout to write: the one asked for, else Ultralytics' for YOLOv8 (what deployment
    code for Ultralytics' files reads), detprune's ``core()`` outputs for the rest."""
    return layout or ("ultralytics" if hasattr(model, "ultralytics_output") else "core")


def cmd_prune(args: argparse.Namespace) -> int:
    target = Target.parse(args.target)
    method = build_method(args.method, **parse_options(args.option))
    if args.export:  # the extra is there before anything is pruned (nothing is written otherwise)
        deploy.onnxruntime()
        deploy.onnx_module()
    train_set = build_dataset(args.data, "train", root=args.data_root)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    model, names = _load_model(checkpoint, args, len(train_set.classes))
    if args.detector and model.spec["name"] != args.detector:
        raise DetectorError(f"{checkpoint} holds a '{model.spec['name']}' detector, not '{args.detector}'")
    if model.spec["num_classes"] != len(train_set.classes):
        theirs = f" ({', '.join(names[:5])}...)" if names else ""
        raise DetectorError(
            f"{checkpoint} predicts {model.spec['num_classes']} classes{theirs}; {args.data} has "
            f"{len(train_set.classes)} ({', '.join(train_set.classes[:5])}...)"
        )
    model.to(torch.device(check_device(args.device))).eval()
    original = copy.deepcopy(model)
    val_set = build_dataset(args.data, "val", root=args.data_root)
    knobs = ("round_to", "max_layer_ratio", "tolerance", "calibration_images")
    pruned = prune_and_finetune(
        model,
        method,
        train_set,
        target,
        Schedule(epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr),
        prune={k: getattr(args, k) for k in knobs},
        seed=args.seed,
        val_set=val_set,
    )
    report = pruned.report
    device = torch.device(args.device)
    made = provenance.provenance(device) | provenance.environment(device)
    if args.export:  # checked against PyTorch before the checkpoint is written: both or neither
        layout = export_layout(model, args.layout)
        onnx_path = Path(args.out).with_suffix(".onnx")
        metadata = deploy.ultralytics_metadata(model, train_set.classes) if layout == "ultralytics" else None
        check = deploy.export_onnx(model, onnx_path, layout=layout, metadata=metadata)
    meta = {"prune_report": report.to_dict(), "provenance": made, "classes": list(train_set.classes)}
    save_checkpoint(model, Path(args.out), meta)
    achieved = ", ".join(f"{k} -{v:.1%}" for k, v in report.achieved.items())
    print(
        f"pruned with {method.name} to {target}: {achieved}; "
        f"{report.params_before / 1e6:.3f}M -> {report.params_after / 1e6:.3f}M params, "
        f"{report.gmacs_before:.3f} -> {report.gmacs_after:.3f} GMACs; wrote {args.out}"
    )
    if args.export:
        batch = "B" if layout == "core" and model.dynamic_batch else 1  # Ultralytics': batch 1
        print(
            f"wrote {onnx_path} ({layout} layout, input 'images' [{batch}, 3, {model.input_size}, "
            f"{model.input_size}]): ONNX Runtime matches PyTorch (max abs diff {check.max_abs_diff:.2g})"
        )
    metric = "ap50" if getattr(val_set, "metric", "ap") == "ap50" else "map"
    label = f"{'AP@0.5' if metric == 'ap50' else 'AP@[.5:.95]'} on the {args.data} validation split"
    before = evaluate(original, val_set, progress=False)[metric]
    after = evaluate(model, val_set, progress=False)[metric] if args.finetune_epochs > 0 else None
    tuned = (
        f"{100 * after:.1f} after {args.finetune_epochs} fine-tuning epochs"
        if after is not None
        else ("not fine-tuned (--finetune-epochs 0)")
    )
    print(f"{label}: {100 * before:.1f} before pruning, {100 * pruned.oneshot[metric]:.1f} one-shot, {tuned}")
    timing = measure.paired_latency(original, model, val_set[0][0])
    print(
        f"core() speed-up against the checkpoint it started from: {timing['speedup_core']:.2f}x "
        f"[95% CI {timing['speedup_core_lo']:.2f}, {timing['speedup_core_hi']:.2f}] "
        f"({timing['base_core_ms_median']:.2f} -> {timing['core_ms_median']:.2f} ms, "
        f"{torch.get_num_threads()} threads); GMACs ratio {report.gmacs_before / report.gmacs_after:.2f}x"
    )
    if deploy.available():  # the runtime an edge engineer deploys gives its own speed-up
        with tempfile.TemporaryDirectory() as folder:
            ort = deploy.paired_onnx_latency(original, model, Path(folder))
        version = deploy.onnxruntime().__version__
        print(
            f"ONNX Runtime {version} (CPU) core() speed-up: {ort['speedup_ort']:.2f}x "
            f"[95% CI {ort['speedup_ort_lo']:.2f}, {ort['speedup_ort_hi']:.2f}] "
            f"({ort['base_ort_core_ms_median']:.2f} -> {ort['ort_core_ms_median']:.2f} ms); both exports "
            f"match PyTorch (max abs difference {ort['export_max_abs_diff']:.2g})"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    model, meta = load_checkpoint(Path(args.checkpoint))
    out = Path(args.out)
    layout = args.layout or "core"
    metadata = deploy.ultralytics_metadata(model, meta.get("classes")) if layout == "ultralytics" else None
    check = deploy.export_onnx(model, out, atol=args.atol, rtol=args.rtol, layout=layout, metadata=metadata)
    spec = model.spec
    batch = "a dynamic batch axis" if model.dynamic_batch else "batch 1 (core() fixes it)"
    what = "core()" if layout == "core" else f"{layout} layout"
    print(
        f"exported {spec['name']}-{spec['size']} {what} at {spec['input_size']} px to {out}: input 'images', "
        f"{check.outputs} outputs, {batch}; ONNX Runtime {deploy.onnxruntime().__version__} "
        f"matches PyTorch (max abs difference {check.max_abs_diff:.2g}, "
        f"tolerance {args.atol:g} + {args.rtol:g} x max |torch|)"
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``prune`` and ``export`` subcommands."""
    pr = sub.add_parser("prune", help="prune a trained detector once and save the pruned checkpoint")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--method", required=True)
    pr.add_argument("--target", required=True, help="e.g. params:0.3, flops:0.4, channels:0.5")
    pr.add_argument("--data", required=True, help=f"calibration dataset: one of {', '.join(dataset_names())}")
    pr.add_argument("--data-root", default=None)
    pr.add_argument("--out", required=True)
    pr.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a method option; repeatable"
    )
    pr.add_argument(
        "--detector",
        default=None,
        help="needed for a plain state_dict checkpoint; yolov8 also reads Ultralytics' names, "
        "yolov7 the official repository's (size, classes, anchors from the file)",
    )
    pr.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read a pickled training checkpoint (Ultralytics' best.pt): runs code from the file; "
        "needs the ultralytics extra",
    )
    pr.add_argument(
        "--detector-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detector option for a plain state_dict (e.g. coco_labels=true); repeatable",
    )
    pr.add_argument("--size", default=None, help="default: the detector's own (tiny; full for tv:*)")
    pr.add_argument(
        "--input-size",
        type=int,
        default=None,
        help=f"default {DEFAULT_INPUT_SIZE}; {FOREIGN_INPUT_SIZE} for a file in Ultralytics' or "
        "yolov7's names",
    )
    pr.add_argument("--round-to", type=int, default=PRUNE_DEFAULTS["round_to"])
    pr.add_argument("--max-layer-ratio", type=float, default=PRUNE_DEFAULTS["max_layer_ratio"])
    pr.add_argument(
        "--tolerance", type=float, default=PRUNE_DEFAULTS["tolerance"], help="budget band around the target"
    )
    pr.add_argument("--calibration-images", type=int, default=PRUNE_DEFAULTS["calibration_images"])
    pr.add_argument("--finetune-epochs", type=int, default=0)
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--lr", type=float, default=0.01)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", default="cpu")
    pr.add_argument(
        "--export",
        choices=("onnx",),
        default=None,
        help="also write the pruned model as ONNX beside --out (.onnx), checked on ONNX Runtime",
    )
    layouts = ", ".join(deploy.LAYOUTS)
    pr.add_argument(
        "--layout",
        choices=tuple(deploy.LAYOUTS),
        default=None,
        help=f"the ONNX file's outputs ({layouts}); default: ultralytics for yolov8, else core",
    )
    pr.set_defaults(fn=cmd_prune)

    ex = sub.add_parser(
        "export", help="export a checkpoint's deployed core() to ONNX, checked on ONNX Runtime"
    )
    ex.add_argument("--checkpoint", required=True, help="a detprune checkpoint (detprune prune's output)")
    ex.add_argument("--out", required=True, help="the .onnx file to write (only once it checks)")
    ex.add_argument("--atol", type=float, default=deploy.ATOL, help="absolute tolerance of the check")
    ex.add_argument("--rtol", type=float, default=deploy.RTOL, help="relative tolerance of the check")
    ex.add_argument(
        "--layout",
        choices=tuple(deploy.LAYOUTS),
        default=None,
        help="core (default): core()'s outputs; ultralytics (YOLOv8): one [B, 4 + C, A] output "
        "as `yolo export format=onnx` writes",
    )
    ex.set_defaults(fn=cmd_export)
