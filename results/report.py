"""Tables and plots from stored results, in the papers' formats; never re-runs a cell.

Everything here is a pure function of the results frame, with a fixed row order and fixed
number formatting, so regenerating from the same store rewrites byte-identical markdown and
CSV files and the committed tables only change when a result does.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tabulate import tabulate

from results.store import COLUMN_NAMES, COLUMNS

METRIC_NAMES = {"ap": "AP@[.5:.95]", "ap50": "AP@0.5"}
METRIC_COLUMNS = {"ap": "map", "ap50": "ap50"}  # the store column a metric's "mAP" is read from
HEADERS = (
    "Detector", "Method", "Target", "PR%", "FLOPs↓%", "GMACs", "GFLOPs", "Params (M)",
    "mAP", "AP50", "core ms", "core p90", "predict ms",
)  # fmt: skip
MISSING = "-"
_METRIC_LABEL = {METRIC_COLUMNS[k]: v for k, v in METRIC_NAMES.items()}
_NUMERIC = [name for name, sqltype in COLUMNS if sqltype in ("REAL", "INTEGER")]
_TEXT = [name for name, sqltype in COLUMNS if sqltype == "TEXT"]
# The CSV: identity of the cell, then every number the store holds (plus GFLOPs).
CSV_COLUMNS = [
    "detector", "regime", "method", "target", "target_kind", "target_rate", "seed", "input_size",
    "metric", "achieved_params_pr", "achieved_flops_pr", "achieved_channels_pr", "params_m",
    "gmacs", "gflops", "map", "ap50", "ap75", "aps", "apm", "apl", "core_ms_median", "core_ms_p90",
    "predict_ms_median", "predict_ms_p90", "threads", "cpu", "gpu", "device", "train_seconds",
    "prune_seconds", "finetune_seconds", "eval_seconds", "cell_id",
]  # fmt: skip


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Give a frame every store column with clean types, so hand-made frames work too."""
    df = frame.reindex(columns=list(COLUMN_NAMES)).copy()
    for name in _NUMERIC:
        df[name] = pd.to_numeric(df[name], errors="coerce").astype("float64")
    for name in _TEXT:
        df[name] = df[name].map(_text)
    df["regime"] = df["regime"].replace("", "plain")
    df["is_base"] = df["target"] == ""
    df["gflops"] = 2.0 * df["gmacs"]
    return df


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Per detector and regime ("plain" first): the base row, then method x target by rate."""

    def key(r: Any) -> tuple:
        rate = -1.0 if math.isnan(r.target_rate) else r.target_rate
        seed = -1.0 if math.isnan(r.seed) else r.seed
        return (r.detector, r.regime != "plain", r.regime, not r.is_base, r.method,
                r.target_kind, rate, r.target, seed, r.cell_id)  # fmt: skip

    keys = [key(r) for r in df.itertuples(index=False)]
    order = sorted(range(len(df)), key=keys.__getitem__)
    return df.iloc[order].reset_index(drop=True)


def _metric_column(df: pd.DataFrame) -> str:
    """The column holding the dataset's "mAP"; a table mixing two metrics would mislead."""
    found = sorted(set(df["metric"]) - {""})
    if len(found) > 1:
        raise ValueError(f"dataset {sorted(set(df['dataset']))} mixes metrics {found}")
    metric = found[0] if found else "ap"
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRIC_NAMES)}")
    return METRIC_COLUMNS[metric]


def _fmt(value: float, digits: int, scale: float = 1.0) -> str:
    return MISSING if math.isnan(value) else f"{value * scale:.{digits}f}"


def _display_method(r: Any) -> str:
    if not r.is_base:
        return r.method
    return "base" if r.regime == "plain" else f"base ({r.regime})"


def _table_rows(df: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]]]:
    """The formatted table: ordered rows, plus a Seed column when several seeds are stored."""
    df = _ordered(df)
    seeds = set(df["seed"].dropna())
    headers = list(HEADERS)
    if len(seeds) > 1:
        headers.insert(3, "Seed")
    rows = []
    for r in df.itertuples(index=False):
        row = [
            r.detector, _display_method(r), r.target or MISSING,
            _fmt(r.achieved_params_pr, 1, 100), _fmt(r.achieved_flops_pr, 1, 100),
            _fmt(r.gmacs, 3), _fmt(r.gflops, 3), _fmt(r.params_m, 3),
            _fmt(getattr(r, metric), 1, 100), _fmt(r.ap50, 1, 100),
            _fmt(r.core_ms_median, 2), _fmt(r.core_ms_p90, 2), _fmt(r.predict_ms_median, 2),
        ]  # fmt: skip
        if len(seeds) > 1:
            row.insert(3, _fmt(r.seed, 0))
        rows.append(row)
    return headers, rows


def _tabulate(headers: list[str], rows: list[list[str]], fmt: str) -> str:
    n_text = headers.index("Target") + 1
    align = ("left",) * n_text + ("right",) * (len(headers) - n_text)
    return tabulate(rows, headers=headers, tablefmt=fmt, colalign=align, disable_numparse=True)


def render_table(frame: pd.DataFrame, dataset: str | None = None) -> str:
    """One dataset's markdown table (for the CLI); ``dataset`` picks one from a wider frame."""
    df = _normalise(frame)
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    datasets = sorted(set(df["dataset"]))
    if len(datasets) != 1:
        raise ValueError(f"render_table needs exactly one dataset; the frame has {datasets}")
    return _tabulate(*_table_rows(df, _metric_column(df)), "pipe")


def _distinct(df: pd.DataFrame, column: str) -> str:
    values = sorted({str(int(v)) if isinstance(v, float) else v for v in df[column].dropna()} - {""})
    return ", ".join(values) if values else "unknown"


def _header_lines(df: pd.DataFrame, suite: str, dataset: str, metric: str) -> list[str]:
    machine = f"Machine: CPU {_distinct(df, 'cpu')}; {_distinct(df, 'threads')} threads; "
    machine += f"device {_distinct(df, 'device')}"
    if _distinct(df, "gpu") != "unknown":
        machine += f"; GPU {_distinct(df, 'gpu')}"
    return [
        f"# {suite} — {dataset}",
        "",
        f"{machine}; input size {_distinct(df, 'input_size')} px, batch 1.",
        "",
        f"mAP = {_METRIC_LABEL[metric]} (×100); AP50 = AP@0.5 (×100). PR% = achieved parameter "
        "reduction. GMACs by fvcore on core() (NMS excluded); GFLOPs = 2 × GMACs. "
        "Latency: median and p90 in ms.",
        "",
        *_core_conditions(df),
    ]


def _core_conditions(df: pd.DataFrame) -> list[str]:
    """What a detector's core() fixes for FLOPs and latency (Faster R-CNN's proposals), per detector."""
    stated: dict[str, str] = {}
    for detector, env in zip(df["detector"], df["env"], strict=True):
        try:
            conditions = json.loads(env).get("core_conditions") or {}
        except (TypeError, ValueError, AttributeError):
            continue
        if conditions:
            stated[detector] = ", ".join(f"{k} = {v}" for k, v in sorted(conditions.items()))
    return [f"{d}: core() is measured with {c}.\n" for d, c in sorted(stated.items())]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "dataset"


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    out = _ordered(df)[CSV_COLUMNS].copy()
    for name in ("seed", "input_size", "threads"):
        out[name] = out[name].astype("Int64")
    out.to_csv(path, index=False, float_format="%.10g", lineterminator="\n")


def _method_colors(df: pd.DataFrame) -> dict[str, Any]:
    """One colour per method for the whole dataset, so a method looks the same in every panel."""
    cmap = colormaps["tab10"]
    methods = sorted(set(df.loc[~df["is_base"], "method"]))
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _panels(detectors: list[str], title: str) -> tuple[Figure, list[Any]]:
    ncols = min(len(detectors), 3)
    nrows = math.ceil(len(detectors) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 4.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[len(detectors) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[: len(detectors)]


def _label(method: str, regime: str) -> str:
    return method if regime == "plain" else f"{method} ({regime})"


def _series(sub: pd.DataFrame, metric: str, x: str) -> list[tuple[str, str, pd.DataFrame]]:
    """(method, label, rows sorted by x) per pruned series; a regime other than plain is its own."""
    rows = sub[~sub["is_base"]].dropna(subset=[x, metric])
    out = []
    for (regime, method), grp in rows.groupby(["regime", "method"]):
        out.append((method, _label(method, regime), grp.sort_values([x, "cell_id"])))
    return sorted(out, key=lambda s: (s[0], s[1]))


def _finish(ax: Any, det: str, xlabel: str, metric: str) -> None:
    ax.set_title(det)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"mAP ({_METRIC_LABEL[metric]}, %)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _plot_map_vs_pr(df: pd.DataFrame, metric: str, title: str, path: Path) -> None:
    """Per detector: one line per method over achieved PR%, the base as a dashed level."""
    detectors = sorted(set(df["detector"]))
    colors = _method_colors(df)
    fig, axes = _panels(detectors, title)
    for ax, det in zip(axes, detectors, strict=True):
        sub = df[df["detector"] == det]
        bases = sub[sub["is_base"]].dropna(subset=[metric])
        for regime, base in bases.groupby("regime"):
            style = "--" if regime == "plain" else ":"
            ax.axhline(base[metric].mean() * 100, color="black", linestyle=style,
                       label=_label("base", regime))  # fmt: skip
        for method, label, rows in _series(sub, metric, "achieved_params_pr"):
            ax.plot(rows["achieved_params_pr"] * 100, rows[metric] * 100, marker="o",
                    color=colors[method], label=label)  # fmt: skip
        _finish(ax, det, "achieved parameter reduction PR (%)", metric)
    fig.savefig(path, dpi=100)


def _plot_map_vs_latency(df: pd.DataFrame, metric: str, title: str, path: Path) -> None:
    """Per detector: mAP against median core() latency, one marker series per method."""
    detectors = sorted(set(df["detector"]))
    colors = _method_colors(df)
    fig, axes = _panels(detectors, title)
    for ax, det in zip(axes, detectors, strict=True):
        sub = df[df["detector"] == det]
        bases = sub[sub["is_base"]].dropna(subset=["core_ms_median", metric])
        for regime, base in bases.groupby("regime"):
            marker = "*" if regime == "plain" else "X"
            ax.scatter(base["core_ms_median"], base[metric] * 100, marker=marker, s=180,
                       color="black", label=_label("base", regime), zorder=3)  # fmt: skip
        for method, label, rows in _series(sub, metric, "core_ms_median"):
            ax.scatter(rows["core_ms_median"], rows[metric] * 100, marker="o",
                       color=colors[method], label=label)  # fmt: skip
        _finish(ax, det, "core() latency, median (ms)", metric)
    fig.savefig(path, dpi=100)


def write_reports(frame: pd.DataFrame, out_dir: Path, suite: str) -> list[Path]:
    """Write md, csv, tex and two PNG plots per dataset under ``out_dir``; return the paths.

    ``frame`` is normally ``ResultStore.frame(suite)``; rows of every dataset in it are used.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = _normalise(frame)
    written: list[Path] = []
    for dataset in sorted(set(df["dataset"])):
        sub = df[df["dataset"] == dataset]
        metric = _metric_column(sub)
        headers, rows = _table_rows(sub, metric)
        stem = out_dir / _safe(dataset)

        md = Path(f"{stem}.md")
        lines = _header_lines(sub, suite, dataset, metric) + [_tabulate(headers, rows, "pipe"), ""]
        md.write_text("\n".join(lines), encoding="utf-8")

        csv = Path(f"{stem}.csv")
        _write_csv(sub, csv)

        tex = Path(f"{stem}.tex")
        body = _tabulate(headers, rows, "latex_booktabs").replace("↓", r"$\downarrow$")
        tex.write_text(f"% {suite} / {dataset}: mAP = {_METRIC_LABEL[metric]} (x100)\n{body}\n",
                       encoding="utf-8")  # fmt: skip

        title = f"{suite} / {dataset}"
        pr_png = Path(f"{stem}_map_vs_pr.png")
        _plot_map_vs_pr(sub, metric, f"{title}: mAP vs. pruning rate", pr_png)
        lat_png = Path(f"{stem}_map_vs_latency.png")
        _plot_map_vs_latency(sub, metric, f"{title}: mAP vs. core latency", lat_png)
        written += [md, csv, tex, pr_png, lat_png]
    return written
