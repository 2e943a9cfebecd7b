"""Suite files (TOML) -> cells (DESIGN.md §3).

A cell is (experiment, method, target, seed) plus the schedules that shape it; its id is a hash
of all of that with every default filled in (``identity.py``), so a finished cell is recognised
on rerun, and a changed suite or a changed default gets new cells.
Each (experiment, seed, regime) also yields one ``base`` cell: the unpruned baseline's row.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import dataset_names
from detectors import default_size, detector_names
from methods import PRUNE_DEFAULTS, MethodError, Target, build_method
from methods.engine.training import Schedule

from . import identity
from .suite_keys import (
    EVALUATE_DEFAULTS,
    EXPERIMENT_KEYS,
    MEASURE_DEFAULTS,
    SUITE_KEYS,
    SuiteError,
    apply_overrides,
    check_known,
    checked_round_to,
    checked_schedule,
    checked_table,
    name_list,
    parse_override,
    weights_digest,
    whole_number,
)

__all__ = ["Cell", "Experiment", "Plan", "Suite", "SuiteError", "load_suite", "parse_override", "suite_names"]

SUITES_DIR = Path(__file__).parent / "suites"


def _hash(payload: Any) -> str:
    return identity.digest(payload)


@dataclass(frozen=True)
class Experiment:
    detector: str
    size: str
    dataset: str
    data: dict[str, Any] = field(default_factory=dict)
    detector_options: dict[str, Any] = field(default_factory=dict)
    # a weights file the baseline starts from (torchvision's published COCO weights, say) instead
    # of the detector's random initialisation; ``$VARS`` expand; "" for none
    weights: str = ""
    # may read a pickled best.pt (runs code from the file): the user's say-so, in no id
    trust: bool = False

    def to_dict(self) -> dict[str, Any]:
        found = dict(self.__dict__)
        found.pop("trust")
        if not self.weights:  # the baseline keys of suites that name no weights stay as they were
            found.pop("weights")
        return found


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

    def _weights(self) -> dict[str, str]:
        # the file's contents, not just its name: replaced weights are a new baseline
        if not self.experiment.weights:
            return {}
        return {"weights_sha256": weights_digest(self.experiment.weights)}

    @property
    def speed_only(self) -> bool:
        """Untrained weights (no weights file, no training): only sizes and speed mean anything,
        so the cell is neither evaluated nor fine-tuned for accuracy's sake (its table says so)."""
        return self.train.epochs == 0 and not self.experiment.weights

    @property
    def baseline_key(self) -> str:
        """What determines a trained baseline, resolved (``identity.py``): not the method,
        target, or fine-tuning."""
        exp = self.experiment
        return _hash(
            {
                "id_scheme": identity.ID_SCHEME,
                "detector": identity.resolved_detector(
                    exp.detector, exp.size, self.input_size, exp.detector_options
                ),
                "dataset": identity.resolved_dataset(exp.dataset, exp.data),
                **({"weights": exp.weights} if exp.weights else {}),
                "seed": self.seed,
                "regime": self.regime,
                "train": self.train.to_dict(),
                # a regime other than plain trains with that method's loss and these (resolved) options
                "regime_options": self.regime_options,
                **self._weights(),
            }
        )

    def _measure_identity(self) -> dict[str, Any]:
        """How the row is measured, as far as it moves the row: a base row is timed alone, on
        PyTorch only, at batch 1, for ``rounds`` (``runtimes``, ``batch_sizes`` and the pairs'
        ``halfwidth`` are not its); a key
        at its neutral value is left out."""
        measure = identity.without_neutral("measure", self.measure)
        if self.method != "base":
            return measure
        return {
            k: v
            for k, v in measure.items()
            if k not in ("runtimes", "halfwidth", "max_seconds", "batch_sizes")
        }

    def config(self) -> dict[str, Any]:
        """The cell's resolved configuration: what its row was computed with."""
        cfg = {
            "baseline": self.baseline_key,
            "method": self.method,
            "target": self.target,
            "measure": self._measure_identity(),
            "evaluate": self.evaluate,
        }
        if self.method != "base":
            cfg |= {
                "method_resolved": identity.resolved_method(self.method, self.method_options),
                "finetune": self.finetune.to_dict(),
                "prune": self.prune,
            }
        return cfg

    @property
    def cell_id(self) -> str:
        return _hash(self.config())

    @property
    def legacy_cell_id(self) -> str:
        """The id the previous scheme gave this cell (a hash of the *written* options), by which
        a store written before resolution finds its rows once (``results.store.rekey``)."""
        baseline = _hash(
            {
                "experiment": self.experiment.to_dict(),
                "seed": self.seed,
                "regime": self.regime,
                "input_size": self.input_size,
                "train": self.train.to_dict(),
                "regime_options": self.regime_options,
                **self._weights(),
            }
        )
        cfg = {
            "baseline": baseline,
            "method": self.method,
            "method_options": self.method_options,
            "target": self.target,
            "measure": self._measure_identity(),
            "evaluate": self.evaluate,
        }
        if self.method != "base":
            cfg |= {"finetune": self.finetune.to_dict(), "prune": self.prune}
        return _hash(cfg)

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
    round_to: Any = None  # its own alignments (a number or a list); None: the suite's [prune]


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
            # round_to as a list is an axis: one set of pruned cells per alignment (a base row has none)
            alignments = self.prune["round_to"] if plan.round_to is None else plan.round_to
            prunes = [
                {**self.prune, "round_to": r}
                for r in (alignments if isinstance(alignments, list) else [alignments])
            ]
            for seed in self.seeds:
                common = dict(
                    suite=self.name,
                    experiment=experiment,
                    seed=seed,
                    input_size=plan.input_size,
                    train=plan.train,
                    finetune=plan.finetune,
                    measure=self.measure,
                    evaluate=self.evaluate,
                )
                built = {m: build_method(m, **self.method_options.get(m, {})) for m in methods}
                regimes, labels = _regimes(built)
                base += [
                    Cell(method="base", target="", regime=r, regime_options=opts, prune=prunes[0], **common)
                    for r, opts in sorted(regimes.items())
                ]
                pruned += [
                    Cell(
                        method=name,
                        target=target,
                        regime=labels[name],
                        method_options=self.method_options.get(name, {}),
                        regime_options=regimes[labels[name]],
                        prune=prune,
                        **common,
                    )
                    for name in built
                    for target in targets
                    for prune in prunes
                ]
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


def load_suite(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Suite:
    path = resolve_suite_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML ({exc})") from None
    raw = apply_overrides(raw, overrides or {})
    check_known(set(raw), SUITE_KEYS, str(path))
    train = checked_schedule(raw.get("train", {}), f"{path}: [train]")
    finetune = checked_schedule(raw.get("finetune", {}), f"{path}: [finetune]")
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
        check_known(set(entry), EXPERIMENT_KEYS, f"{path}: experiment {i}")
        for key in ("detector", "dataset"):
            if key not in entry:
                raise SuiteError(f"{path}: experiment {i} names no {key}")
        for key, known in (("detector", detector_names()), ("dataset", list(dataset_names()))):
            if entry[key] not in known:
                near = difflib.get_close_matches(str(entry[key]), known, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise SuiteError(f"{path}: unknown {key} '{entry[key]}'{hint}; known: {', '.join(known)}")
        methods = name_list(entry.get("methods", raw.get("methods", [])), f"{path}: experiment {i}: methods")
        targets = name_list(entry.get("targets", raw.get("targets", [])), f"{path}: experiment {i}: targets")
        try:
            for m in methods:
                build_method(m, **method_options.get(m, {}))
            targets = [str(Target.parse(t)) for t in targets]
        except MethodError as exc:
            raise SuiteError(f"{path}: {exc}") from None
        if not isinstance(entry.get("weights", ""), str):
            raise SuiteError(f"{path}: experiment {i}: weights must be a file path, not {entry['weights']!r}")
        if not isinstance(entry.get("trust", False), bool):
            raise SuiteError(f"{path}: experiment {i}: trust must be true or false, not {entry['trust']!r}")
        experiment = Experiment(
            detector=entry["detector"],
            size=entry.get("size", default_size(str(entry["detector"]))),
            dataset=entry["dataset"],
            data=dict(entry.get("data", {})),
            detector_options=dict(entry.get("detector_options", {})),
            weights=str(entry.get("weights", "")),
            trust=bool(entry.get("trust", False)),
        )
        plan_train = checked_schedule(
            {**train.to_dict(), **entry.get("train", {})}, f"{path}: experiment {i}"
        )
        plan_finetune = checked_schedule(
            {**finetune.to_dict(), **entry.get("finetune", {})}, f"{path}: experiment {i}"
        )
        for key in ("data", "detector_options", "train", "finetune"):
            if not isinstance(entry.get(key, {}), dict):
                raise SuiteError(f"{path}: experiment {i}: {key} must be a table, not {entry[key]!r}")
        input_size = whole_number(
            entry.get("input_size", raw.get("input_size", 128)), f"{path}: experiment {i}: input_size", 1
        )
        round_to = entry.get("round_to")
        if round_to is not None:
            checked_round_to(round_to, f"{path}: experiment {i}")
        experiments.append(
            Plan(experiment, methods, targets, plan_train, plan_finetune, input_size, round_to)
        )
    if not experiments:
        raise SuiteError(f"{path}: no [[experiments]]")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise SuiteError(f"{path}: seeds must be a non-empty list of whole numbers, not {seeds!r}")
    seeds = [whole_number(seed, f"{path}: seeds: {seed!r}", 0) for seed in seeds]
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"{path}: seeds {seeds} repeat a seed (a replicate is one seed)")
    return Suite(
        name=raw.get("name", path.stem),
        path=path,
        raw=raw,
        experiments=experiments,
        seeds=seeds,
        input_size=whole_number(raw.get("input_size", 128), f"{path}: input_size", 1),
        train=train,
        finetune=finetune,
        prune=checked_table(raw, "prune", PRUNE_DEFAULTS, path),
        measure=checked_table(raw, "measure", MEASURE_DEFAULTS, path),
        evaluate=checked_table(raw, "evaluate", EVALUATE_DEFAULTS, path),
        method_options=method_options,
        jobs=whole_number(raw.get("jobs", 1), f"{path}: jobs", 1),
        overrides=dict(overrides or {}),
    )
