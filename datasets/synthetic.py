"""The embedded default data, kept: synthetic sets generated once, cached, checksummed, and read
through the real COCO, KITTI and VOC loaders as ``synthetic-coco``, ``synthetic-kitti`` and
``synthetic-voc`` (registered here).

A set lives under the cache (``$DETPRUNE_HOME/data``) in a folder named by its parameters, with a
manifest (``synthetic.json``: the parameters and every file's SHA-256). It is written whole or not
at all (``results.files.publish_directory``), checked against its manifest on first use in a
process, and generated again when damaged; ``damage`` is what ``detprune verify`` reports. What a
set's images and annotations are is ``datasets.synthetic_drawing``'s business.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from datasets.base import DatasetError, DetectionDataset, Transform
from datasets.coco import CocoDetection
from datasets.kitti import SPLIT_DEFAULTS, KittiDetection
from datasets.registry import register_dataset
from datasets.synthetic_drawing import GENERATOR_VERSION, VOC_NAMES, write_set
from datasets.voc import VocDetection
from results.files import publish_directory, remove_directory, tree_sha256

MANIFEST = "synthetic.json"
OPTIONS = {"seed": 0, "num_train": 512, "num_val": 128, "image_size": 128}  # and their defaults

_VERIFIED: set[tuple[Path, str]] = set()  # (root, manifest) checked in this process: hashed once


def default_data_dir() -> Path:
    """Where generated data is cached: ``$DETPRUNE_HOME/data`` (``.detprune/data`` by default)."""
    return Path(os.environ.get("DETPRUNE_HOME", ".detprune")) / "data"


def synthetic_root(cache: str | Path | None = None, **options: Any) -> Path:
    """The folder of the synthetic set with ``options`` (seed, num_train, num_val, image_size)."""
    o = {**OPTIONS, **options}
    name = f"synthetic-s{o['seed']}-n{o['num_train']}-v{o['num_val']}-i{o['image_size']}"
    return Path(cache if cache is not None else default_data_dir()) / name


def generate(
    root: Path, seed: int = 0, num_train: int = 512, num_val: int = 128, image_size: int = 128
) -> Path:
    """Write the synthetic set under ``root`` (``coco/``, ``kitti/``, ``voc/``) unless it is already there.

    The set is built in a sibling temp folder and moved into place with one ``os.replace``, so a
    killed run never leaves a half-written set, and two processes racing on it both end with the
    same finished set. ``root`` must not exist, be empty, or hold a set with the same parameters.
    """
    root = Path(root)
    params = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
    }
    if min(num_train, num_val) < 0 or num_train + num_val == 0 or image_size < 32:
        raise DatasetError(f"{root}: bad synthetic parameters {params} (need images, image_size >= 32)")
    if _finished(root, params):
        return root
    not_ours = DatasetError(f"{root}: exists and is not a synthetic set; remove it or pick another root")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise not_ours
    root.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        write_set(tmp, seed, num_train, num_val, image_size)
        manifest = {**params, "files": tree_sha256(tmp, skip=MANIFEST)}  # checked on each use
        (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True) + "\n")

    # not published: root appeared meanwhile; a lost race to an equal set is fine, else refuse
    if not publish_directory(root, fill) and not _finished(root, params):
        raise not_ours
    return root


def _damage(root: Path, recorded: dict[str, str] | None) -> str | None:
    """What is wrong with a finished set's files (None when every file matches its checksum)."""
    if recorded is None:
        return "no checksums recorded (made by an older detprune)"
    found = tree_sha256(root, skip=MANIFEST)
    for name, digest in recorded.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} failed its checksum (changed or truncated)"
    return None


def damage(root: Path) -> str | None:
    """What is wrong with the synthetic set at ``root`` (missing, no manifest, a file missing or
    failing its checksum), or None when every file matches (``detprune verify``)."""
    root = Path(root)
    if not root.is_dir():
        return "missing"
    try:
        recorded = json.loads((root / MANIFEST).read_text()).get("files")
    except FileNotFoundError:
        return f"no {MANIFEST} (not a finished set)"
    except (OSError, ValueError, AttributeError):
        return f"unreadable {MANIFEST}"
    return _damage(root, recorded)


def _finished(root: Path, params: dict) -> bool:
    """True when ``root`` holds a finished, intact set made with ``params``; a different set is an
    error. A damaged set (a file changed, truncated or missing) is ours to rebuild: it is moved
    aside and removed, with one line saying so, and the caller generates it again."""
    try:
        found = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        raise DatasetError(f"{root / MANIFEST}: unreadable manifest; delete {root} to regenerate") from None
    recorded = found.pop("files", None)
    if found != params:
        raise DatasetError(
            f"{root}: holds a synthetic set made with {found}, not {params}; delete it to regenerate"
        )
    key = (root.resolve(), json.dumps(recorded, sort_keys=True))
    if key in _VERIFIED:  # the train and the val split open the same set: hash its files once
        return True
    damage = _damage(root, recorded)
    if damage is None:
        _VERIFIED.add(key)
        return True
    print(f"detprune: synthetic set {root}: {damage}; generating it again", file=sys.stderr)
    remove_directory(root)  # gone already: another process moved it first
    return False


# -- the registered datasets: one generated set, read by three real loaders ----------------------


def _folder(root: str | Path | None, options: dict[str, Any]) -> Path:
    return synthetic_root(root, **{k: v for k, v in options.items() if k in OPTIONS})


def _generated(name: str, root: str | Path | None, options: dict[str, Any]) -> Path:
    """The finished set that ``options`` name, generated under the cache ``root`` if need be."""
    params = {key: options[key] for key in OPTIONS}
    for key, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"{name}: option {key} must be a whole number, not {value!r}")
    return generate(synthetic_root(root, **params), **params)


@register_dataset("synthetic-coco", OPTIONS, cache=_folder, version=GENERATOR_VERSION)
def _coco(split: str, root: Path | None, transform: Transform | None, **options: Any) -> DetectionDataset:
    coco = _generated("synthetic-coco", root, options) / "coco"
    return CocoDetection(coco / split, coco / "annotations" / f"instances_{split}.json", transform)


@register_dataset("synthetic-kitti", {**OPTIONS, **SPLIT_DEFAULTS}, cache=_folder, version=GENERATOR_VERSION)
def _kitti(split: str, root: Path | None, transform: Transform | None, **options: Any) -> DetectionDataset:
    data = _generated("synthetic-kitti", root, options)
    return KittiDetection(
        data / "kitti",
        split,
        transform=transform,
        seed=options["split_seed"],
        val_fraction=options["val_fraction"],
    )


@register_dataset("synthetic-voc", OPTIONS, cache=_folder, version=GENERATOR_VERSION)
def _voc(split: str, root: Path | None, transform: Transform | None, **options: Any) -> DetectionDataset:
    data = _generated("synthetic-voc", root, options)
    return VocDetection(data / "voc" / "VOCdevkit", split, "07", VOC_NAMES, transform)
