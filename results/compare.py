"""A run beside the committed reference run of the same suite, row by row.

The reference tables were measured on the project's development machine; a user's run is
measured on theirs. Figures move between CPU models (floating-point rounding, amplified by
training), so the comparison names both machines and shows the differences, it does not judge
them: within one run, methods compare; across machines, only the pattern should.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from tabulate import tabulate

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
KEY = ["dataset", "detector", "regime", "method", "target", "seed"]


def reference_store(suite: str) -> Path | None:
    """The committed reference store of ``suite``, if there is one."""
    path = REFERENCE_DIR / suite / "results.sqlite"
    return path if path.is_file() else None


def _machine(df: pd.DataFrame) -> str:
    cpus = ", ".join(sorted({str(c) for c in df["cpu"].dropna()} - {""})) or "unknown CPU"
    threads = ", ".join(sorted({str(int(t)) for t in df["threads"].dropna()})) or "?"
    return f"{cpus}, {threads} threads"


def _metric(df: pd.DataFrame) -> str:
    return "ap50" if set(df["metric"].dropna()) == {"ap50"} else "map"


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _times(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def compare(run: pd.DataFrame, reference: pd.DataFrame) -> str:
    """Markdown: per dataset, each of this run's rows with the reference row of the same
    detector, method, target and seed (mAP, one-shot mAP and speed-up, there and here)."""
    numbers = ["seed", "threads", "map", "ap50", "oneshot_map", "oneshot_ap50", "speedup_core"]
    run, reference = run.copy(), reference.copy()
    for df in (run, reference):
        df[numbers] = df[numbers].apply(pd.to_numeric, errors="coerce")
        df["target"] = df["target"].fillna("")
    out = [f"Reference machine: {_machine(reference)}. This machine: {_machine(run)}."]
    for dataset in sorted(set(run["dataset"])):
        here = run[run["dataset"] == dataset]
        there = reference[reference["dataset"] == dataset].set_index(KEY)
        metric = _metric(here)
        rows = []
        for r in here.sort_values(KEY).itertuples(index=False):
            key = tuple(getattr(r, k) for k in KEY)
            ref = there.loc[[key]].iloc[0] if key in there.index else pd.Series(dtype=float)
            ref_map, here_map = float(ref.get(metric, math.nan)), getattr(r, metric)
            shown = r.method if r.target else ("base" if r.regime == "plain" else f"base ({r.regime})")
            rows.append([
                r.detector, shown, r.target or "-", int(r.seed), _pct(ref_map), _pct(here_map),
                "-" if math.isnan(here_map - ref_map) else f"{100 * (here_map - ref_map):+.1f}",
                _pct(ref.get(f"oneshot_{metric}", math.nan)), _pct(getattr(r, f"oneshot_{metric}")),
                _times(ref.get("speedup_core", math.nan)), _times(r.speedup_core),
            ])  # fmt: skip
        headers = ["Detector", "Method", "Target", "Seed", "mAP ref", "mAP here", "Δ",
                   "1-shot ref", "1-shot here", "speed-up ref", "speed-up here"]  # fmt: skip
        out += ["", f"### {dataset} (mAP = {'AP@0.5' if metric == 'ap50' else 'AP@[.5:.95]'}, ×100)", ""]
        out.append(tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True))
    return "\n".join(out)
