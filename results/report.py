"""Tables and plots from stored results, in the papers' formats; never re-runs a cell.

Everything here is a pure function of the results frame, with a fixed row order and fixed
number formatting, so regenerating from the same store rewrites byte-identical markdown and
CSV files and the committed tables only change when a result does.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from results.aggregate import ORT_FIGURES, summarise
from results.aggregate import mark_within_spread as _marks
from results.batches import write_batches
from results.coupling import write_coupling
from results.files import write_atomically, write_text
from results.formats import MISSING
from results.formats import fmt as _fmt
from results.formats import ort_speedup as _ort_speedup
from results.formats import speedup as _speedup
from results.formats import stat as _stat
from results.frame import normalised, ordered
from results.per_class import write_per_class
from results.plots import write_plots
from results.provenance import code_line, machine_line

METRIC_NAMES = {"ap": "AP@[.5:.95]", "ap50": "AP@0.5"}
METRIC_COLUMNS = {"ap": "map", "ap50": "ap50"}  # the store column a metric's "mAP" is read from
HEADERS = (
    "Detector", "Method", "Target", "n", "PR%", "FLOPs↓%", "GMACs", "GFLOPs", "Params (M)",
    "mAP 1-shot", "mAP", "AP50", "vs best", "core ms", "speed-up [95% CI]", "eff.", "predict ms",
)  # fmt: skip
_ACCURACY_HEADERS = ("mAP 1-shot", "mAP", "AP50", "vs best", "predict ms")  # absent from speed-only tables
ORT_HEADERS = ("ORT ms", "ORT speed-up [95% CI]", "ORT eff.")  # where a suite times ONNX Runtime too
FLAG = "⚠"  # a row whose training loss did not behave (see the footnote under the table)
_METRIC_LABEL = {METRIC_COLUMNS[k]: v for k, v in METRIC_NAMES.items()}
# The CSV: identity of the cell, then every number the store holds (plus GFLOPs).
CSV_COLUMNS = [
    "detector", "regime", "method", "target", "target_kind", "target_rate", "seed", "input_size",
    "metric", "finetune_epochs", "achieved_params_pr", "achieved_flops_pr", "achieved_channels_pr",
    "params_m", "gmacs", "gflops", "oneshot_map", "oneshot_ap50", "map", "ap50", "ap75", "aps", "apm",
    "apl", "voc_ap", "voc_ap11", "core_ms_median", "core_ms_p90", "predict_ms_median", "predict_ms_p90",
    "base_core_ms_median", "base_predict_ms_median", "speedup_core", "speedup_core_lo",
    "speedup_core_hi", "speedup_predict", "speedup_predict_lo", "speedup_predict_hi",
    "efficiency_core", "threads", "cpu", "gpu", "device", "train_seconds", "prune_seconds",
    "finetune_seconds", "eval_seconds", "cell_id", "created_at", "harness_version", "harness_commit",
    "harness_dirty", "code_digest", "python", "torch", "torchvision", "torch_pruning", "onnxruntime",
    "gpu_driver",
]  # fmt: skip


def _metric_column(df: pd.DataFrame) -> str:
    """The column holding the dataset's "mAP"; a table mixing two metrics would mislead."""
    found = sorted(set(df["metric"]) - {""})
    if len(found) > 1:
        raise ValueError(f"dataset {sorted(set(df['dataset']))} mixes metrics {found}")
    metric = found[0] if found else "ap"
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRIC_NAMES)}")
    return METRIC_COLUMNS[metric]


def _method_name(r: Any) -> str:
    return r.method if not r.is_base else "base" if r.regime == "plain" else f"base ({r.regime})"


def _write_coco_breakdown(
    sub: pd.DataFrame, summary: pd.DataFrame, stem: Path, suite: str, dataset: str
) -> list[Path]:
    """``<stem>_coco_ap.md``: COCO's six figures per row, DCODP's Table 3 layout (it reports them
    for VOC as well); nothing when the rows carry no size breakdown (APs is what COCOeval adds)."""
    if summary["aps"].isna().all():
        return []
    names = ("map", "ap50", "ap75", "aps", "apm", "apl")
    rows = [
        [r.detector, _display_method(r), r.target or MISSING, str(r.n)] + [_stat(r, n, 1, 100) for n in names]
        for r in summary.itertuples(index=False)
    ]
    headers = ["Detector", "Method", "Target", "n", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    path = Path(f"{stem}_coco_ap.md")
    machine, spread = _machine_and_spread(sub)
    intro = (
        "AP = AP@[.5:.95], AP50/AP75 at IoU 0.5/0.75, APs/m/l by object area (pycocotools' COCOeval); "
        "pruned rows after fine-tuning. One-shot mAP, the paired speed-up and the footnotes of rows "
        f"marked {FLAG} are in {Path(f'{stem}.md').name}."
    )
    lines = [f"# {suite} — {dataset}: COCO-style AP (×100)", "", machine, "", intro, "", spread, ""]
    write_text(path, "\n".join([*lines, _tabulate(headers, rows, "pipe"), ""]))
    return [path]


def _display_method(r: Any) -> str:
    return f"{_method_name(r)} {FLAG}" if getattr(r, "health", "") else _method_name(r)


def _health_lines(summary: pd.DataFrame) -> list[str]:
    """A footnote per flagged row: its training loss looked wrong, so its figures are suspect."""
    lines = [
        f"- {r.detector} {_method_name(r)} {r.target or ''}".rstrip() + f": {r.health}"
        for r in summary.itertuples(index=False)
        if r.health
    ]
    if not lines:
        return []
    head = (
        f"{FLAG} training health: the loss of these rows' training (the baseline's for a base row, the "
        "fine-tuning's for a pruned one) did not behave as a converging run's does; read their "
        "figures as a symptom, not a result."
    )
    return [head, "", *lines, ""]


def render_failures(failures: pd.DataFrame) -> str:
    """The failed cells as a markdown table (stage, reason, attempts); "" when there are none."""
    if failures is None or failures.empty:
        return ""
    rows = [
        [r.label, r.stage, str(r.error).splitlines()[0][:160], str(int(r.attempts)), r.created_at]
        for r in failures.itertuples(index=False)
    ]
    return tabulate(
        rows, headers=["Failed cell", "Stage", "Reason", "Attempts", "Last failed (UTC)"], tablefmt="pipe"
    )


def _summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    summary = ordered(summarise(df))
    summary["mark"] = _marks(summary, metric)
    return summary


def _table_rows(summary: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]]]:
    """The formatted table: one row per replicate group, plus a fine-tuning column when the
    frame holds several fine-tuning budgets."""
    epochs = set(summary["finetune_epochs"].dropna())
    ort = "speedup_ort" in summary  # some row was timed on ONNX Runtime too (measure.runtimes)
    headers = list(HEADERS) + (list(ORT_HEADERS) if ort else [])
    if len(epochs) > 1:
        headers.insert(3, "FT ep")
    rows = []
    for r in summary.itertuples(index=False):
        mark = MISSING if not isinstance(r.mark, str) else r.mark
        row = [
            r.detector, _display_method(r), r.target or MISSING, str(r.n),
            _stat(r, "achieved_params_pr", 1, 100), _stat(r, "achieved_flops_pr", 1, 100),
            _stat(r, "gmacs", 3), _stat(r, "gflops", 3), _stat(r, "params_m", 3),
            _stat(r, f"oneshot_{metric}", 1, 100), _stat(r, metric, 1, 100), _stat(r, "ap50", 1, 100),
            mark if not r.is_base else MISSING, _stat(r, "core_ms_median", 2), _speedup(r),
            _stat(r, "efficiency_core", 2), _stat(r, "predict_ms_median", 2),
        ]  # fmt: skip
        if ort:
            row += [_stat(r, "ort_core_ms_median", 2), _ort_speedup(r), _stat(r, "efficiency_ort", 2)]
        if len(epochs) > 1:
            row.insert(3, _fmt(r.finetune_epochs, 0))
        rows.append(row)
    if summary[[metric, "predict_ms_median"]].isna().all().all():  # speed only: nothing evaluated
        keep = [i for i, h in enumerate(headers) if h not in _ACCURACY_HEADERS]
        headers, rows = [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]
    return headers, rows


def _tabulate(headers: list[str], rows: list[list[str]], fmt: str) -> str:
    n_text = headers.index("Target") + 1
    align = ("left",) * n_text + ("right",) * (len(headers) - n_text)
    return tabulate(rows, headers=headers, tablefmt=fmt, colalign=align, disable_numparse=True)


def render_table(frame: pd.DataFrame, dataset: str | None = None) -> str:
    """One dataset's markdown table (for the CLI); ``dataset`` picks one from a wider frame."""
    df = normalised(frame)
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    datasets = sorted(set(df["dataset"]))
    if len(datasets) != 1:
        raise ValueError(f"render_table needs exactly one dataset; the frame has {datasets}")
    metric = _metric_column(df)
    return _tabulate(*_table_rows(_summary(df, metric), metric), "pipe")


def _distinct(df: pd.DataFrame, column: str) -> str:
    values = sorted({str(int(v)) if isinstance(v, float) else v for v in df[column].dropna()} - {""})
    return ", ".join(values) if values else "unknown"


def _machine_and_spread(df: pd.DataFrame) -> tuple[str, str]:
    """The lines naming the machines and code the rows came from (each with its row count where
    they are several), and the line saying what the seeds allow."""
    machine = f"{machine_line(df)}\n\n{code_line(df)}"
    seeds = _distinct(df, "seed")
    if len(set(df["seed"].dropna())) > 1:
        spread = (
            f"Seeds {seeds}, each a full replicate (its own baseline, pruning and fine-tuning): figures "
            "are mean ± std over them (n). vs best: the best mean mAP at that detector and target, and ≈ "
            "where a row's difference from it is within its spread, sqrt(std² + std_best²): not a finding."
        )
    else:
        spread = (
            f"One seed ({seeds}): no spread is known, so no difference between rows is a finding; "
            "run several seeds (the 3-seed reference shows how far one seed's figures move)."
        )
    return machine, spread


def _header_lines(df: pd.DataFrame, suite: str, dataset: str, metric: str) -> list[str]:
    machine, spread = _machine_and_spread(df)
    return [
        f"# {suite} — {dataset}",
        "",
        machine,
        "",
        f"mAP = {_METRIC_LABEL[metric]} (×100) after fine-tuning; mAP 1-shot = the same right after "
        "pruning, before any fine-tuning (what the criterion chose); AP50 = AP@0.5 (×100). PR% = achieved "
        "parameter reduction. GMACs by fvcore on core() (NMS excluded); GFLOPs = 2 × GMACs. core ms, "
        "predict ms: median latency. speed-up: the pruned core() timed against its own base in one "
        "process, interleaved rounds, base median ÷ pruned median with a 95% bootstrap interval over "
        "the paired rounds; eff. = speed-up ÷ (base GMACs ÷ pruned GMACs), 1.0 when latency falls as "
        "fast as GMACs. A GMACs ratio is not a speed-up.",
        *_ort_note(df),
        *_timing_notes(df),
        "",
        spread,
        "",
        *_core_conditions(df),
    ]


def _ort_note(df: pd.DataFrame) -> list[str]:
    """What the ONNX Runtime columns are, where a suite measured them."""
    if not df["speedup_ort"].notna().any():
        return []
    diff = df["export_max_abs_diff"].max()
    found = sorted(set(df["ort_provider"]) - {"", "CPUExecutionProvider"})
    provider = f"{', '.join(found)} (else CPU)" if found else "CPU provider"
    return [
        "",
        f"ORT: the same pairing on ONNX Runtime's {provider} (threads not spin-waiting), both models "
        "exported (`detprune export`'s way) and checked against PyTorch first (largest |difference| "
        f"over the rows: {diff:.2g}); ORT eff. = ORT speed-up ÷ the GMACs ratio.",
    ]


def _timing_notes(df: pd.DataFrame) -> list[str]:
    """How many paired rounds the rows took, where they recorded it, and what a speed-only
    (untrained) row means; nothing for rows that predate both."""
    lines = []
    if (df["speed_only"] == 1).any():
        lines += [
            "",
            "Speed only: untrained weights, widths as each criterion chose them on those weights. No "
            "mAP (untrained weights detect nothing) and no predict timing (its NMS times the boxes "
            "untrained weights make, not the network).",
        ]
    counts = [
        f"{what} {_span(df[column])}"
        for what, column in (("PyTorch", "timing_rounds"), ("ORT", "ort_timing_rounds"))
        if df[column].notna().any()
    ]
    if counts:
        lines += [
            "",
            f"Paired rounds per row: {', '.join(counts)} (measure.halfwidth adds rounds to wide intervals).",
        ]
    return lines


def _span(values: pd.Series) -> str:
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}–{high}"


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
    columns = list(CSV_COLUMNS)
    if df["speedup_ort"].notna().any():  # ONNX Runtime's figures beside PyTorch's, where measured
        at = columns.index("efficiency_core") + 1
        provider = ["ort_provider"] if (df["ort_provider"] != "").any() else []
        columns[at:at] = [*ORT_FIGURES, "export_max_abs_diff", *provider]
    at = columns.index("threads")
    columns[at:at] = [c for c in ("timing_rounds", "ort_timing_rounds", "speed_only") if df[c].notna().any()]
    columns += ["batch_timings"] if (df["batch_timings"] != "").any() else []  # JSON, per batch size
    out = ordered(df)[columns].copy()
    integers = ("seed", "input_size", "threads", "finetune_epochs", "harness_dirty", "timing_rounds",
                "ort_timing_rounds", "speed_only")  # fmt: skip
    for name in (c for c in integers if c in out):
        out[name] = out[name].astype("Int64")
    write_atomically(
        path, lambda tmp: out.to_csv(tmp, index=False, float_format="%.10g", lineterminator="\n")
    )


def write_reports(
    frame: pd.DataFrame, out_dir: Path, suite: str, failures: pd.DataFrame | None = None
) -> list[Path]:
    """Write md, csv (every cell), summary csv (per replicate group), tex and the plots per
    dataset under ``out_dir``; return the paths. ``frame`` is normally ``ResultStore.frame(suite)``.
    ``failures`` (``ResultStore.failures``): listed in ``failures.md``, which is removed when none
    are left.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = normalised(frame)
    written: list[Path] = []
    failed_md = out_dir / "failures.md"
    listing = render_failures(failures) if failures is not None else ""
    if listing:
        note = (
            f"# {suite} — failed cells\n\nThese cells have no row: each failed at the stage shown. "
            "A rerun of the suite retries them (`--skip-failed` leaves them).\n\n"
        )
        write_text(failed_md, note + listing + "\n")
        written.append(failed_md)
    elif failed_md.exists():
        failed_md.unlink()
    for dataset in sorted(set(df["dataset"])):
        sub = df[df["dataset"] == dataset]
        metric = _metric_column(sub)
        summary = _summary(sub, metric)  # one per dataset: the table, its footnotes and the CSV
        headers, rows = _table_rows(summary, metric)
        stem = out_dir / _safe(dataset)

        md = Path(f"{stem}.md")
        lines = _header_lines(sub, suite, dataset, metric) + [_tabulate(headers, rows, "pipe"), ""]
        lines += _health_lines(summary)
        write_text(md, "\n".join(lines))

        csv = Path(f"{stem}.csv")
        _write_csv(sub, csv)
        summary_csv = Path(f"{stem}_summary.csv")
        table = summary.drop(columns=["is_base"])
        write_atomically(
            summary_csv, partial(table.to_csv, index=False, float_format="%.10g", lineterminator="\n")
        )

        tex = Path(f"{stem}.tex")
        body = _tabulate(headers, rows, "latex_booktabs").replace("↓", r"$\downarrow$").replace("±", r"$\pm$")
        write_text(tex, f"% {suite} / {dataset}: mAP = {_METRIC_LABEL[metric]} (x100)\n{body}\n")

        written += [md, csv, summary_csv, tex]
        written += write_plots(summary, sub, metric, f"{suite} / {dataset}", stem)
        written += write_per_class(ordered(sub), stem, suite, dataset)
        written += write_batches(ordered(sub), stem, suite, dataset)
        written += write_coupling(sub, summary, metric, stem, suite, dataset)
        written += _write_coco_breakdown(sub, summary, stem, suite, dataset)
    return written
