"""``detprune verify [SUITE]``: every file a store's rows reference, re-hashed.

A row names the baseline it started from, the pruned checkpoint it wrote and the data it read.
Those files live outside the store (``.detprune/`` by default) and can be deleted, truncated or
overwritten after the row was written; the row's figures then describe a model nobody can load
again. Checkpoints are checked against the SHA-256 written beside them, a synthetic set against
its manifest's per-file checksums, real data folders for existence (their files carry no record).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from datasets.synthetic import damage
from detectors.checkpoints import ChecksumError, verify


def _checkpoint_problem(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        verify(path, required=True)
    except ChecksumError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def _data_problem(path: Path) -> str | None:
    if path.name.startswith("synthetic-"):
        return damage(path)
    return None if path.is_dir() else "missing"


def referenced(frame: pd.DataFrame) -> list[tuple[str, Path]]:
    """The distinct (kind, path) pairs the rows reference: checkpoints and data folders."""
    found: dict[Path, str] = {}
    kinds = (("baseline_path", "checkpoint"), ("model_path", "checkpoint"), ("data_path", "data"))
    for column, kind in kinds:
        if column not in frame:
            continue
        for value in frame[column].dropna():
            if str(value):
                found.setdefault(Path(str(value)), kind)
    return [(kind, path) for path, kind in sorted(found.items(), key=lambda kv: str(kv[0]))]


def problems(files: Iterable[tuple[str, Path]]) -> list[tuple[Path, str]]:
    """Each referenced file that is missing or fails its checksum, with what is wrong."""
    found = []
    for kind, path in files:
        problem = _checkpoint_problem(path) if kind == "checkpoint" else _data_problem(path)
        if problem is not None:
            found.append((path, problem))
    return found
