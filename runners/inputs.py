"""A suite's inputs, opened and checked before anything is trained or stored.

Every dataset is opened (a missing path, a bad annotation, an image that is not one fails here)
and every detector built at its input size (a size that does not exist, a detector option it does
not take, an input size its strides cannot divide fails here), so a suite that cannot run says so
in one line before it has trained anything or created its store.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from datasets import build_dataset, data_path
from datasets.base import DatasetError, DetectionDataset
from detectors import DetectorError, build_detector, load_weights_file

from . import deploy
from .suite import Experiment, Suite, SuiteError
from .suite_keys import expand_path, weights_path

DECODED_IMAGE_BYTES = 1 << 30  # per split and process; a larger set decodes the rest from disk
Pair = tuple[DetectionDataset, DetectionDataset]


def default_work_dir() -> Path:
    return Path(os.environ.get("DETPRUNE_HOME", ".detprune"))


def data_root(dataset: str, root: str | None) -> Path | None:
    """A suite's data root, with ``$VARS`` expanded; an unset variable is named in the error."""
    if root is None:
        return None
    path, unset = expand_path(str(root))
    if unset:
        raise DatasetError(
            f"{dataset}: data root '{root}' needs the environment variable {unset}: "
            f"set it to the {dataset} data folder"
        )
    return path


def _root(experiment: Experiment, work_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    options = dict(experiment.data)
    root = data_root(experiment.dataset, options.pop("root", None))
    if experiment.dataset.startswith("synthetic") and root is None:
        root = Path(work_dir) / "data"
    return root, options


def experiment_data_path(experiment: Experiment, work_dir: Path) -> Path | None:
    """The folder the experiment's data is read from (a synthetic set's own folder)."""
    root, options = _root(experiment, work_dir)
    return data_path(experiment.dataset, root, options)


def open_datasets(experiment: Experiment, work_dir: Path) -> Pair:
    """The experiment's train and val splits; the synthetic sets are generated under ``work_dir``."""
    root, options = _root(experiment, work_dir)
    pair = (
        build_dataset(experiment.dataset, "train", root=root, **options),
        build_dataset(experiment.dataset, "val", root=root, **options),
    )
    for split in pair:  # every baseline and fine-tuning reads the same images again
        split.keep_decoded(DECODED_IMAGE_BYTES)
    return pair


def check_experiments(suite: Suite, datasets: Callable[[Experiment], Pair]) -> None:
    """Open each experiment's data and build its detector once; raise the first problem."""
    if "onnxruntime" in suite.measure["runtimes"] and not deploy.available():
        raise SuiteError(f"{suite.path}: [measure] runtimes names onnxruntime: {deploy.EXTRA}")
    for i, plan in enumerate(suite.experiments):
        train_set, _ = datasets(plan.experiment)
        exp = plan.experiment
        where = f"{suite.path}: experiment {i} ({exp.detector}-{exp.size})"
        try:
            model = build_detector(
                exp.detector, len(train_set.classes), exp.size, plan.input_size, **exp.detector_options
            )
        except TypeError as exc:  # an option the builder does not take
            raise SuiteError(f"{where}: bad detector_options ({exc})") from None
        except DetectorError as exc:
            raise SuiteError(f"{where}: {exc}") from None
        if exp.weights:  # the file exists and fits, before anything trains
            try:
                load_weights_file(model, weights_path(exp.weights), trust=exp.trust)
            except DetectorError as exc:
                raise SuiteError(f"{where}: {exc}") from None
        divisor = model.size_divisor
        if plan.input_size % divisor:
            suggestion = max(divisor, -(-plan.input_size // divisor) * divisor)
            raise SuiteError(
                f"{where}: input_size {plan.input_size} is not a multiple of {divisor}, "
                f"{exp.detector}'s largest backbone stride (try {suggestion})"
            )


def check_device(name: str) -> str:
    """A device torch knows and this machine has, or one line saying which it lacks."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SuiteError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SuiteError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SuiteError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return name
