"""The batch-size table: each pruned row's ``core()`` speed-up at batch 1 (the main table's) and at
every other size its suite timed (``measure.batch_sizes``), per runtime. Speed-ups that appear
only at larger batches (a GPU filling its cores) are visible here, not in the main table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from results.files import write_text

HEADERS = ["Detector", "Method", "Target", "seed", "batch", "core ms", "speed-up [95% CI]", "eff."]
ORT_HEADERS = ["ORT ms", "ORT speed-up [95% CI]", "ORT eff."]
# a row's batch-1 figures, from the main table's columns
_FIGURES = (
    "core_ms_median", "speedup_core", "speedup_core_lo", "speedup_core_hi", "efficiency_core",
    "ort_core_ms_median", "speedup_ort", "speedup_ort_lo", "speedup_ort_hi", "efficiency_ort",
)  # fmt: skip


def _batches(text: str) -> dict[int, dict[str, Any]]:
    return {int(b): figures for b, figures in json.loads(text).items()} if text else {}


def _speedup(figures: dict[str, Any], name: str) -> str:
    point = figures.get(name, math.nan)
    if point is None or math.isnan(point):
        return "-"
    return f"{point:.2f} [{figures[f'{name}_lo']:.2f}, {figures[f'{name}_hi']:.2f}]"


def _number(figures: dict[str, Any], name: str) -> str:
    value = figures.get(name)
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def write_batches(rows: pd.DataFrame, stem: Path, suite: str, dataset: str) -> list[Path]:
    """``<stem>_batches.md`` where some row of ``rows`` (normalised, ordered) was timed at
    another batch size; nothing (and no file) otherwise."""
    pruned = rows[~rows["is_base"] & (rows["batch_timings"] != "")]
    if pruned.empty:
        return []
    ort = bool(pruned["speedup_ort"].notna().any())
    table = []
    for r in pruned.itertuples(index=False):
        at_one = {name: getattr(r, name) for name in _FIGURES}
        for batch, figures in sorted({1: at_one, **_batches(r.batch_timings)}.items()):
            line = [r.detector, r.method, r.target, str(int(r.seed)), str(batch),
                    _number(figures, "core_ms_median"), _speedup(figures, "speedup_core"),
                    _number(figures, "efficiency_core")]  # fmt: skip
            if ort:
                line += [_number(figures, "ort_core_ms_median"), _speedup(figures, "speedup_ort"),
                         _number(figures, "efficiency_ort")]  # fmt: skip
            table.append(line)
    headers = HEADERS + (ORT_HEADERS if ort else [])
    align = ("left",) * 3 + ("right",) * (len(headers) - 3)
    body = tabulate(table, headers=headers, tablefmt="pipe", colalign=align, disable_numparse=True)
    note = (
        f"# {suite} — {dataset}: speed-up by batch size\n\n"
        "core() on `batch` example images at once, pruned against its base in the same paired, "
        "interleaved rounds as batch 1 (the main table's columns); core ms: the pruned model's median "
        "per batch; eff. = speed-up ÷ the GMACs ratio. ORT: where the export's batch axis is dynamic.\n\n"
    )
    path = Path(f"{stem}_batches.md")
    write_text(path, note + body + "\n")
    return [path]
