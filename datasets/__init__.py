"""Detection datasets behind one sample format (DESIGN.md §3, §7), built by name.

``build_dataset("synthetic-coco", "train")`` (or ``synthetic-kitti``, ``synthetic-voc``) generates
the embedded synthetic set on first use (cached under ``$DETPRUNE_HOME/data``) and reads it through
the real COCO (KITTI, VOC) loader, so the default suite exercises the same code as
``build_dataset("coco", "val", root=...)`` on real data.

Each family registers itself next to its loader (``datasets.registry``); importing the package
imports them all, so ``DATASETS`` below is the full list.
"""

from __future__ import annotations

from datasets import coco, kitti, synthetic, voc  # noqa: F401  (each registers)
from datasets.base import DatasetError, DetectionDataset, ImageRecord
from datasets.coco import CocoDetection
from datasets.kitti import KittiDetection
from datasets.registry import DEFAULTS, SPLITS, build_dataset, data_path, dataset_names, resolved_options
from datasets.synthetic import default_data_dir, synthetic_root
from datasets.voc import VocDetection

DATASETS: tuple[str, ...] = dataset_names()

__all__ = [
    "DATASETS",
    "DEFAULTS",
    "SPLITS",
    "CocoDetection",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "KittiDetection",
    "VocDetection",
    "build_dataset",
    "data_path",
    "dataset_names",
    "resolved_options",
    "default_data_dir",
    "synthetic_root",
]
