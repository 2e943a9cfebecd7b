"""The plots of a dataset's summary: mAP against pruning rate, against paired speed-up, and
the recovery of mAP with fine-tuning epochs (error bars: the std over seeds); and the training
trajectory of a regime that logs one (LDT's terms, eigenvalues and gradient ratio per epoch)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from results.files import write_atomically

METRIC_LABEL = {"map": "AP@[.5:.95]", "ap50": "AP@0.5"}


def _colors(summary: pd.DataFrame) -> dict[str, Any]:
    """One colour per method for the whole dataset, so a method looks the same in every panel."""
    cmap = colormaps["tab10"]
    methods = sorted(set(summary.loc[~summary["is_base"], "method"]))
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


def _per_detector(
    summary: pd.DataFrame, title: str
) -> tuple[Figure, list[tuple[Any, str, pd.DataFrame]], Any]:
    """The figure, one (axis, detector, its rows) per panel, and the method colours."""
    detectors = sorted(set(summary["detector"]))
    fig, axes = _panels(detectors, title)
    panels = [(ax, det, summary[summary["detector"] == det]) for ax, det in zip(axes, detectors, strict=True)]
    return fig, panels, _colors(summary)


def _label(method: str, regime: str) -> str:
    return method if regime == "plain" else f"{method} ({regime})"


def _err(rows: pd.DataFrame, name: str, scale: float = 1.0) -> Any:
    std = rows[f"{name}_std"] * scale
    return None if std.isna().all() else std.fillna(0.0)


def _series(sub: pd.DataFrame, x: str, metric: str) -> list[tuple[str, str, pd.DataFrame]]:
    """(method, label, rows sorted by x) per pruned series at the longest fine-tuning."""
    rows = sub[~sub["is_base"]].dropna(subset=[x, metric])
    if rows["finetune_epochs"].notna().any():
        rows = rows[rows["finetune_epochs"] == rows["finetune_epochs"].max()]
    out = [
        (method, _label(method, regime), grp.sort_values([x, "cell_id"]))
        for (regime, method), grp in rows.groupby(["regime", "method"])
    ]
    return sorted(out, key=lambda s: (s[0], s[1]))


def _finish(ax: Any, det: str, xlabel: str, metric: str) -> None:
    ax.set_title(det)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"mAP ({METRIC_LABEL[metric]}, %)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _bases(ax: Any, sub: pd.DataFrame, metric: str) -> None:
    for regime, base in sub[sub["is_base"]].dropna(subset=[metric]).groupby("regime"):
        style = "--" if regime == "plain" else ":"
        ax.axhline(base[metric].mean() * 100, color="black", linestyle=style, label=_label("base", regime))


def plot_map_vs_pr(summary: pd.DataFrame, metric: str, title: str, path: Path) -> None:
    """Per detector: one line per method over achieved PR%, the base as a dashed level."""
    fig, panels, colors = _per_detector(summary, title)
    for ax, det, sub in panels:
        _bases(ax, sub, metric)
        for method, label, rows in _series(sub, "achieved_params_pr", metric):
            ax.errorbar(rows["achieved_params_pr"] * 100, rows[metric] * 100, yerr=_err(rows, metric, 100),
                        marker="o", capsize=3, color=colors[method], label=label)  # fmt: skip
        _finish(ax, det, "achieved parameter reduction PR (%)", metric)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))


def plot_map_vs_speedup(summary: pd.DataFrame, metric: str, title: str, path: Path) -> None:
    """Per detector: mAP against the core() speed-up measured against the base (base at 1)."""
    fig, panels, colors = _per_detector(summary, title)
    for ax, det, sub in panels:
        for regime, base in sub[sub["is_base"]].dropna(subset=[metric]).groupby("regime"):
            marker = "*" if regime == "plain" else "X"
            ax.scatter([1.0], [base[metric].mean() * 100], marker=marker, s=180, color="black",
                       label=_label("base", regime), zorder=3)  # fmt: skip
        for method, label, rows in _series(sub, "speedup_core", metric):
            ax.errorbar(rows["speedup_core"], rows[metric] * 100, xerr=_err(rows, "speedup_core"),
                        yerr=_err(rows, metric, 100), fmt="o", capsize=3, color=colors[method],
                        label=label)  # fmt: skip
        _finish(ax, det, "core() speed-up against its base (×)", metric)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))


def plot_recovery(summary: pd.DataFrame, metric: str, title: str, path: Path) -> None:
    """Per detector: mAP after 0 (one-shot), 1, 2, ... fine-tuning epochs, per method and target."""
    oneshot = f"oneshot_{metric}"
    fig, panels, colors = _per_detector(summary, title)
    for ax, det, rows_of_det in panels:
        _bases(ax, rows_of_det, metric)
        sub = rows_of_det[~rows_of_det["is_base"]]
        for (regime, method, target), grp in sub.groupby(["regime", "method", "target"]):
            grp = grp.sort_values("finetune_epochs")
            xs = [0.0, *grp["finetune_epochs"]]
            ys = [grp[oneshot].mean() * 100, *(grp[metric] * 100)]
            style = "-" if target == sorted(set(sub["target"]))[0] else "--"
            ax.plot(xs, ys, marker="o", linestyle=style, color=colors[method],
                    label=f"{_label(method, regime)} {target}")  # fmt: skip
        _finish(ax, det, "fine-tuning epochs (0 = one-shot)", metric)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))


# (key, title, scale): a diverging reading runs to -1e6 beside bounded ones near -5, so the
# terms are drawn on a symmetric log scale
TRAJECTORY_PANELS = (
    ("ld", "L_LD (sum over scales, mean over steps)", "symlog"),
    ("cov", "L_cov (sum over scales)", "symlog"),
    ("top_eigenvalue", "largest ν (mean over steps)", "log"),
    ("ld_grad_ratio", "‖∇ α L_LD‖ / ‖∇ L_det‖ (epoch's first step)", "log"),
)


def trajectories(rows: pd.DataFrame) -> list[tuple[str, list[dict[str, float]]]]:
    """(label, per-epoch records) of every base row whose regime logged a trajectory (LDT)."""
    out = []
    for r in rows[rows["is_base"]].itertuples():
        report = json.loads(r.report) if isinstance(r.report, str) and r.report else {}
        epochs = (report.get("regime_stats") or {}).get("trajectory") or []
        if epochs:
            out.append((f"{r.detector} {r.regime} s{int(r.seed)}", epochs))
    return sorted(out, key=lambda t: t[0])


def plot_trajectory(series: list[tuple[str, list[dict[str, float]]]], title: str, path: Path) -> None:
    """The regime's per-epoch L_LD, L_cov, top eigenvalue and gradient ratio, one line per base."""
    fig = Figure(figsize=(11.0, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel().tolist()
    fig.suptitle(title)
    cmap = colormaps["tab10"]
    for ax, (key, label, scale) in zip(axes, TRAJECTORY_PANELS, strict=True):
        for i, (name, epochs) in enumerate(series):
            points = [(e["epoch"], e[key]) for e in epochs if key in e and math.isfinite(e[key])]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker=".", color=cmap(i % 10), label=name)
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=1.0)
        elif ax.get_lines() and all(min(line.get_ydata()) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="x-small")
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))


_MARKERS = "os^DvP*Xh<>p"


def plot_speedup_vs_gmacs(summary: pd.DataFrame, title: str, path: Path) -> bool:
    """Measured speed-up against the GMACs ratio (base ÷ pruned), one panel per runtime, with
    the line y = x: a point on it turns every GMAC saved into time saved (efficiency 1), below
    it less. Colour: method; marker: detector. False (nothing written) where no row has a speed-up."""
    named = (("PyTorch", "speedup_core"), ("ONNX Runtime", "speedup_ort"))
    runtimes = [(name, col) for name, col in named if col in summary and summary[col].notna().any()]
    pruned = summary[~summary["is_base"]]
    if not runtimes or pruned["speedup_core"].isna().all():
        return False
    base = summary[summary["is_base"]].groupby(["detector", "regime"])["gmacs"].mean()
    ratio = [base.get((d, r), math.nan) / g for d, r, g in zip(pruned["detector"], pruned["regime"],
                                                                pruned["gmacs"], strict=True)]  # fmt: skip
    pruned = pruned.assign(gmacs_ratio=ratio)
    fig, axes = _panels([name for name, _ in runtimes], title)
    colors, detectors = _colors(summary), sorted(set(pruned["detector"]))
    for ax, (name, column) in zip(axes, runtimes, strict=True):
        rows = pruned.dropna(subset=[column, "gmacs_ratio"])
        top = max([1.0, *rows["gmacs_ratio"], *rows[column]]) * 1.05
        ax.plot([0, top], [0, top], color="gray", linestyle="--", label="y = x (efficiency 1)")
        for (method, detector), grp in rows.groupby(["method", "detector"]):
            marker = _MARKERS[detectors.index(detector) % len(_MARKERS)]
            low, high = grp[column] - grp[f"{column}_lo"], grp[f"{column}_hi"] - grp[column]
            one_seed = bool(len(grp)) and bool((grp["n"] == 1).all())  # its interval; else the spread
            err = [low.fillna(0.0), high.fillna(0.0)] if one_seed else _err(grp, column)
            ax.errorbar(grp["gmacs_ratio"], grp[column], yerr=err, fmt=marker, capsize=3,
                        color=colors[method], label=f"{method} · {detector}")  # fmt: skip
        ax.set_xlim(0.9, top)
        ax.set_ylim(0, top)
        ax.set_title(f"{name}: core() speed-up")
        ax.set_xlabel("GMACs ratio, base ÷ pruned (×)")
        ax.set_ylabel("paired speed-up against its base (×)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", ncols=2)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))
    return True


def write_plots(summary: pd.DataFrame, rows: pd.DataFrame, metric: str, title: str, stem: Path) -> list[Path]:
    """A dataset's plots beside its table (``<stem>_<plot>.png``); return the paths written. The
    mAP plots only where some row was evaluated (a speed-only suite has no mAP), the recovery
    only over several fine-tuning lengths, the trajectory only where a regime logged one."""
    written: list[Path] = []

    def plot(name: str, draw: Any, *args: Any) -> None:
        path = Path(f"{stem}_{name}.png")
        if draw(*args, path) is not False:
            written.append(path)

    if summary[metric].notna().any():
        plot("map_vs_pr", plot_map_vs_pr, summary, metric, f"{title}: mAP vs. pruning rate")
        speed_title = f"{title}: mAP vs. paired core() speed-up"
        plot("map_vs_speedup", plot_map_vs_speedup, summary, metric, speed_title)
        if len(set(summary["finetune_epochs"].dropna())) > 1:
            plot("recovery", plot_recovery, summary, metric, f"{title}: mAP recovery with fine-tuning")
    plot("speedup_vs_gmacs", plot_speedup_vs_gmacs, summary, f"{title}: speed-up against GMACs ratio")
    series = trajectories(rows)
    if series:
        plot("ldt_trajectory", plot_trajectory, series, f"{title}: LDT training trajectory")
    return written
