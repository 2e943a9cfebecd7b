"""Seeds as replicates: one summary row per (detector, regime, method, target, fine-tuning)
with the mean, standard deviation and count of every figure, and which rows a reviewer cannot
tell apart from the best one at the same target.

A difference smaller than the spread over seeds is not a finding. The spread of a difference
between two rows is ``sqrt(std_a² + std_b²)`` (their seed-to-seed standard deviations); a row
whose mean is within that of the best row's is marked ``≈``. With one seed there is no spread:
nothing is marked, and the table says so.
"""

from __future__ import annotations

import math

import pandas as pd

GROUP = ["detector", "regime", "is_base", "method", "target_kind", "target_rate", "target", "finetune_epochs"]
FIGURES = [
    "achieved_params_pr", "achieved_flops_pr", "achieved_channels_pr", "params_m", "gmacs", "gflops",
    "map", "ap50", "ap75", "aps", "apm", "apl", "voc_ap", "voc_ap11", "oneshot_map", "oneshot_ap50",
    "core_ms_median", "core_ms_p90", "predict_ms_median", "predict_ms_p90", "base_core_ms_median",
    "base_predict_ms_median", "speedup_core", "speedup_core_lo", "speedup_core_hi", "speedup_predict",
    "speedup_predict_lo", "speedup_predict_hi", "efficiency_core",
]  # fmt: skip
# timed on ONNX Runtime too (a suite's measure.runtimes): summarised only where a row has them
ORT_FIGURES = [
    "ort_core_ms_median", "base_ort_core_ms_median", "speedup_ort", "speedup_ort_lo", "speedup_ort_hi",
    "efficiency_ort",
]  # fmt: skip


def figures(df: pd.DataFrame) -> list[str]:
    """The figures to summarise: every one, ONNX Runtime's where some row was timed on it."""
    ort = "speedup_ort" in df and bool(df["speedup_ort"].notna().any())
    return FIGURES + ORT_FIGURES if ort else list(FIGURES)


BEST, WITHIN, APART = "best", "≈", ""


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per group: ``<figure>`` the mean, ``<figure>_std`` the std (NaN for one seed),
    ``n`` the number of seeds, plus the group's identity and the machines it ran on."""
    out, names = [], figures(df)
    for key, grp in df.groupby(GROUP, dropna=False, sort=False):
        row = dict(zip(GROUP, key, strict=True))
        row["n"] = len(grp)
        row["seeds"] = ", ".join(str(int(s)) for s in sorted(grp["seed"].dropna()))
        for name in names:
            values = grp[name].dropna()
            row[name] = values.mean() if len(values) else math.nan
            row[f"{name}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        row["cell_id"] = min(grp["cell_id"])
        # what any replicate's training loss showed that it should not ("" when all were "ok")
        health = grp["train_health"] if "train_health" in grp else pd.Series(dtype=object)
        row["health"] = "; ".join(sorted({str(h) for h in health.dropna()} - {"", "ok"}))
        out.append(row)
    columns = [*GROUP, "n", "seeds", *names, *(f"{f}_std" for f in names), "cell_id", "health"]
    return pd.DataFrame(out, columns=columns)


def mark_within_spread(summary: pd.DataFrame, metric: str) -> pd.Series:
    """Per pruned row: ``best`` (highest mean at its detector, target and fine-tuning), ``≈``
    (within the spread of the difference), ``""`` (apart), NaN where no spread is known."""
    marks = pd.Series([math.nan] * len(summary), index=summary.index, dtype=object)
    pruned = summary[~summary["is_base"].astype(bool)]
    for _, grp in pruned.groupby(["detector", "target", "finetune_epochs"], dropna=False):
        grp = grp.dropna(subset=[metric])
        if grp.empty:
            continue
        best = grp[metric].idxmax()
        marks[best] = BEST
        for i, row in grp.iterrows():
            if i == best:
                continue
            spread = math.sqrt(row[f"{metric}_std"] ** 2 + grp.loc[best, f"{metric}_std"] ** 2)
            if not math.isnan(spread):
                marks[i] = WITHIN if grp.loc[best, metric] - row[metric] <= spread else APART
    return marks
