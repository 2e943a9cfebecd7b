"""The lines of a table that say which code, libraries and machines its rows came from.

Built from the rows themselves (each row records them: ``runners/provenance.py``), so a table
holding rows of two machines or two versions of the harness names both, with how many rows each
made, instead of one line that hides the mix. Rows written before rows recorded their code read
"unknown".
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

UNKNOWN = "unknown"
# (column, how the line names it)
_LIBRARIES = (
    ("python", "Python"), ("torch", "torch"), ("torchvision", "torchvision"),
    ("torch_pruning", "torch-pruning"), ("onnxruntime", "onnxruntime"),
)  # fmt: skip


def _blank(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _text(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def counted(values: pd.Series, missing: str | None = UNKNOWN) -> str:
    """The distinct values, each with its row count when there are several; blank values are
    ``missing`` (left out where ``missing`` is None)."""
    labels = [missing if _blank(v) else _text(v) for v in values]
    labels = [label for label in labels if label is not None]
    counts = pd.Series(labels, dtype="object").value_counts()
    if counts.empty:
        return UNKNOWN
    if len(counts) == 1:
        return str(counts.index[0])
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{label} ({n} rows)" for label, n in ordered)


def harness_label(row: Any) -> str:
    """A row's harness: ``<commit>`` (``+uncommitted`` where its packages were dirty), the
    package version where there was no git, or unknown."""
    commit = getattr(row, "harness_commit", None)
    if not _blank(commit):
        dirty = getattr(row, "harness_dirty", None)
        return str(commit)[:10] + ("+uncommitted" if not _blank(dirty) and int(dirty) else "")
    version, digest = getattr(row, "harness_version", None), getattr(row, "code_digest", None)
    if not _blank(version):
        return f"{version} (no git)"
    return f"code {digest} (no git)" if not _blank(digest) else UNKNOWN


def code_line(df: pd.DataFrame) -> str:
    """``Code: detprune <commit> ...; Python ...; torch ...``: what made the rows."""
    columns = ["harness_commit", "harness_dirty", "harness_version", "code_digest", *dict(_LIBRARIES)]
    frame = df.reindex(columns=columns)
    harness = pd.Series([harness_label(r) for r in frame.itertuples(index=False)], dtype="object")
    parts = [f"detprune {counted(harness)}"]
    for column, name in _LIBRARIES:
        if column == "onnxruntime" and frame[column].map(_blank).all():
            continue  # no row used it
        # a row that used no ONNX Runtime (a base row, a suite timing PyTorch only) names none
        parts.append(f"{name} {counted(frame[column], None if column == 'onnxruntime' else UNKNOWN)}")
    line = "Code: " + "; ".join(parts) + "."
    if (harness == UNKNOWN).any():
        line += " unknown: written before rows recorded their code (stale until recomputed)."
    return line


def machine_line(df: pd.DataFrame) -> str:
    """``Machine: CPU ...; threads; device; GPU and driver``, several machines each with its rows."""
    frame = df.reindex(columns=["cpu", "threads", "device", "gpu", "gpu_driver", "input_size"])
    line = f"Machine: CPU {counted(frame['cpu'])}; {counted(frame['threads'])} threads; "
    line += f"device {counted(frame['device'])}"
    if not frame["gpu"].map(_blank).all():
        line += f"; GPU {counted(frame['gpu'], missing=None)}"
        if not frame["gpu_driver"].map(_blank).all():
            line += f", driver {counted(frame['gpu_driver'], missing=None)}"
    return line + f"; input size {counted(frame['input_size'])} px, batch 1."
