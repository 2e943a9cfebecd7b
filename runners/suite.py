"""Suite files (TOML) -> cells (DESIGN.md §3).

A cell is (experiment, method, target, seed) plus the schedules that shape it; its id is a hash
of all of that, so a finished cell is recognised on rerun and a changed suite gets new cells.
Each (experiment, seed, regime) also yields one ``base`` cell: the unpruned baseline's row.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import DATASETS
from detectors import detector_names
from methods import PRUNE_DEFAULTS, MethodError, Target, build_method
from methods.training import Schedule

SUITES_DIR = Path(__file__).parent / "suites"
SUITE_KEYS = set(
    "name description seeds methods targets input_size jobs train finetune prune measure evaluate "
    "method_options experiments".split()
)
MEASURE_DEFAULTS = {"warmup": 3, "rounds": 20}
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
}


class SuiteError(ValueError):
    """A suite that cannot run, reported as one line naming the file."""


def _unknown(found: set[str] | list[str], known: set[str] | list[str], where: str) -> None:
    """A SuiteError naming the first unknown key and the nearest known one (``epoch`` -> ``epochs``)."""
    unknown = sorted(set(found) - set(known))
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise SuiteError(
            f"{where}: unknown key(s) {', '.join(unknown)}{hint}; known: {', '.join(sorted(known))}"
        )


def _whole(value: Any, where: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SuiteError(f"{where} must be a whole number of at least {least}, not {value!r}")
    return value


# the knobs' types and ranges, checked before a cell runs
_PRUNE_CHECKS = {
    "round_to": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "max_layer_ratio": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1,
    "tolerance": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1,
    "calibration_images": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}
_PRUNE_NEEDS = {
    "round_to": "a whole number >= 1",
    "max_layer_ratio": "a number in (0, 1]",
    "tolerance": "a number in (0, 1)",
    "calibration_images": "a whole number >= 1",
}
_LEAST = {"warmup": 0, "rounds": 1, "batch_size": 1}  # [measure] and [evaluate]


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Experiment:
    detector: str
    size: str
    dataset: str
    data: dict[str, Any] = field(default_factory=dict)
    detector_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Cell:
    suite: str
    experiment: Experiment
    method: str  # "base" for the unpruned baseline row
    target: str  # "" for the base row
    seed: int
    regime: str
    input_size: int
    train: Schedule
    finetune: Schedule
    prune: dict[str, Any]
    measure: dict[str, Any]
    evaluate: dict[str, Any]
    method_options: dict[str, Any] = field(default_factory=dict)
    regime_options: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline_key(self) -> str:
        """What determines a trained baseline: not the method, target, or fine-tuning."""
        return _hash(
            {
                "experiment": self.experiment.to_dict(),
                "seed": self.seed,
                "regime": self.regime,
                "input_size": self.input_size,
                "train": self.train.to_dict(),
                # a regime other than plain trains with that method's loss and these options
                "regime_options": self.regime_options,
            }
        )

    def config(self) -> dict[str, Any]:
        cfg = {
            "baseline": self.baseline_key,
            "method": self.method,
            "method_options": self.method_options,
            "target": self.target,
            "measure": self.measure,
            "evaluate": self.evaluate,
        }
        if self.method != "base":
            cfg |= {"finetune": self.finetune.to_dict(), "prune": self.prune}
        return cfg

    @property
    def cell_id(self) -> str:
        return _hash(self.config())

    @property
    def label(self) -> str:
        what = "base" if self.method == "base" else f"{self.method} {self.target}"
        return (
            f"{self.experiment.detector}-{self.experiment.size}/{self.experiment.dataset}/{what}/s{self.seed}"
        )


@dataclass(frozen=True)
class Plan:
    """One ``[[experiments]]`` entry: what to prune, with which methods, and how to (re)train."""

    experiment: Experiment
    methods: list[str]
    targets: list[str]
    train: Schedule
    finetune: Schedule
    input_size: int


@dataclass
class Suite:
    name: str
    path: Path
    raw: dict[str, Any]
    experiments: list[Plan]
    seeds: list[int]
    method_options: dict[str, dict[str, Any]]
    prune: dict[str, Any]
    measure: dict[str, Any]
    evaluate: dict[str, Any]
    # the defaults an experiment may override
    input_size: int
    train: Schedule
    finetune: Schedule
    jobs: int = 1  # cells run in parallel worker processes (rows are measured with threads / jobs)
    overrides: dict[str, Any] = field(default_factory=dict)  # from the command line (``--set``)

    def cells(self) -> list[Cell]:
        """Base cells first, so every baseline is trained and measured before any pruning."""
        base, pruned = [], []
        for plan in self.experiments:
            experiment, methods, targets = plan.experiment, plan.methods, plan.targets
            for seed in self.seeds:
                common = dict(
                    suite=self.name,
                    experiment=experiment,
                    seed=seed,
                    input_size=plan.input_size,
                    train=plan.train,
                    finetune=plan.finetune,
                    prune=self.prune,
                    measure=self.measure,
                    evaluate=self.evaluate,
                )
                built = {m: build_method(m, **self.method_options.get(m, {})) for m in methods}
                regimes, labels = _regimes(built)
                base += [
                    Cell(method="base", target="", regime=r, regime_options=opts, **common)
                    for r, opts in sorted(regimes.items())
                ]
                for name in built:
                    for target in targets:
                        pruned.append(
                            Cell(
                                method=name,
                                target=target,
                                regime=labels[name],
                                method_options=self.method_options.get(name, {}),
                                regime_options=regimes[labels[name]],
                                **common,
                            )
                        )
        # experiments that differ only after the baseline (fine-tuning budgets) share base cells
        unique = {c.cell_id: c for c in base + pruned}
        return list(unique.values())


def _regimes(built: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """One baseline per distinct (regime, training options): ``{label: options}`` and each
    method's label. A regime trained with its method's default options is labelled by the regime
    ("ldt"); a variant that trains it otherwise by the variant's name ("ldt:absolute"), so a suite
    can compare training readings side by side (each with its own base row)."""
    regimes: dict[str, dict[str, Any]] = {"plain": {}}
    labels: dict[str, str] = {}
    for name, method in built.items():
        options = method.regime_options()
        label = next(
            (r for r, o in regimes.items() if r.partition(":")[0] == method.regime and o == options), None
        )
        if label is None:
            default = build_method(method.regime).regime_options() if method.regime != "plain" else {}
            label = method.regime if method.regime not in regimes and options == default else name
            regimes[label] = options
        labels[name] = label
    return regimes, labels


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SuiteError(f"{where} must be a list of names, not {value!r}")
    return list(value)


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def resolve_suite_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = SUITES_DIR / f"{name_or_path}.toml"
    if packaged.is_file():
        return packaged
    near = difflib.get_close_matches(str(name_or_path), suite_names(), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    raise SuiteError(
        f"unknown suite '{name_or_path}'{hint}: not a file, and not one of {', '.join(suite_names())}"
    )


def _table(raw: dict[str, Any], key: str, defaults: dict[str, Any], where: Path) -> dict[str, Any]:
    values = raw.get(key, {})
    if not isinstance(values, dict):
        raise SuiteError(f"{where}: [{key}] must be a table, not {values!r}")
    _unknown(set(values), set(defaults), f"{where}: [{key}]")
    for name, value in values.items():
        if key == "prune" and not _PRUNE_CHECKS[name](value):
            raise SuiteError(f"{where}: [prune] {name} must be {_PRUNE_NEEDS[name]}, not {value!r}")
        if key in ("measure", "evaluate"):
            _whole(value, f"{where}: [{key}] {name}", _LEAST[name])
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
    _unknown({path[0]}, SUITE_KEYS - {"experiments"}, where)
    tables = {"train": Schedule.__dataclass_fields__, "finetune": Schedule.__dataclass_fields__}
    tables |= {"prune": PRUNE_DEFAULTS, "measure": MEASURE_DEFAULTS, "evaluate": EVALUATE_DEFAULTS}
    if path[0] in tables:
        if len(path) != 2:
            raise SuiteError(
                f"{where}: name one [{path[0]}] key, e.g. {path[0]}.{next(iter(tables[path[0]]))}"
            )
        _unknown({path[1]}, set(tables[path[0]]), f"{where}: [{path[0]}]")
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


def _schedule(values: dict[str, Any], where: str) -> Schedule:
    try:
        return Schedule.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise SuiteError(f"{where}: {exc}") from None


def load_suite(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Suite:
    path = resolve_suite_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML ({exc})") from None
    raw = apply_overrides(raw, overrides or {})
    _unknown(set(raw), SUITE_KEYS, str(path))
    train = _schedule(raw.get("train", {}), f"{path}: [train]")
    finetune = _schedule(raw.get("finetune", {}), f"{path}: [finetune]")
    method_options = dict(raw.get("method_options", {}))
    try:
        for m, options in method_options.items():  # every entry, also one no experiment uses
            if not isinstance(options, dict):
                raise SuiteError(f"{path}: [method_options.{m}] must be a table, not {options!r}")
            build_method(m, **options)
    except MethodError as exc:
        raise SuiteError(f"{path}: [method_options]: {exc}") from None
    experiments = []
    entries = raw.get("experiments", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SuiteError(f"{path}: experiments must be [[experiments]] tables")
    for i, entry in enumerate(entries):
        _unknown(set(entry), EXPERIMENT_KEYS, f"{path}: experiment {i}")
        for key in ("detector", "dataset"):
            if key not in entry:
                raise SuiteError(f"{path}: experiment {i} names no {key}")
        for key, known in (("detector", detector_names()), ("dataset", list(DATASETS))):
            if entry[key] not in known:
                near = difflib.get_close_matches(str(entry[key]), known, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise SuiteError(f"{path}: unknown {key} '{entry[key]}'{hint}; known: {', '.join(known)}")
        methods = _names(entry.get("methods", raw.get("methods", [])), f"{path}: experiment {i}: methods")
        targets = _names(entry.get("targets", raw.get("targets", [])), f"{path}: experiment {i}: targets")
        try:
            for m in methods:
                build_method(m, **method_options.get(m, {}))
            targets = [str(Target.parse(t)) for t in targets]
        except MethodError as exc:
            raise SuiteError(f"{path}: {exc}") from None
        experiment = Experiment(
            detector=entry["detector"],
            size=entry.get("size", "tiny"),
            dataset=entry["dataset"],
            data=dict(entry.get("data", {})),
            detector_options=dict(entry.get("detector_options", {})),
        )
        plan_train = _schedule({**train.to_dict(), **entry.get("train", {})}, f"{path}: experiment {i}")
        plan_finetune = _schedule(
            {**finetune.to_dict(), **entry.get("finetune", {})}, f"{path}: experiment {i}"
        )
        for key in ("data", "detector_options", "train", "finetune"):
            if not isinstance(entry.get(key, {}), dict):
                raise SuiteError(f"{path}: experiment {i}: {key} must be a table, not {entry[key]!r}")
        input_size = _whole(
            entry.get("input_size", raw.get("input_size", 128)), f"{path}: experiment {i}: input_size", 1
        )
        experiments.append(Plan(experiment, methods, targets, plan_train, plan_finetune, input_size))
    if not experiments:
        raise SuiteError(f"{path}: no [[experiments]]")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise SuiteError(f"{path}: seeds must be a non-empty list of whole numbers, not {seeds!r}")
    seeds = [_whole(seed, f"{path}: seeds: {seed!r}", 0) for seed in seeds]
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"{path}: seeds {seeds} repeat a seed (a replicate is one seed)")
    return Suite(
        name=raw.get("name", path.stem),
        path=path,
        raw=raw,
        experiments=experiments,
        seeds=seeds,
        input_size=_whole(raw.get("input_size", 128), f"{path}: input_size", 1),
        train=train,
        finetune=finetune,
        prune=_table(raw, "prune", PRUNE_DEFAULTS, path),
        measure=_table(raw, "measure", MEASURE_DEFAULTS, path),
        evaluate=_table(raw, "evaluate", EVALUATE_DEFAULTS, path),
        method_options=method_options,
        jobs=_whole(raw.get("jobs", 1), f"{path}: jobs", 1),
        overrides=dict(overrides or {}),
    )
