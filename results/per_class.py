"""Per-class AP tables in DCODP's format (its Tables 1 and 2): one row per detector, method and
pruning ratio, one column per class, then the mean; written only for datasets whose rows carry
per-class AP (VOC). Figures are means over the seeds of a group, as in the main table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from results.aggregate import GROUP
from results.files import write_atomically, write_text

DEFINITIONS = {"ap": "area (VOC2010+)", "ap11": "11-point (VOC2007)"}


def _decoded(value: Any) -> dict[str, dict[str, float]] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        return json.loads(value)
    return None


def per_class_frame(df: pd.DataFrame, key: str = "ap") -> pd.DataFrame:
    """Mean per-class AP (``key``: "ap" area or "ap11" 11-point) per replicate group; empty when
    no row has per-class AP."""
    rows = []
    for ident, grp in df.groupby(GROUP, dropna=False, sort=False):
        tables = [t for t in map(_decoded, grp["per_class_ap"]) if t]
        if not tables:
            continue
        row = dict(zip(GROUP, ident, strict=True)) | {"n": len(tables)}
        for name in tables[0]:
            values = [t[name][key] for t in tables if not math.isnan(t[name][key])]
            row[name] = sum(values) / len(values) if values else math.nan
        scored = [row[name] for name in tables[0] if not math.isnan(row[name])]
        row["mAP"] = sum(scored) / len(scored) if scored else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def write_per_class(sub: pd.DataFrame, stem: Path, suite: str, dataset: str) -> list[Path]:
    """``<stem>_per_class.md`` (both AP definitions, ×100) and ``<stem>_per_class.csv`` (area AP,
    0..1, and the 11-point table below it in the markdown only); nothing when there is none."""
    frames = {key: per_class_frame(sub, key) for key in DEFINITIONS}
    if frames["ap"].empty:
        return []
    lines = [
        f"# {suite} — {dataset}: AP per class at IoU 0.5 (×100)",
        "",
        "VOC's evaluation: difficult objects neither count nor penalise. Each figure is the mean "
        "over the group's seeds (n); mAP is the mean over the classes with ground truth.",
        "",
    ]
    for key, frame in frames.items():
        classes = [c for c in frame.columns if c not in (*GROUP, "n", "mAP")]
        headers = ["Detector", "Method", "Target", "n", *classes, "mAP"]
        rows = [
            [r["detector"], r["method"] or "base", r["target"] or "-", str(r["n"])]
            + ["-" if math.isnan(r[c]) else f"{100 * r[c]:.1f}" for c in (*classes, "mAP")]
            for _, r in frame.iterrows()
        ]
        lines += [
            f"## AP, {DEFINITIONS[key]}",
            "",
            tabulate(rows, headers, tablefmt="pipe", disable_numparse=True),
        ]
        lines.append("")
    md, csv = Path(f"{stem}_per_class.md"), Path(f"{stem}_per_class.csv")
    write_text(md, "\n".join(lines))
    table = frames["ap"].drop(columns=["is_base"])
    write_atomically(
        csv, lambda tmp: table.to_csv(tmp, index=False, float_format="%.10g", lineterminator="\n")
    )
    return [md, csv]
