"""Detector contract, the ATSS assigner, and checkpoints that survive pruning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from detectors import DetectorError, build_detector, detector_names, load_checkpoint
from detectors.fcos import atss_assign

# the loss terms each family reports (the trainer sums them; the tables never see them)
LOSS_TERMS = {
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "atss": {"classification", "bbox_regression", "bbox_ctrness"},
    "gfl": {"qfl", "giou", "dfl"},
    "yolox": {"iou", "obj", "cls", "l1"},
    "yolov7": {"box", "obj", "cls"},
    "yolov8": {"box", "cls", "dfl"},
    "yolof": {"loss_cls", "loss_box_reg"},
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    # torchvision's own models (their one size), with torchvision's own loss names
    "tv:fcos_resnet50_fpn": {"classification", "bbox_regression", "bbox_ctrness"},
    "tv:retinanet_resnet50_fpn": {"classification", "bbox_regression"},
    "tv:retinanet_resnet50_fpn_v2": {"classification", "bbox_regression"},
    "tv:fasterrcnn_resnet50_fpn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "tv:fasterrcnn_resnet50_fpn_v2": {
        "loss_classifier",
        "loss_box_reg",
        "loss_objectness",
        "loss_rpn_box_reg",
    },
    "tv:fasterrcnn_mobilenet_v3_large_fpn": {
        "loss_classifier",
        "loss_box_reg",
        "loss_objectness",
        "loss_rpn_box_reg",
    },
    "tv:ssdlite320_mobilenet_v3_large": {"bbox_regression", "classification"},
}
# the ResNet-50 torchvision models (2 to 5 s each) run with -m slow; the others by default
SLOW = {
    "tv:retinanet_resnet50_fpn",
    "tv:retinanet_resnet50_fpn_v2",
    "tv:fasterrcnn_resnet50_fpn",
    "tv:fasterrcnn_resnet50_fpn_v2",
}


def _levels(out: Tensor | tuple | dict) -> list[Tensor]:
    """A neck's output as a list of maps: one map, a tuple of them, or torchvision's OrderedDict."""
    if isinstance(out, Tensor):
        return [out]
    return list(out.values()) if isinstance(out, dict) else list(out)


def test_every_family_is_tested_here() -> None:
    assert set(LOSS_TERMS) == set(detector_names())


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in detector_names()]
)
def test_contract(name: str) -> None:
    """DESIGN.md §3 for every registered detector, at its tiny size (torchvision's at their one
    size) on a 64 px input: trainable BatchNorm only (torchvision's GroupNorm heads too), a finite
    loss with every fixed predictor in its graph, ``predict`` in the sample format (leaving eval
    mode), ``preprocess`` at the input size, ``core`` at batch 2, and a neck whose maps have the
    stated strides."""
    torch.manual_seed(0)
    model = build_detector(name, 3, None, 64)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "BatchNorm2d" in kinds and "FrozenBatchNorm2d" not in kinds
    assert "GroupNorm" not in kinds or name in ("tv:fcos_resnet50_fpn", "tv:retinanet_resnet50_fpn_v2")
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [20.0, 24.0, 60.0, 62.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]

    model.train()
    losses = model.loss(images, targets)
    assert set(losses) == LOSS_TERMS[name]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # every fixed predictor is in the loss's graph (a level without positives may get a zero one)
    grads = [predictor.weight.grad for predictor in model.prune_ignored()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0

    predictions = model.predict(images)
    assert not model.training and len(predictions) == 2
    for p in predictions:
        assert set(p) == {"boxes", "scores", "labels"} and p["boxes"].shape == (len(p["scores"]), 4)
        assert len(p["labels"]) == 0 or (p["labels"].min() >= 0 and p["labels"].max() < 3)
    assert model.preprocess(images).shape == (2, 3, 64, 64)
    x = model.example_input(2)
    outputs = model.core(x)
    assert all(isinstance(out, Tensor) for out in outputs)
    # the form latency is timed on computes the same (YOLOv7's folded RepConv: float rounding)
    for a, b in zip(outputs, model.deployed().core(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)

    seen = []
    handle = model.neck.register_forward_hook(lambda m, i, out: seen.extend(_levels(out)))
    model.core(model.example_input())
    handle.remove()
    assert [f.shape[-2:] for f in seen] == [(math.ceil(64 / s),) * 2 for s in model.strides]


@pytest.mark.parametrize("name", ["fcos", "atss"])
def test_fcos_family_outputs(name: str) -> None:
    model = build_detector(name, 3, "tiny", 64).eval()
    cls, box, ctr = model.core(model.example_input(2))
    assert model.strides == (8, 16, 32, 64, 128)
    locations = sum(math.ceil(64 / s) ** 2 for s in model.strides)
    assert (
        cls.shape == (2, locations, 3) and box.shape == (2, locations, 4) and ctr.shape == (2, locations, 1)
    )


def test_unknown_detector_and_size() -> None:
    with pytest.raises(DetectorError, match="unknown detector 'yolo9'"):
        build_detector("yolo9", 3)
    with pytest.raises(DetectorError, match="unknown size"):
        build_detector("fcos", 3, size="huge")


def test_atss_picks_nearest_candidates_above_adaptive_threshold() -> None:
    # one level of 8x8 locations at stride 8 (anchor side 8), one box around location (3, 3)
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    centres = torch.stack([xs.flatten() * 8 + 4, ys.flatten() * 8 + 4], dim=1).float()
    anchors = torch.cat([centres - 4, centres + 4], dim=1)
    box = torch.tensor([[20.0, 20.0, 44.0, 44.0]])
    matched = atss_assign(anchors, [64], box, topk=9, anchor_scale=1.0)
    positives = set(torch.nonzero(matched == 0).flatten().tolist())
    assert positives and positives <= {r * 8 + c for r in (2, 3, 4, 5) for c in (2, 3, 4, 5)}
    assert 3 * 8 + 3 in positives  # the anchor at the box centre
    assert atss_assign(anchors, [64], torch.zeros(0, 4)).eq(-1).all()


def test_atss_anchor_goes_to_the_box_it_overlaps_most() -> None:
    centres = torch.tensor([[16.0, 16.0]])
    anchors = torch.cat([centres - 4, centres + 4], dim=1)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 10.0, 22.0, 22.0]])
    assert atss_assign(anchors, [1], boxes, topk=9, anchor_scale=1.0).item() == 1


def test_bad_checkpoint_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(DetectorError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorError, match="not a detprune checkpoint"):
        load_checkpoint(junk)
