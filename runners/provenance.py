"""Which code, libraries and machine made a row (DESIGN.md §8), and which stored rows are stale.

A row outlives the code that made it. Each row therefore records the harness's version (its git
commit and whether the harness's own files had uncommitted changes, or the installed package's
version where there is no git), a digest of the harness packages' sources, the versions of
Python, torch, torchvision, torch-pruning (and onnxruntime where it was used), the CPU, the
thread count, the GPU and its driver, and the date. A stored row whose ``code_digest`` differs
from this checkout's was computed by other code: ``detprune run`` and ``detprune report`` count
such rows, ``git`` names the files that differ where it can, and ``--recompute stale`` redoes them.

The digest covers the packages whose code determines a figure: ``methods``, ``detectors``,
``datasets``, ``runners`` (their ``.py`` files; the reporters in ``results`` only format figures,
and suite files change cell ids, not code). It is what "the same code" means here, with or
without git, committed or not.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

# the harness packages whose sources determine a row's figures
HARNESS_PACKAGES: tuple[str, ...] = ("methods", "detectors", "datasets", "runners")
# the provenance columns of a row, in the store's order (see results/store.py)
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "harness_version", "harness_commit", "harness_dirty", "code_digest", "python", "torch",
    "torchvision", "torch_pruning", "onnxruntime", "gpu_driver",
)  # fmt: skip
_LIBRARIES = {"torch": "torch", "torchvision": "torchvision", "torch_pruning": "torch-pruning"}


def source_root() -> Path:
    """The folder holding the harness packages (the checkout, for an editable install)."""
    import methods  # noqa: PLC0415 - the packages locate themselves

    return Path(methods.__file__).resolve().parent.parent


def _sources(root: Path) -> list[Path]:
    found = (p for pkg in HARNESS_PACKAGES for p in (root / pkg).rglob("*.py"))
    return sorted(p for p in found if "__pycache__" not in p.parts)


@functools.cache
def code_digest() -> str:
    """SHA-256 (16 hex digits) over the harness packages' ``.py`` files, by path and content."""
    root = source_root()
    digest = hashlib.sha256()
    for path in _sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _git(*args: str) -> str | None:
    """``git -C <source root> ARGS``'s output, or None where there is no git or no repository."""
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(source_root()), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@functools.cache
def harness() -> dict[str, Any]:
    """The harness's version: package version, git commit and whether its packages were dirty.
    ``$DETPRUNE_COMMIT``, where set, names the commit a copy was made from, before git: a copy
    on another machine may sit in an older checkout's ``.git`` (measured: the device machine's
    copy reported the session's first commit). Dirty is then unknown; the code digest says
    whether the copy is that commit's code."""
    try:
        version = importlib.metadata.version("detprune")
    except importlib.metadata.PackageNotFoundError:
        version = None
    commit, dirty = os.environ.get("DETPRUNE_COMMIT") or None, None
    if commit is None:
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--", *HARNESS_PACKAGES, "pyproject.toml")
        dirty = None if commit is None or status is None else int(bool(status.strip()))
    return {
        "harness_version": version,
        "harness_commit": commit.strip() if commit else None,
        "harness_dirty": dirty,
        "code_digest": code_digest(),
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def gpu_driver() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``), or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return lines[0].strip() if lines else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device, runtimes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The provenance columns of a row computed now on ``device``; ``runtimes``: the inference
    runtimes the row used besides PyTorch (``"onnxruntime"``), whose versions it records."""
    cuda = device.type == "cuda"
    return {
        **harness(),
        "python": platform.python_version(),
        **{column: _version(dist) for column, dist in _LIBRARIES.items()},
        "torch": str(torch.__version__),  # with its build tag (+cpu, +cu130): which wheel ran
        "onnxruntime": _version("onnxruntime") if "onnxruntime" in runtimes else None,
        "gpu_driver": gpu_driver() if cuda else None,
    }


def environment(device: torch.device) -> dict[str, Any]:
    """The machine a row ran on: threads, CPU, GPU, device (the row's own columns), and CUDA's
    version where it was used."""
    cuda = device.type == "cuda"
    return {
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(device) if cuda else "",
        "device": str(device),
        "cuda": str(torch.version.cuda) if cuda else None,
    }


def stale(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows computed by code other than this checkout's harness packages (or by unknown code:
    a row from before rows recorded their code)."""
    here = code_digest()
    return [r for r in rows if r.get("code_digest") != here]


def changed_files(commit: str) -> list[str] | None:
    """The harness files that differ between ``commit`` and this checkout (working tree
    included), where git can tell; None where it cannot (no git, or the commit is unknown here)."""
    out = _git("diff", "--name-only", commit, "--", *HARNESS_PACKAGES)
    if out is None:
        return None
    return sorted(line for line in out.splitlines() if line.strip())


def describe_stale(rows: list[dict[str, Any]], limit: int = 8) -> list[str]:
    """Lines saying how many of ``rows`` are stale and, where git can tell, which files differ."""
    old = stale(rows)
    if not old:
        return []
    unknown = [r for r in old if not r.get("code_digest")]
    lines = [
        f"{len(old)} of {len(rows)} finished rows were computed by other code than this checkout's "
        f"({', '.join(HARNESS_PACKAGES)}"
        + (f"; {len(unknown)} by unknown code, written before rows recorded it" if unknown else "")
        + "): `detprune run SUITE --recompute stale` redoes them"
    ]
    by_commit: dict[str, int] = {}
    for r in old:
        if r.get("harness_commit"):
            by_commit[r["harness_commit"]] = by_commit.get(r["harness_commit"], 0) + 1
    for commit, count in sorted(by_commit.items()):
        files = changed_files(commit)
        dirty = any(r.get("harness_dirty") for r in old if r.get("harness_commit") == commit)
        note = " (their tree had uncommitted changes: the list is against the commit)" if dirty else ""
        if files is None:
            lines.append(f"  {count} rows from commit {commit[:10]}: not in this repository{note}")
        elif not files:
            lines.append(f"  {count} rows from commit {commit[:10]}: uncommitted changes differ{note}")
        else:
            more = f" and {len(files) - limit} more" if len(files) > limit else ""
            shown = ", ".join(files[:limit]) + more
            what = f"{len(files)} files differ: {shown}"
            lines.append(f"  {count} rows from commit {commit[:10]}: {what}{note}")
    return lines
