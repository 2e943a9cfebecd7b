"""The datasets by name: each family registers itself, with its options and their defaults, next
to its loader (as detectors do in ``detectors.base``), so adding a dataset is one module and one
import in ``datasets/__init__.py``; ``build_dataset``, ``detprune list`` and a cell's identity
all read this one table.

A builder is ``build(split, root, transform, **options)`` and gets every option, the defaults
filled in. Real data (``cache=None``) needs ``root``, its data folder, checked here; a generated
set names its folder under a cache root (``cache(root, options)``), and its ``version`` (the
generator's) is part of what a cell's results depend on.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets.base import DatasetError, DetectionDataset, Transform

SPLITS = ("train", "val")

Builder = Callable[..., DetectionDataset]
CacheFolder = Callable[[str | Path | None, dict[str, Any]], Path]

# every dataset's options with their defaults (``transform`` aside: a callable, no default); a
# cell's identity reads them, so a changed default is new data
DEFAULTS: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class _Entry:
    build: Builder
    cache: CacheFolder | None  # a generated set's folder under the cache root; None: real data
    version: int | None  # a generated set's generator version


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(
    name: str,
    defaults: dict[str, Any],
    cache: CacheFolder | None = None,
    version: int | None = None,
) -> Callable[[Builder], Builder]:
    """Register ``build(split, root, transform, **options)`` as dataset ``name`` taking the
    options ``defaults`` names (with those defaults). ``cache``: the set is generated, in the
    folder ``cache(root, options)`` under the cache root ``root``; ``version``: its generator's."""

    def wrap(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise DatasetError(f"dataset '{name}' registered twice")
        _REGISTRY[name] = _Entry(build, cache, version)
        DEFAULTS[name] = dict(defaults)
        return build

    return wrap


def dataset_names() -> tuple[str, ...]:
    """The registered datasets, the generated ones first (they run without any download)."""
    return tuple(sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].cache is None, name)))


def resolved_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """What a dataset is read with: ``options`` over the defaults, and for a generated set the
    generator's version (part of a cell's identity: a changed default or generator is new data)."""
    resolved = {**DEFAULTS.get(name, {}), **{k: v for k, v in options.items() if k != "transform"}}
    entry = _REGISTRY.get(name)
    if entry is not None and entry.version is not None:
        resolved["generator_version"] = entry.version
    return resolved


def data_path(name: str, root: str | Path | None, options: dict[str, Any]) -> Path | None:
    """The folder a dataset reads: a generated set's own folder under ``root`` (the cache), or
    ``root`` for real data."""
    entry = _REGISTRY.get(name)
    if entry is not None and entry.cache is not None:
        return entry.cache(root, options)
    return Path(root) if root is not None else None


def build_dataset(name: str, split: str, root: str | Path | None = None, **options: Any) -> DetectionDataset:
    """Dataset ``name`` (one of ``dataset_names()``), split ``"train"`` or ``"val"``.

    ``root``: the cache folder for the synthetic sets, the data folder for ``coco`` / ``kitti`` /
    ``voc`` (the ``VOCdevkit`` folder; required there). Options: synthetic ``seed, num_train,
    num_val, image_size``; KITTI-style ``split_seed`` (default 0) and ``val_fraction`` (0.2);
    ``coco`` ``year`` ("2017"); ``voc`` ``protocol`` ("07+12", "07" or "12"; synthetic-voc is
    "07": its train split is VOC2007 trainval, its val split VOC2007 test); all ``transform``, a
    callable ``(image, target) -> (image, target)``.
    """
    if name not in _REGISTRY:
        known = dataset_names()
        near = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}; known: {', '.join(known)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name!r}; known: {', '.join(SPLITS)}")
    allowed = {*DEFAULTS[name], "transform"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise DatasetError(
            f"unknown option(s) {', '.join(unknown)} for {name!r}{hint}; known: {sorted(allowed)}"
        )
    transform: Transform | None = options.pop("transform", None)
    entry = _REGISTRY[name]
    if entry.cache is None:
        if root is None:
            raise DatasetError(f"dataset {name!r} needs root=<its data folder>")
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: {name} data folder not found")
    return entry.build(split, root, transform, **{**DEFAULTS[name], **options})
