"""Detection datasets behind one sample format (DESIGN.md §3, §7), built by name.

``build_dataset("synthetic-coco", "train")`` (or ``synthetic-kitti``, ``synthetic-voc``) generates
the embedded synthetic set on first use (cached under ``$DETPRUNE_HOME/data``) and reads it through
the real COCO (KITTI, VOC) loader, so the default suite exercises the same code as
``build_dataset("coco", "val", root=...)`` on real data.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from datasets.base import DatasetError, DetectionDataset, ImageRecord
from datasets.coco import CocoDetection
from datasets.kitti import KittiDetection
from datasets.synthetic import GENERATOR_VERSION, VOC_NAMES, generate
from datasets.voc import VocDetection

DATASETS: tuple[str, ...] = ("synthetic-coco", "synthetic-kitti", "synthetic-voc", "coco", "kitti", "voc")
SPLITS = ("train", "val")
_SYNTHETIC_OPTIONS = {"seed": 0, "num_train": 512, "num_val": 128, "image_size": 128}
_KITTI_SPLIT = {"split_seed": 0, "val_fraction": 0.2}
# every dataset's options with their defaults (``transform`` aside: a callable, no default)
DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic-coco": dict(_SYNTHETIC_OPTIONS),
    "synthetic-kitti": {**_SYNTHETIC_OPTIONS, **_KITTI_SPLIT},
    "synthetic-voc": dict(_SYNTHETIC_OPTIONS),
    "coco": {"year": "2017"},
    "kitti": dict(_KITTI_SPLIT),
    "voc": {"protocol": "07+12"},
}
_OPTIONS = {name: {*defaults, "transform"} for name, defaults in DEFAULTS.items()}

__all__ = [
    "DATASETS",
    "CocoDetection",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "KittiDetection",
    "VocDetection",
    "build_dataset",
    "data_path",
    "resolved_options",
    "default_data_dir",
    "synthetic_root",
]


def default_data_dir() -> Path:
    """Where generated data is cached: ``$DETPRUNE_HOME/data`` (``.detprune/data`` by default)."""
    return Path(os.environ.get("DETPRUNE_HOME", ".detprune")) / "data"


def synthetic_root(cache: str | Path | None = None, **options: Any) -> Path:
    """The folder of the synthetic set with ``options`` (seed, num_train, num_val, image_size)."""
    o = {**_SYNTHETIC_OPTIONS, **options}
    name = f"synthetic-s{o['seed']}-n{o['num_train']}-v{o['num_val']}-i{o['image_size']}"
    return Path(cache if cache is not None else default_data_dir()) / name


def resolved_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """What a dataset is read with: ``options`` over the defaults, and for a synthetic set the
    generator's version (part of a cell's identity: a changed default or generator is new data)."""
    resolved = {**DEFAULTS.get(name, {}), **{k: v for k, v in options.items() if k != "transform"}}
    if name.startswith("synthetic-"):
        resolved["generator_version"] = GENERATOR_VERSION
    return resolved


def data_path(name: str, root: str | Path | None, options: dict[str, Any]) -> Path | None:
    """The folder a dataset reads: the synthetic set's own folder under ``root`` (the cache),
    or ``root`` for real data."""
    if name.startswith("synthetic-"):
        return synthetic_root(root, **{k: v for k, v in options.items() if k in _SYNTHETIC_OPTIONS})
    return Path(root) if root is not None else None


def build_dataset(name: str, split: str, root: str | Path | None = None, **options: Any) -> DetectionDataset:
    """Dataset ``name`` (one of ``DATASETS``), split ``"train"`` or ``"val"``.

    ``root``: the cache folder for the synthetic sets, the data folder for ``coco`` / ``kitti`` /
    ``voc`` (the ``VOCdevkit`` folder; required there). Options: synthetic ``seed, num_train,
    num_val, image_size``; KITTI-style ``split_seed`` (default 0) and ``val_fraction`` (0.2);
    ``coco`` ``year`` ("2017"); ``voc`` ``protocol`` ("07+12", "07" or "12"; synthetic-voc is
    "07": its train split is VOC2007 trainval, its val split VOC2007 test); all ``transform``, a
    callable ``(image, target) -> (image, target)``.
    """
    if name not in _OPTIONS:
        near = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name!r}; known: {', '.join(SPLITS)}")
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(_OPTIONS[name]), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise DatasetError(
            f"unknown option(s) {', '.join(unknown)} for {name!r}{hint}; known: {sorted(_OPTIONS[name])}"
        )
    transform = options.pop("transform", None)
    kitti_options = {
        "seed": options.pop("split_seed", _KITTI_SPLIT["split_seed"]),
        "val_fraction": options.pop("val_fraction", _KITTI_SPLIT["val_fraction"]),
    }

    if name.startswith("synthetic-"):
        params = {**_SYNTHETIC_OPTIONS, **options}
        for key, value in params.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise DatasetError(f"{name}: option {key} must be a whole number, not {value!r}")
        data = generate(synthetic_root(root, **params), **params)
        if name == "synthetic-coco":
            coco = data / "coco"
            return CocoDetection(coco / split, coco / "annotations" / f"instances_{split}.json", transform)
        if name == "synthetic-voc":
            return VocDetection(data / "voc" / "VOCdevkit", split, "07", VOC_NAMES, transform)
        return KittiDetection(data / "kitti", split, transform=transform, **kitti_options)

    if root is None:
        raise DatasetError(f"dataset {name!r} needs root=<its data folder>")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: {name} data folder not found")
    if name == "coco":
        year = options.get("year", DEFAULTS["coco"]["year"])
        return CocoDetection(
            root / f"{split}{year}", root / "annotations" / f"instances_{split}{year}.json", transform
        )
    if name == "voc":
        protocol = options.get("protocol", DEFAULTS["voc"]["protocol"])
        voc = VocDetection(root, split, protocol, transform=transform)
        voc.table_name = f"voc-{protocol}"
        return voc
    return KittiDetection(root, split, transform=transform, **kitti_options)
