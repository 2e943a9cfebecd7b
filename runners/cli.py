"""``detprune``: run suites, regenerate tables, list what exists, prune one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from datasets import DatasetError, dataset_names
from detectors import DetectorError, detector_names
from methods import MethodError, method_names
from results import ResultStore, StoreError, compare, reference_store

from . import deploy, faults, one_model, verify
from .executors import Driver, executor_names, get_executor
from .inputs import check_device
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

    one_model.add_parsers(sub)
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
