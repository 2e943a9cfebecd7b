"""Detector contract, the ATSS assigner, and checkpoints that survive pruning."""

from __future__ import annotations

import pytest
import torch

from detectors import DetectorError, build_detector, load_checkpoint
from detectors.fcos import atss_assign


@pytest.mark.parametrize("name", ["fcos", "atss"])
def test_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_detector(name, 3, "tiny", 64)
    assert model.strides == (8, 16, 32, 64, 128)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "BatchNorm2d" in kinds and not kinds & {"GroupNorm", "FrozenBatchNorm2d"}
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    model.train()
    losses = model.loss(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    model.eval()
    preds = model.predict(images)
    assert len(preds) == 2 and set(preds[0]) == {"boxes", "scores", "labels"}
    cls, box, ctr = model.core(model.example_input(2))
    assert cls.shape[-1] == 3 and box.shape[-1] == 4 and ctr.shape[-1] == 1
    assert model.preprocess(images).shape[-2:] == (64, 64)
    seen = []
    handle = model.neck.register_forward_hook(lambda m, i, out: seen.extend(out.values()))
    model.core(model.example_input())
    handle.remove()
    levels = [f.shape[-1] for f in seen]
    assert levels == [64 // s for s in model.strides[:3]] + [1, 1]


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
