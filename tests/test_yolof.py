"""YOLOF: the Detector contract, uniform matching, the box coder, the losses and the published size."""

from __future__ import annotations

import pytest
import torch

from detectors import DetectorError, build_detector
from detectors.yolof import implicit_objectness
from detectors.yolof_loss import decode, encode, make_anchors, uniform_assign, uniform_match
from methods.engine.sizes import count_params

NUM_CLASSES = 3


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [20.0, 24.0, 60.0, 62.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def test_layout() -> None:
    """What YOLOF adds to the contract (``tests/test_detectors.py``): one stride-32 level with five
    anchors a location, positives on a 2x2 grid, objectness trained through the class loss."""
    torch.manual_seed(0)
    model = build_detector("yolof", NUM_CLASSES, "tiny", 64)
    assert model.strides == (32,)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    losses = model.train().loss(images, _targets())
    assert losses["loss_box_reg"] > 0  # the 40 px box has positives even on a 2x2 grid
    sum(losses.values()).backward()
    assert model.decoder.object_pred.weight.grad.abs().sum() > 0  # objectness is trained through cls
    cls, box, obj = model.core(model.example_input(2))
    assert (
        cls.shape == (2, 5 * NUM_CLASSES, 2, 2) and box.shape == (2, 20, 2, 2) and obj.shape == (2, 5, 2, 2)
    )
    assert {id(m) for m in model.prune_ignored()} == {
        id(model.decoder.cls_score),
        id(model.decoder.bbox_pred),
        id(model.decoder.object_pred),
    }


def test_unknown_size() -> None:
    with pytest.raises(DetectorError, match="unknown size 'huge'"):
        build_detector("yolof", NUM_CLASSES, size="huge")


def test_predict_maps_boxes_back_through_the_letterbox_scale() -> None:
    # predictors give every anchor probability ~1 and zero deltas: detections are the anchors
    torch.manual_seed(0)
    model = build_detector("yolof", 1, "tiny", 64)
    for conv in model.prune_ignored():
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    torch.nn.init.constant_(model.decoder.cls_score.bias, 20.0)
    torch.nn.init.constant_(model.decoder.object_pred.bias, 20.0)
    small, large = model.predict([torch.rand(3, 64, 64), torch.rand(3, 128, 128)])
    anchors = make_anchors(2, 2, 32, model.anchor_sizes, model.anchor_offset).clamp(0, 64)

    def rows(boxes: torch.Tensor) -> torch.Tensor:
        return torch.tensor(sorted(boxes.tolist()))

    assert len(small["boxes"]) > 0
    assert torch.cdist(small["boxes"], anchors).min(dim=1).values.max() < 1e-4  # clipped anchors
    torch.testing.assert_close(rows(large["boxes"]), 2 * rows(small["boxes"]))  # 128 px image, scale 1/2


# -- uniform matching on hand-made anchors: an 8x8 grid at stride 10, one 10x10 anchor per cell ------

ANCHORS = make_anchors(8, 8, 10, (10.0,), offset=0.5)  # centres 5, 15, ..., 75


def _cell(x: int, y: int) -> int:
    return y * 8 + x


def test_each_gt_gets_exactly_k_positives() -> None:
    # 12x12 boxes centred on cell corners: the 4 surrounding anchors tie (L1 cost 14), IoU 36/208
    gt = torch.tensor([[14.0, 14.0, 26.0, 26.0], [54.0, 34.0, 66.0, 46.0]])
    labels, anchor_index, gt_index = uniform_assign(
        ANCHORS, ANCHORS, gt, torch.tensor([0, 2]), NUM_CLASSES, k=4
    )
    assert set(torch.nonzero(labels == 0).flatten().tolist()) == {_cell(x, y) for x in (1, 2) for y in (1, 2)}
    assert set(torch.nonzero(labels == 2).flatten().tolist()) == {_cell(x, y) for x in (5, 6) for y in (3, 4)}
    assert (labels == NUM_CLASSES).sum() == 64 - 8  # everything else is background, nothing ignored
    # predictions equal the anchors, so each gt's pairs are its 4 anchors twice (both top-k lists)
    assert gt_index.bincount().tolist() == [8, 8]
    assert set(anchor_index[gt_index == 0].tolist()) == {_cell(x, y) for x in (1, 2) for y in (1, 2)}


def test_predicted_boxes_add_their_own_nearest() -> None:
    # anchor (7, 7) predicts the gt exactly: it is matched through the predicted boxes' top-k,
    # then dropped as a positive because its *anchor* does not overlap the gt (IoU 0 < 0.15)
    gt = torch.tensor([[14.0, 14.0, 26.0, 26.0]])
    pred = ANCHORS.clone()
    pred[_cell(7, 7)] = gt[0]
    anchor_index, gt_index = uniform_match(pred, ANCHORS, gt, k=4)
    assert anchor_index[:4].tolist()[0] == _cell(7, 7) and gt_index.tolist() == [0] * 8
    assert set(anchor_index[4:].tolist()) == {_cell(x, y) for x in (1, 2) for y in (1, 2)}
    labels, kept_anchor, _ = uniform_assign(pred, ANCHORS, gt, torch.tensor([1]), NUM_CLASSES, k=4)
    assert labels[_cell(7, 7)] == -1 and _cell(7, 7) not in kept_anchor.tolist()
    assert set(torch.nonzero(labels == 1).flatten().tolist()) == {_cell(x, y) for x in (1, 2) for y in (1, 2)}


def test_positive_below_pos_ignore_is_dropped() -> None:
    # the 8x8 box's nearest anchors overlap it by 16/148 < 0.15: its pairs are ignored, not positives
    gt = torch.tensor([[14.0, 14.0, 26.0, 26.0], [56.0, 36.0, 64.0, 44.0]])
    labels, anchor_index, gt_index = uniform_assign(
        ANCHORS, ANCHORS, gt, torch.tensor([0, 1]), NUM_CLASSES, k=4
    )
    weak = [_cell(x, y) for x in (5, 6) for y in (3, 4)]
    assert labels[weak].tolist() == [-1] * 4
    assert (labels == 1).sum() == 0 and (labels == 0).sum() == 4
    assert gt_index.tolist() == [0] * 8 and not set(anchor_index.tolist()) & set(weak)


def test_negative_above_neg_ignore_is_ignored() -> None:
    gt = torch.tensor([[10.0, 10.0, 22.0, 22.0]])  # nearest anchor: (1, 1), IoU 100/144
    pred = ANCHORS.clone()
    pred[_cell(1, 1)] = gt[0]  # the matched prediction, cost 0
    pred[_cell(6, 6)] = torch.tensor([10.0, 10.0, 22.0, 23.0])  # IoU 12/13 > 0.7, cost 1: not top-1
    pred[_cell(5, 6)] = torch.tensor([10.0, 10.0, 22.0, 30.0])  # IoU 0.6: stays background
    labels, anchor_index, _ = uniform_assign(pred, ANCHORS, gt, torch.tensor([2]), NUM_CLASSES, k=1)
    assert anchor_index.tolist() == [_cell(1, 1), _cell(1, 1)]
    assert labels[_cell(1, 1)] == 2
    assert labels[_cell(6, 6)] == -1
    assert labels[_cell(5, 6)] == NUM_CLASSES


def test_no_gt_means_all_background() -> None:
    labels, anchor_index, _ = uniform_assign(ANCHORS, ANCHORS, torch.zeros(0, 4), torch.zeros(0).long(), 3)
    assert (labels == 3).all() and anchor_index.numel() == 0


# -- box coder and losses --------------------------------------------------------------------------


def test_delta_encode_decode_are_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(50, 2, generator=g) * 200
    sizes = torch.rand(50, 2, generator=g) * 100 + 8
    anchors = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    shift = (torch.rand(50, 2, generator=g) - 0.5) * 40  # within the 32 px centre clamp
    scale = torch.exp((torch.rand(50, 2, generator=g) - 0.5) * 3)
    boxes = torch.cat([centres + shift - sizes * scale / 2, centres + shift + sizes * scale / 2], dim=1)
    torch.testing.assert_close(decode(anchors, encode(anchors, boxes)), boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        encode(anchors, decode(anchors, encode(anchors, boxes))), encode(anchors, boxes)
    )


def test_decode_clamps_the_centre_shift_and_scale() -> None:
    anchor = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    box = decode(anchor, torch.tensor([[5.0, -5.0, 0.0, 100.0]]))
    centre = (box[0, :2] + box[0, 2:]) / 2
    assert centre.tolist() == [50.0 + 32.0, 50.0 - 32.0]  # 500 px asked, 32 px allowed
    assert box[0, 3] - box[0, 1] == pytest.approx(100 * 1000 / 16, rel=1e-5)


def test_implicit_objectness_is_the_product_of_sigmoids() -> None:
    cls = torch.tensor([-60.0, -3.0, 0.0, 0.5, 2.0, 40.0, 90.0], dtype=torch.float64)
    obj = torch.tensor([5.0, 1.0, 0.0, -2.0, 2.0, -1.0, 90.0], dtype=torch.float64)
    normalised = implicit_objectness(cls, obj)
    assert torch.isfinite(normalised).all()
    torch.testing.assert_close(normalised.sigmoid(), cls.sigmoid() * obj.sigmoid())


# -- checkpoints and the published size -----------------------------------------------------------


def test_r50_matches_the_published_parameter_count() -> None:
    # Chen et al. 2021, Table 1: YOLOF R50-C5, 44M parameters (80 COCO classes), rounded to the
    # million, hence +-0.5M; our convs before BN drop the official biases (7,168 parameters).
    model = build_detector("yolof", 80, "r50", 640)
    assert count_params(model) == pytest.approx(44e6, abs=0.5e6)
    assert count_params(model.backbone) == 23_508_032  # torchvision ResNet-50 without its fc
