"""``detprune``: run suites, regenerate tables, list what exists, prune one model."""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import tomllib
from pathlib import Path

import torch
from tqdm import tqdm

from datasets import DatasetError, build_dataset, dataset_names
from detectors import (
    ChecksumError,
    Detector,
    DetectorError,
    build_detector,
    detector_names,
    load_checkpoint,
    load_weights,
    read_state_dict,
    save_checkpoint,
)
from methods import PRUNE_DEFAULTS, MethodError, Target, build_method, method_names
from methods.engine.training import Schedule
from results import ResultStore, StoreError, compare, reference_store

from . import deploy, faults, measure, provenance, verify
from .evaluate import evaluate
from .executors import Driver, executor_names, get_executor
from .inputs import check_device
from .prune import prune_and_finetune
from .recompute import MODES, Recompute
from .suite import SuiteError, load_suite, parse_override, suite_names
from .tables import report_suite

USER_ERRORS = (
    DatasetError,
    DetectorError,
    MethodError,
    SuiteError,
    StoreError,
    deploy.DeployError,
    FileNotFoundError,
)


def _overrides(args: argparse.Namespace) -> dict:
    return dict(parse_override(text) for text in args.set or [])


def cmd_run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite, _overrides(args))
    jobs = args.jobs if args.jobs is not None else suite.jobs
    if jobs < 1:
        raise SuiteError(f"--jobs {jobs}: needs at least 1 worker")
    executor = get_executor(args.executor).from_args(args, jobs)
    driver = Driver(
        suite,
        args.results_dir,
        args.work_dir,
        args.device if executor.remote else check_device(args.device),  # a remote executor's: the workers'
        progress=not args.no_progress,
        retry_failed=not args.skip_failed,
        recompute=Recompute(args.recompute),
    )
    counts = driver.run(executor)
    failed = f", {counts['failed']} failed" if counts["failed"] else ""
    left = (
        f", {counts['left_failed']} failed before and left (--skip-failed)" if counts["left_failed"] else ""
    )
    print(
        f"suite {suite.name}: {counts['cells']} cells, {counts['ran']} run{failed}, "
        f"{counts['skipped']} already done{left}"
    )
    faults.reached("tables")
    paths = report_suite(args.suite, args.results_dir, suite.overrides)
    out_dir = Path(args.results_dir) / suite.name
    reference = reference_store(suite.name)
    if reference is not None and reference.resolve() != (out_dir / "results.sqlite").resolve():
        print(f"\n## {suite.name}: this run beside the reference run ({reference.parent})\n")
        ids = {c.cell_id for c in suite.cells()}
        here = ResultStore(out_dir).frame()
        print(compare(here[here["cell_id"].isin(ids)], ResultStore(reference).frame()))
    print(f"\ntables and plots of this run: {out_dir}/ ({len(paths)} files)")
    if counts["failed"]:
        print(
            f"detprune: {counts['failed']} cells failed, listed in {out_dir / 'failures.md'}; "
            "rerun to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    for path in report_suite(args.suite, args.results_dir, _overrides(args)):
        print(f"wrote {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every file the store(s) reference; exit 1 if one is missing or fails its checksum."""
    if args.suite:
        stores = [Path(args.results_dir) / load_suite(args.suite).name / "results.sqlite"]
        if not stores[0].is_file():
            raise SuiteError(f"no results for suite '{args.suite}' at {stores[0]}; run it first")
    else:
        stores = sorted(Path(args.results_dir).glob("*/results.sqlite"))
        if not stores:
            raise SuiteError(f"no results stores under {args.results_dir}/")
    bad = 0
    for path in stores:
        files = verify.referenced(ResultStore(path).frame())
        found = verify.problems(files)
        bad += len(found)
        print(f"{path}: {len(files)} files referenced, {len(found)} missing or failing their checksum")
        for file, problem in found:
            print(f"  {file}: {problem}")
    return 1 if bad else 0


def cmd_list(args: argparse.Namespace) -> int:
    print("methods:   " + ", ".join(method_names()))
    print("detectors: " + ", ".join(detector_names()))
    print("datasets:  " + ", ".join(dataset_names()))
    print("suites:    " + ", ".join(suite_names()))
    return 0


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


def _load_model(checkpoint: Path, args: argparse.Namespace, num_classes: int) -> Detector:
    """A detprune checkpoint, or a plain ``state_dict`` of the named ``--detector`` (trained
    elsewhere); one that does not fit is one line naming the first layer that does not."""
    try:
        return load_checkpoint(checkpoint)[0]
    except ChecksumError:
        raise
    except DetectorError:
        if not args.detector:
            raise DetectorError(f"{checkpoint} is not a detprune checkpoint: name its --detector") from None
    options = parse_options(args.detector_option)
    model = build_detector(args.detector, num_classes, args.size, args.input_size, **options)
    state = read_state_dict(checkpoint)
    load_weights(model, state, checkpoint)
    return model


def cmd_prune(args: argparse.Namespace) -> int:
    target = Target.parse(args.target)
    method = build_method(args.method, **parse_options(args.option))
    train_set = build_dataset(args.data, "train", root=args.data_root)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    model = _load_model(checkpoint, args, len(train_set.classes))
    if args.detector and model.spec["name"] != args.detector:
        raise DetectorError(f"{checkpoint} holds a '{model.spec['name']}' detector, not '{args.detector}'")
    if model.spec["num_classes"] != len(train_set.classes):
        raise DetectorError(
            f"{checkpoint} predicts {model.spec['num_classes']} classes; {args.data} has "
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
    save_checkpoint(model, Path(args.out), {"prune_report": report.to_dict(), "provenance": made})
    achieved = ", ".join(f"{k} -{v:.1%}" for k, v in report.achieved.items())
    print(
        f"pruned with {method.name} to {target}: {achieved}; "
        f"{report.params_before / 1e6:.3f}M -> {report.params_after / 1e6:.3f}M params, "
        f"{report.gmacs_before:.3f} -> {report.gmacs_after:.3f} GMACs; wrote {args.out}"
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
    model, _ = load_checkpoint(Path(args.checkpoint))
    out = Path(args.out)
    check = deploy.export_onnx(model, out, atol=args.atol, rtol=args.rtol)
    spec = model.spec
    batch = "a dynamic batch axis" if model.dynamic_batch else "batch 1 (core() fixes it)"
    print(
        f"exported {spec['name']}-{spec['size']} core() at {spec['input_size']} px to {out}: input 'images', "
        f"{check.outputs} outputs, {batch}; ONNX Runtime {deploy.onnxruntime().__version__} "
        f"matches PyTorch (max abs difference {check.max_abs_diff:.2g}, "
        f"tolerance {args.atol:g} + {args.rtol:g} x |torch|)"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def dirs(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--results-dir", type=Path, default=Path("results"), help="where results/<suite>/ lives"
        )
        sp.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a suite key, e.g. train.epochs=2 or input_size=320 (repeatable)",
        )

    run = sub.add_parser("run", help="run a suite (resumes where it stopped), then write its tables")
    run.add_argument("suite", help="a suite name (see `detprune list`) or a TOML file")
    dirs(run)
    run.add_argument(
        "--work-dir", type=Path, default=None, help="data, baselines, models (default .detprune)"
    )
    run.add_argument("--device", default="cpu")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--jobs", type=int, default=None, help="worker processes (default: the suite's `jobs`)")
    run.add_argument(
        "--executor",
        choices=executor_names(),
        default="local",
        help="; ".join(f"{name}: {get_executor(name).summary}" for name in executor_names()),
    )
    for name in executor_names():  # each executor's own options (Ray's --address, ...)
        get_executor(name).add_arguments(run)
    run.add_argument(
        "--recompute",
        choices=MODES,
        default="none",
        help="none: keep every finished cell; stale: redo the rows (and baselines) other code "
        "computed; all: redo every row and baseline",
    )
    run.add_argument(
        "--skip-failed",
        action="store_true",
        help="leave the cells that failed before (by default a rerun retries them)",
    )
    run.set_defaults(fn=cmd_run)

    rep = sub.add_parser("report", help="regenerate a suite's tables and plots from its store")
    rep.add_argument("suite")
    dirs(rep)
    rep.set_defaults(fn=cmd_report)

    ver = sub.add_parser("verify", help="re-hash the checkpoints and data a store's rows reference")
    ver.add_argument("suite", nargs="?", default=None, help="one suite (default: every store)")
    ver.add_argument("--results-dir", type=Path, default=Path("results"), help="where results/<suite>/ lives")
    ver.set_defaults(fn=cmd_verify)

    lst = sub.add_parser("list", help="list methods, detectors, datasets and suites")
    lst.set_defaults(fn=cmd_list)

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
    pr.add_argument("--detector", default=None, help="needed for a plain state_dict checkpoint")
    pr.add_argument(
        "--detector-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detector option for a plain state_dict (e.g. coco_labels=true); repeatable",
    )
    pr.add_argument("--size", default=None, help="default: the detector's own (tiny; full for tv:*)")
    pr.add_argument("--input-size", type=int, default=128)
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
    pr.set_defaults(fn=cmd_prune)

    ex = sub.add_parser(
        "export", help="export a checkpoint's deployed core() to ONNX, checked on ONNX Runtime"
    )
    ex.add_argument("--checkpoint", required=True, help="a detprune checkpoint (detprune prune's output)")
    ex.add_argument("--out", required=True, help="the .onnx file to write (only once it checks)")
    ex.add_argument("--atol", type=float, default=deploy.ATOL, help="absolute tolerance of the check")
    ex.add_argument("--rtol", type=float, default=deploy.RTOL, help="relative tolerance of the check")
    ex.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as exc:
        _close_bars()
        message = " ".join(str(exc).split())  # one line, whatever the exception's text held
        print(f"detprune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detprune: interrupted; finished cells are kept, rerun to resume", file=sys.stderr)
        return 130


def _close_bars() -> None:
    """Close what progress bars are open, so an error starts its own line, not a bar's remains."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
