"""YOLOX: the contract, the published sizes, and SimOTA / decode / IoU loss on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from detectors import DetectorError, build_detector, load_checkpoint, save_checkpoint
from detectors.common import dynamic_k_matching
from detectors.yolox import PRIOR_PROB
from detectors.yolox_loss import decode, encode, iou_loss, location_grid, simota_assign
from methods import PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.sizes import count_params


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [30.0, 10.0, 60.0, 44.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def test_layout_and_initialisation() -> None:
    """What YOLOX adds to the contract (``tests/test_detectors.py``): SiLU, YOLOX's BatchNorm
    constants and prior bias, per-location outputs, the L1 term off before its epochs."""
    torch.manual_seed(0)
    model = build_detector("yolox", 3, "tiny", 64)
    assert model.strides == (8, 16, 32)
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    prior = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
    for pred in [*model.head.cls_preds, *model.head.obj_preds]:
        torch.testing.assert_close(pred.bias, torch.full_like(pred.bias, prior))

    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    assert model.train().loss(images, _targets())["l1"].item() == 0.0
    locations = sum((64 // s) ** 2 for s in model.strides)
    cls, reg, obj = model.core(model.example_input(2))
    assert (
        cls.shape == (2, locations, 3) and reg.shape == (2, locations, 4) and obj.shape == (2, locations, 1)
    )
    assert {id(m) for m in model.prune_ignored()} == {
        id(m) for m in [*model.head.cls_preds, *model.head.reg_preds, *model.head.obj_preds]
    }


def test_l1_loss_switches_on_for_the_last_epochs() -> None:
    torch.manual_seed(0)
    model = build_detector("yolox", 3, "tiny", 64, l1_epochs=2).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    model.set_epoch(7, 10)
    assert model.loss(images, _targets())["l1"].item() == 0.0
    model.set_epoch(8, 10)
    assert model.loss(images, _targets())["l1"].item() > 0.0


def test_unknown_size_and_bad_input_size() -> None:
    with pytest.raises(DetectorError, match="unknown size 'huge'"):
        build_detector("yolox", 3, size="huge")
    with pytest.raises(DetectorError, match="divisible by 32"):
        build_detector("yolox", 3, input_size=100)


# Published parameter counts, each printed to a fixed number of decimals: the check is that the
# measured count rounds to the printed figure, i.e. a tolerance of half a unit in its last digit
# (0.005 M). One 3x3 conv more or less anywhere moves the count by far more than that.
# YOLOX README (Megvii-BaseDetection/YOLOX): Nano 0.91 M, Tiny 5.06 M, S 9.0 M (8.97 M in YOLOX's
# model summary); LDT paper Table 4 (KITTI, 3 classes): YOLOX-S 8.94 M. GFLOPs: test_published_sizes.
@pytest.mark.parametrize(
    ("size", "classes", "published", "decimals"),
    [("nano", 80, 0.91, 2), ("tiny", 80, 5.06, 2), ("s", 80, 8.97, 2), ("s", 80, 9.0, 1), ("s", 3, 8.94, 2)],
)
def test_full_size_parameter_count(size: str, classes: int, published: float, decimals: int) -> None:
    assert round(count_params(build_detector("yolox", classes, size, 640)) / 1e6, decimals) == published


def test_decode_inverts_encode_on_the_grid() -> None:
    cells, strides = location_grid(64, 64, (8, 16, 32), torch.device("cpu"))
    assert cells.shape == (64 + 16 + 4, 2) and strides[:64].eq(8).all() and strides[-4:].eq(32).all()
    # location (x=2, y=1) of stride 8: offsets (0.5, 0.25) and log-size 0 -> centre (20, 10), side 8
    i = 1 * 8 + 2
    reg = torch.tensor([0.5, 0.25, 0.0, math.log(2.0)])
    torch.testing.assert_close(decode(reg, cells[i], strides[i]), torch.tensor([20.0, 10.0, 8.0, 16.0]))
    boxes = torch.rand(len(cells), 4) * torch.tensor([64.0, 64.0, 60.0, 60.0]) + torch.tensor(
        [0, 0, 1.0, 1.0]
    )
    torch.testing.assert_close(decode(encode(boxes, cells, strides), cells, strides), boxes)


def test_iou_loss() -> None:
    boxes = torch.tensor([[10.0, 10.0, 4.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(iou_loss(boxes, boxes), torch.zeros(2))
    # half-overlapping squares: IoU = 2 / 6 = 1/3, loss = 1 - 1/9; disjoint boxes: loss 1
    pred = torch.tensor([[1.0, 1.0, 2.0, 2.0], [50.0, 50.0, 2.0, 2.0]])
    target = torch.tensor([[2.0, 1.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(iou_loss(pred, target), torch.tensor([1 - 1 / 9, 1.0]))


def _one_level(size: int = 8, stride: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return location_grid(size * stride, size * stride, (stride,), torch.device("cpu"))


def test_simota_never_picks_a_location_outside_the_candidate_region() -> None:
    cells, strides = _one_level()
    centres = (cells + 0.5) * strides[:, None]
    gt = torch.tensor([[20.0, 20.0, 8.0, 8.0]])  # (cx, cy, w, h): covers centres 16..24
    # make far locations look perfect: exactly the box, confident and of the right class
    pred = torch.tensor([[40.0, 40.0, 30.0, 30.0]]).repeat(len(cells), 1)
    far = (centres - gt[:, :2]).abs().max(1).values >= 2.5 * 8
    pred[far] = gt
    cls_logits = torch.where(far[:, None], 10.0, -10.0) * torch.tensor([[-1.0, 1.0]])
    obj_logits = torch.where(far[:, None], 10.0, -10.0)
    matched, matched_iou = simota_assign(cls_logits, obj_logits, pred, cells, strides, gt, torch.tensor([1]))
    positives = matched >= 0
    assert positives.any() and not positives[far].any()
    assert matched_iou[~positives].eq(0).all()


def test_dynamic_k_is_the_clamped_sum_of_the_top_ious() -> None:
    # ten candidates; IoUs sum to 2.7 over the top 10 -> k = 2; the cheapest two win
    ious = torch.tensor([[0.9, 0.8, 0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    cost = torch.arange(11, 0, -1).float()[None]  # the last candidates are the cheapest
    matched, iou = dynamic_k_matching(cost, ious)
    assert torch.nonzero(matched == 0).flatten().tolist() == [9, 10]
    assert iou[9:].eq(0).all()
    # all IoUs tiny: k is clamped to 1
    matched, _ = dynamic_k_matching(cost, torch.full((1, 11), 0.05))
    assert (matched == 0).sum() == 1 and matched[10] == 0
    # only the top 10 count: eleven IoUs of 0.55 give int(5.5) = 5, not int(6.05)
    matched, _ = dynamic_k_matching(cost, torch.full((1, 11), 0.55))
    assert (matched == 0).sum() == 5


def test_simota_dynamic_k_from_predicted_ious() -> None:
    cells, strides = _one_level()
    gt = torch.tensor([[32.0, 32.0, 16.0, 16.0]])
    # every location predicts the middle half of the box's height (IoU 0.5): the top-10 IoUs sum to 5;
    # 16 candidates (centres within 2.5 strides), 4 of them also inside the box
    pred = torch.tensor([[32.0, 32.0, 16.0, 8.0]]).repeat(len(cells), 1)
    zeros = torch.zeros(len(cells), 1)
    matched, matched_iou = simota_assign(
        zeros.repeat(1, 3), zeros, pred, cells, strides, gt, torch.tensor([0])
    )
    assert (matched == 0).sum() == 5
    torch.testing.assert_close(matched_iou[matched == 0], torch.full((5,), 0.5))
    centres = (cells[matched == 0] + 0.5) * 8
    inside = ((centres > 24) & (centres < 40)).all(1)
    assert inside.sum() == 4  # the four in both regions are cheaper than every other candidate


def test_a_location_claimed_by_two_boxes_goes_to_the_cheaper() -> None:
    # two boxes, three candidates; each takes k = int(2.1) = 2, both candidate 1, box 1 cheaper there
    cost = torch.tensor([[1.0, 2.0, 9.0], [9.0, 1.5, 1.0]])
    ious = torch.tensor([[0.95, 0.95, 0.2], [0.2, 0.9, 0.95]])
    matched, iou = dynamic_k_matching(cost, ious)
    assert matched.tolist() == [0, 1, 1]
    torch.testing.assert_close(iou, torch.tensor([0.95, 0.9, 0.95]))  # the IoU with the winner
    cost[0, 1] = 1.2  # now box 0 is the cheaper claimant
    matched, iou = dynamic_k_matching(cost, ious)
    assert matched.tolist() == [0, 0, 1]
    torch.testing.assert_close(iou, torch.tensor([0.95, 0.95, 0.95]))


def test_predict_scores_decodes_and_maps_back() -> None:
    # predictors fixed by hand: every location scores sigmoid(2) * sigmoid(2) for class 0 and
    # predicts a stride-sized box at its cell's corner (dx = dy = dw = dh = 0)
    model = build_detector("yolox", 3, "tiny", 64)
    head = model.head
    with torch.no_grad():
        for pred in [*head.cls_preds, *head.reg_preds, *head.obj_preds]:
            pred.weight.zero_()
            pred.bias.zero_()
        for cls, obj in zip(head.cls_preds, head.obj_preds, strict=True):
            cls.bias.copy_(torch.tensor([2.0, -2.0, -2.0]))
            obj.bias.fill_(2.0)
    (out,) = model.predict([torch.rand(3, 32, 32)])  # letterboxed by 2
    assert len(out["boxes"]) == 64 + 16 + 4  # no two boxes overlap by 0.65
    assert out["labels"].eq(0).all()
    torch.testing.assert_close(out["scores"], torch.full((84,), torch.sigmoid(torch.tensor(2.0)).item() ** 2))
    boxes = {tuple(b) for b in out["boxes"].tolist()}
    assert (2.0, 2.0, 6.0, 6.0) in boxes  # stride 8, cell (1, 1): centre (8, 8), side 8, halved
    assert (0.0, 0.0, 8.0, 8.0) in boxes  # stride 32, cell (0, 0): (-16, -16, 16, 16) halved, clipped
    assert out["boxes"].min() >= 0 and out["boxes"].max() <= 32
    model.detections_per_img = 10
    assert len(model.predict([torch.rand(3, 32, 32)])[0]["boxes"]) == 10


def test_nano_is_depthwise_and_prunes(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_detector("yolox", 3, "nano", 64).eval()
    assert any(m.groups > 1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    prune(build_method("l1"), model, PruneContext(round_to=1), Target.parse("params:0.3"))
    reloaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "nano.pt"))
    x = model.example_input()
    torch.testing.assert_close(model.core(x)[0], reloaded.eval().core(x)[0])
