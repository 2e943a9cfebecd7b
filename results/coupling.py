"""DCODP's Table 4 layout: each per-layer criterion with and without inter-layer coupling.

Written (``<dataset>_coupling.md`` and ``.tex``) where a suite ran some criterion both ways — the
``coupling`` switch of hrank, chip, dcodp, slimming and thinet: ``root`` scores a dependency group
by its root layer, ``sum`` adds every coupled layer's scores (DCODP's inter-layer coupling). One
row per replicate group: criterion, coupling, target, mAP, parameters, GMACs and the paired
speed-up with its interval, the bases first; nothing (and no file) where no criterion ran both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from results.files import write_text
from results.formats import MISSING, speedup, stat

HEADERS = ["Detector", "Method", "Coupling", "Target", "n", "mAP", "Params (M)", "GMACs", "speed-up [95% CI]"]
# a criterion's coupling when its options leave it out: every method's default is "root" but
# DCODP's; DCODP's cell ids spell the switch as its former option ``parent_only``
_DEFAULT = {"dcodp": "sum"}


def coupling_of(method: str, config: str) -> str | None:
    """``root`` or ``sum`` for a row of a criterion with the switch, from its resolved options."""
    base = method.partition(":")[0].partition(" ")[0]
    if base not in ("hrank", "chip", "dcodp", "slimming", "thinet"):
        return None
    try:
        options = (json.loads(config).get("method_resolved") or {}).get("options", {})
    except (TypeError, ValueError, AttributeError):  # a row without a resolved configuration
        options = {}
    if "coupling" in options:
        return str(options["coupling"])
    if "parent_only" in options:
        return "root" if options["parent_only"] else "sum"
    return _DEFAULT.get(base, "root")


def write_coupling(
    rows: pd.DataFrame, summary: pd.DataFrame, metric: str, stem: Path, suite: str, dataset: str
) -> list[Path]:
    """The table where some criterion of ``rows`` (normalised) ran both ways; ``summary`` gives
    the replicate groups' figures, in the main table's order."""
    pruned = rows[~rows["is_base"]]
    labels = {m: coupling_of(m, c) for m, c in zip(pruned["method"], pruned["config"], strict=True)}
    couplings: dict[str, set[str]] = {}
    for method, coupling in labels.items():
        if coupling is not None:
            couplings.setdefault(method.partition(":")[0], set()).add(coupling)
    if not any(len(c) > 1 for c in couplings.values()):
        return []
    table = []
    for r in summary.itertuples(index=False):
        coupling = MISSING if r.is_base else labels.get(r.method)
        if coupling is None:
            continue
        method = (
            "base" if r.is_base and r.regime == "plain" else f"base ({r.regime})" if r.is_base else r.method
        )
        table.append([
            r.detector, method, coupling, r.target or MISSING, str(r.n), stat(r, metric, 1, 100),
            stat(r, "params_m", 3), stat(r, "gmacs", 3), speedup(r),
        ])  # fmt: skip
    md, tex = Path(f"{stem}_coupling.md"), Path(f"{stem}_coupling.tex")
    note = (
        f"# {suite} — {dataset}: inter-layer coupling (DCODP's Table 4 layout)\n\n"
        "Coupling: `root` scores a dependency group by its root layer alone (a single-layer "
        "criterion as its paper has it); `sum` adds the scores of every layer coupled to it, "
        "DCODP's inter-layer coupling. mAP as in the main table (×100), which also has one-shot "
        "mAP, efficiencies and the machine.\n"
    )
    write_text(md, note + "\n" + tabulate(table, HEADERS, tablefmt="pipe", disable_numparse=True) + "\n")
    body = tabulate(table, HEADERS, tablefmt="latex_booktabs", disable_numparse=True).replace("±", r"$\pm$")
    write_text(tex, f"% {suite} / {dataset}: inter-layer coupling (DCODP Table 4 layout)\n{body}\n")
    return [md, tex]
