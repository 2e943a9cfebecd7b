"""The results frame as the reporters read it: every store column with clean types, base rows
marked, GFLOPs added, a suite's alignment axis named in the Method column, and one fixed row
order, so a table regenerated from the same store is byte-identical."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pandas as pd

from results.store import COLUMN_NAMES, COLUMNS

_NUMERIC = [name for name, sqltype in COLUMNS if sqltype in ("REAL", "INTEGER")]
_TEXT = [name for name, sqltype in COLUMNS if sqltype == "TEXT"]


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def normalised(frame: pd.DataFrame) -> pd.DataFrame:
    """Give a frame every store column with clean types, so hand-made frames work too."""
    df = frame.reindex(columns=list(COLUMN_NAMES)).copy()
    for name in _NUMERIC:
        df[name] = pd.to_numeric(df[name], errors="coerce").astype("float64")
    for name in _TEXT:
        df[name] = df[name].map(_text)
    df["regime"] = df["regime"].replace("", "plain")
    df["is_base"] = df["target"] == ""
    df["gflops"] = 2.0 * df["gmacs"]
    # a suite whose round_to is an axis: each alignment its own row, named in the Method column
    aligned = df["config"].map(_round_to).where(~df["is_base"])
    if aligned.nunique() > 1:
        named = zip(df["method"], aligned, strict=True)
        df["method"] = [m if pd.isna(r) else f"{m} (round_to {int(r)})" for m, r in named]
    return df


_ALIGNED = re.compile(r"(.*) \(round_to (\d+)\)")


def _round_to(config: str) -> float:
    """The channel alignment a pruned row was made with (its ``config``'s ``prune.round_to``)."""
    try:
        return float(json.loads(config)["prune"]["round_to"])
    except (ValueError, KeyError, TypeError):
        return math.nan


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Per detector and regime ("plain" first): the base row, then method x target by rate
    (then fine-tuning epochs and seed, where the frame has them)."""

    def num(v: Any) -> float:
        return -1.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def key(r: Any) -> tuple:
        name, aligned = _method_order(r.method)
        return (r.detector, r.regime != "plain", r.regime, not r.is_base, name, r.target_kind,
                num(r.target_rate), r.target, aligned, num(r.finetune_epochs), num(getattr(r, "seed", -1)),
                r.cell_id)  # fmt: skip

    keys = [key(r) for r in df.itertuples(index=False)]
    order = sorted(range(len(df)), key=keys.__getitem__)
    return df.iloc[order].reset_index(drop=True)


def _method_order(method: str) -> tuple[str, int]:
    """A method's rows by name, then by alignment in numeric order (``round_to 8`` before 16)."""
    found = _ALIGNED.fullmatch(method)
    return (found.group(1), int(found.group(2))) if found else (method, -1)
