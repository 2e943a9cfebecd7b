"""What a suite file may say: its keys, their types and ranges, and ``--set`` overrides.

Every check names the file, the key and the value, and a misspelt key the nearest valid one
(``epoch`` -> ``epochs``), because a suite that fails after an hour of training on a typo, or
silently ignores the key, costs its user far more than a refusal at load time.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from methods import PRUNE_DEFAULTS
from methods.engine.training import Schedule

SUITE_KEYS = set(
    "name description seeds methods targets input_size jobs train finetune prune measure evaluate "
    "method_options experiments".split()
)
# runtimes: where a pruned row's core() is timed against its base. PyTorch (eager) always; with
# "onnxruntime" (the deploy extra) also both exported, checked and timed on ONNX Runtime's CPU
# halfwidth: more paired rounds until the speed-up's 95% interval is within this share of it
# either side (0: exactly ``rounds``), for at most max_seconds per pair (measure.Timing)
# batch_sizes: core() also timed on batches of these sizes (batch 1, the table's columns, always)
MEASURE_DEFAULTS = {
    "warmup": 3, "rounds": 20, "runtimes": ["torch"], "halfwidth": 0.0, "max_seconds": 120.0,
    "batch_sizes": [1],
}  # fmt: skip
RUNTIMES = ("torch", "onnxruntime")
EVALUATE_DEFAULTS = {"batch_size": 16}
EXPERIMENT_KEYS = {
    "detector",
    "size",
    "dataset",
    "data",
    "detector_options",
    "methods",
    "targets",
    "train",  # keys that override the suite's [train] for this experiment (YOLOX's 100 epochs)
    "finetune",
    "input_size",  # a single-level stride-32 detector (YOLOF) needs larger inputs than the rest
    "weights",  # a weights file the baseline starts from (torchvision's published ones)
    "trust",  # true: weights may be a pickled training checkpoint (Ultralytics' best.pt)
    "round_to",  # this experiment's alignments, instead of [prune]'s (one axis per detector size)
}


def expand_path(text: str) -> tuple[Path, str | None]:
    """``text`` with ``$VARS`` and ``~`` expanded, and the first variable left unset (or None)."""
    expanded = os.path.expandvars(text)
    unset = re.search(r"\$\{?(\w+)", expanded)
    return Path(expanded).expanduser(), unset.group(1) if unset else None


class SuiteError(ValueError):
    """A suite that cannot run, reported as one line naming the file."""


def weights_path(weights: str) -> Path:
    """An experiment's ``weights`` with ``$VARS`` and ``~`` expanded; an unset variable is an error."""
    path, unset = expand_path(weights)
    if unset:
        raise SuiteError(f"weights '{weights}' needs the environment variable {unset}")
    return path


@functools.cache
def _digest(path: Path, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def weights_digest(weights: str) -> str:
    """SHA-256 of a weights file, hashed once per process per version of the file."""
    path = weights_path(weights)
    if not path.is_file():
        raise SuiteError(f"weights file not found: {path}")
    stat = path.stat()
    return _digest(path.resolve(), stat.st_mtime_ns, stat.st_size)


def check_known(found: set[str] | list[str], known: set[str] | list[str], where: str) -> None:
    """A SuiteError naming the first unknown key and the nearest known one (``epoch`` -> ``epochs``)."""
    unknown = sorted(set(found) - set(known))
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise SuiteError(
            f"{where}: unknown key(s) {', '.join(unknown)}{hint}; known: {', '.join(sorted(known))}"
        )


def whole_number(value: Any, where: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SuiteError(f"{where} must be a whole number of at least {least}, not {value!r}")
    return value


# the knobs' types and ranges, checked before a cell runs
def _alignment(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


_PRUNE_CHECKS = {
    # a list is an axis, as targets are: each value its own cells (channel alignment measured)
    "round_to": lambda v: (
        _alignment(v)
        or (isinstance(v, list) and bool(v) and all(map(_alignment, v)) and len(set(v)) == len(v))
    ),
    "max_layer_ratio": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1,
    "tolerance": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1,
    "calibration_images": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}


def checked_round_to(value: Any, where: str) -> Any:
    """``round_to`` as a suite or an experiment gives it: one whole number, or a list (an axis)."""
    if not _PRUNE_CHECKS["round_to"](value):
        raise SuiteError(f"{where}: round_to must be {_PRUNE_NEEDS['round_to']}, not {value!r}")
    return value


_PRUNE_NEEDS = {
    "round_to": "a whole number >= 1, or a list of distinct ones",
    "max_layer_ratio": "a number in (0, 1]",
    "tolerance": "a number in (0, 1)",
    "calibration_images": "a whole number >= 1",
}
_MEASURE_CHECKS = {"halfwidth": lambda v: 0 <= v < 1, "max_seconds": lambda v: v > 0}
_MEASURE_NEEDS = {"halfwidth": "a number in [0, 1)", "max_seconds": "a number of seconds > 0"}
_LEAST = {"warmup": 0, "rounds": 1, "batch_size": 1}  # [measure] and [evaluate]


def name_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SuiteError(f"{where} must be a list of names, not {value!r}")
    return list(value)


def checked_runtimes(value: Any, where: str) -> list[str]:
    """A list of known runtimes with "torch" in it (a row's PyTorch columns are always measured)."""
    names = name_list(value, where)
    check_known(set(names), set(RUNTIMES), where)
    if "torch" not in names:
        raise SuiteError(
            f"{where} must list 'torch' (a row's PyTorch timing is always measured), not {value!r}"
        )
    return names


def checked_table(raw: dict[str, Any], key: str, defaults: dict[str, Any], where: Path) -> dict[str, Any]:
    values = raw.get(key, {})
    if not isinstance(values, dict):
        raise SuiteError(f"{where}: [{key}] must be a table, not {values!r}")
    check_known(set(values), set(defaults), f"{where}: [{key}]")
    for name, value in values.items():
        if key == "prune" and not _PRUNE_CHECKS[name](value):
            raise SuiteError(f"{where}: [prune] {name} must be {_PRUNE_NEEDS[name]}, not {value!r}")
        if key == "measure" and name == "runtimes":
            checked_runtimes(value, f"{where}: [measure] runtimes")
        elif key == "measure" and name == "batch_sizes":
            if not (
                isinstance(value, list)
                and value
                and all(map(_alignment, value))
                and len(set(value)) == len(value)
            ):
                raise SuiteError(
                    f"{where}: [measure] batch_sizes must be a list of distinct whole numbers >= 1, "
                    f"not {value!r}"
                )
        elif key == "measure" and name in _MEASURE_CHECKS:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not _MEASURE_CHECKS[name](value)
            ):
                raise SuiteError(f"{where}: [measure] {name} must be {_MEASURE_NEEDS[name]}, not {value!r}")
        elif key in ("measure", "evaluate"):
            whole_number(value, f"{where}: [{key}] {name}", _LEAST[name])
    return {**defaults, **values}


_BARE_WORD = re.compile(r"^[A-Za-z_][\w.:+-]*$")  # adamw, fcos, params:0.3: text without quotes


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a dotted KEY (``train.epochs=2``) naming a suite key; VALUE is a TOML
    literal (``2``, ``[0, 1, 2]``, ``"text"``) or a bare word taken as text (``adamw``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SuiteError(f"bad --set '{text}': expected KEY=VALUE, e.g. train.epochs=2")
    path = key.split(".")
    where = f"bad --set '{text}'"
    check_known({path[0]}, SUITE_KEYS - {"experiments"}, where)
    tables = {"train": Schedule.__dataclass_fields__, "finetune": Schedule.__dataclass_fields__}
    tables |= {"prune": PRUNE_DEFAULTS, "measure": MEASURE_DEFAULTS, "evaluate": EVALUATE_DEFAULTS}
    if path[0] in tables:
        if len(path) != 2:
            raise SuiteError(
                f"{where}: name one [{path[0]}] key, e.g. {path[0]}.{next(iter(tables[path[0]]))}"
            )
        check_known({path[1]}, set(tables[path[0]]), f"{where}: [{path[0]}]")
    elif path[0] == "method_options":
        if len(path) != 3:
            raise SuiteError(f"{where}: expected method_options.METHOD.OPTION")
    elif len(path) != 1:
        raise SuiteError(f"{where}: '{path[0]}' is not a table")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if _BARE_WORD.match(value.strip()):
            return key, value.strip()
        raise SuiteError(f'{where}: the value is not TOML ({exc}); quote text as "..."') from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set suite keys from the command line. An override applies to every experiment: where an
    ``[[experiments]]`` entry sets the same key itself (``targets``, ``input_size``, ``train.*``),
    the override replaces it there too."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        path = key.split(".")
        _set(raw, path, key, value)
        if path[0] in SUITE_KEYS & EXPERIMENT_KEYS:
            for entry in raw.get("experiments", []):
                if path[0] in entry:
                    _set(entry, path, key, value)
    return raw


def _set(table: dict[str, Any], path: list[str], key: str, value: Any) -> None:
    *tables, leaf = path
    for name in tables:
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            raise SuiteError(f"bad override '{key}': '{name}' is not a table")
    table[leaf] = value


def checked_schedule(values: dict[str, Any], where: str) -> Schedule:
    try:
        return Schedule.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise SuiteError(f"{where}: {exc}") from None
