"""YOLOv8: the published sizes, decode, the task-aligned assigner, the losses and C2f pruning,
each on hand-made inputs with answers the math fixes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchvision.ops import complete_box_iou

from detectors import DetectorError, build_detector
from detectors.common import integral
from detectors.yolov8 import REG_MAX, anchor_points, decode
from detectors.yolov8_blocks import C2f
from detectors.yolov8_loss import box_distances, task_aligned_assign, yolov8_loss
from methods import PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.sizes import count_params


def test_layout_and_initialisation() -> None:
    """What YOLOv8 adds to the contract (``tests/test_detectors.py``): Ultralytics' BatchNorm
    constants and ``bias_init``, flat per-location outputs, the predictors as the fixed layers."""
    torch.manual_seed(0)
    model = build_detector("yolov8", 3, None, 64)
    assert model.spec["size"] == "tiny" and model.strides == (8, 16, 32)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    for pred, s in zip(model.head.cls_preds, model.strides, strict=True):
        torch.testing.assert_close(pred.bias, torch.full((3,), math.log(5 / 3 / (640 / s) ** 2)))
    assert all(pred.bias.eq(1.0).all() for pred in model.head.box_preds)
    locations = sum((64 // s) ** 2 for s in model.strides)
    cls, box = model.core(model.example_input(2))
    assert cls.shape == (2, locations, 3) and box.shape == (2, locations, 4 * REG_MAX)
    assert {id(m) for m in model.prune_ignored()} == {
        id(m) for m in [*model.head.cls_preds, *model.head.box_preds]
    }
    assert model.neck is dict(model.named_children())["neck"]


def test_unknown_size_and_bad_input_size() -> None:
    with pytest.raises(DetectorError, match="unknown size 'huge'; known: n, s, m, l, x, tiny"):
        build_detector("yolov8", 3, size="huge")
    with pytest.raises(DetectorError, match="divisible by 32"):
        build_detector("yolov8", 3, input_size=100)


# Ultralytics' model summaries (yolov8.yaml, 80 classes, unfused): n 3,157,200, s 11,166,560,
# m 25,902,640 parameters. They count the frozen 16-weight DFL conv, which is an ``arange`` here
# (no parameter): the counts must be exactly 16 fewer. "tiny" is YOLOv8-n. GFLOPs:
# tests/test_published_sizes.py.
@pytest.mark.parametrize(
    ("size", "published"), [("n", 3_157_200), ("s", 11_166_560), ("m", 25_902_640), ("tiny", 3_157_200)]
)
def test_full_size_parameter_count(size: str, published: int) -> None:
    assert count_params(build_detector("yolov8", 80, size, 640)) == published - REG_MAX


def _one_hot_logits(bins: list[float], value: float = 30.0) -> Tensor:
    """Distribution logits ``[4 R]`` putting (almost) all mass of side ``i`` on bin ``bins[i]``."""
    logits = torch.zeros(4, REG_MAX)
    logits[torch.arange(4), torch.tensor(bins).long()] = value
    return logits.flatten()


def test_dfl_expectation_of_a_one_hot_is_its_bin() -> None:
    logits = _one_hot_logits([0, 5, 9, 15]).view(4, REG_MAX)
    torch.testing.assert_close(integral(logits), torch.tensor([0.0, 5.0, 9.0, 15.0]))


def test_anchor_points_and_decode() -> None:
    points, strides = anchor_points(64, 64, (8, 16, 32), torch.device("cpu"))
    assert points.shape == (64 + 16 + 4, 2) and strides[:64].eq(8).all() and strides[-4:].eq(32).all()
    torch.testing.assert_close(
        points[[0, 1, 8, 64, 80]], torch.tensor([[4.0, 4], [12, 4], [4, 12], [8, 8], [16, 16]])
    )
    # cell (0, 0) of stride 8, sides (l, t, r, b) = (1, 2, 3, 4) strides: (4 - 8, 4 - 16, 4 + 24, 4 + 32)
    logits = _one_hot_logits([1, 2, 3, 4])
    torch.testing.assert_close(
        decode(logits[None], points[:1], strides[:1])[0], torch.tensor([-4.0, -12, 28, 36])
    )
    # the same distribution at stride 32, cell (1, 1): centre (48, 48)
    boxes = decode(logits.repeat(len(points), 1), points, strides)
    torch.testing.assert_close(boxes[-1], torch.tensor([48.0 - 32, 48 - 64, 48 + 96, 48 + 128]))


def _grid(size: int = 8, stride: int = 8) -> Tensor:
    return anchor_points(size * stride, size * stride, (stride,), torch.device("cpu"))[0]


def test_assigner_takes_the_top_k_aligned_anchors_inside_the_box() -> None:
    points = _grid()  # centres 4, 12, ..., 60
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0]]])  # strictly contains centres 12..36: 16 anchors
    inside = ((points > 8) & (points < 40)).all(1)
    assert inside.sum() == 16
    g = torch.Generator().manual_seed(0)
    scores = torch.zeros(1, 64, 2)
    scores[0, :, 0] = torch.where(inside, torch.rand(64, generator=g) * 0.5 + 0.1, 0.99)  # outside: best
    pred = gt.expand(1, 64, 4).clone()  # every prediction is the box itself: CIoU 1
    labels, boxes, target_scores, fg, gt_index = task_aligned_assign(
        scores, pred, points, torch.tensor([[0]]), gt, torch.tensor([[True]]), topk=10
    )
    inside_scores = torch.where(inside, scores[0, :, 0], -1.0)
    expected = set(inside_scores.topk(10).indices.tolist())
    assert set(fg[0].nonzero().flatten().tolist()) == expected
    assert not fg[0, ~inside].any() and labels[0, fg[0]].eq(0).all() and gt_index[0, fg[0]].eq(0).all()
    torch.testing.assert_close(boxes[0, fg[0]], gt[0].expand(10, 4))
    # normalised targets: align metric / its best on the box x the best IoU (1): sqrt(s / s_max)
    best = scores[0, fg[0], 0].max()
    torch.testing.assert_close(target_scores[0, fg[0], 0], (scores[0, fg[0], 0] / best).sqrt())
    assert target_scores[0, ~fg[0]].eq(0).all() and target_scores[0, :, 1].eq(0).all()


def test_a_shared_anchor_goes_to_the_box_its_prediction_overlaps_most() -> None:
    points = _grid()
    gts = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [16.0, 16.0, 56.0, 56.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])  # the third is padding
    shared = 3 * 8 + 3  # centre (28, 28), inside both boxes
    scores = torch.full((1, 64, 1), 0.5)
    # the shared anchor predicts a box between the two, nearer ``winner``; every other anchor a
    # box overlapping neither (CIoU < 0, clamped: no alignment), so it is each box's top-1
    for winner, between in ((0, [4.0, 4.0, 44.0, 44.0]), (1, [12.0, 12.0, 52.0, 52.0])):
        pred = torch.tensor([60.0, 0.0, 64.0, 4.0]).repeat(1, 64, 1)
        pred[0, shared] = torch.tensor(between)
        labels, _, target_scores, fg, gt_index = task_aligned_assign(
            scores, pred, points, torch.zeros(1, 3, dtype=torch.long), gts, mask, topk=1
        )
        assert fg[0].nonzero().flatten().tolist() == [shared] and gt_index[0, shared] == winner
        ciou = complete_box_iou(gts[0, :2], pred[0, shared : shared + 1])[:, 0]
        assert ciou[winner] > ciou[1 - winner] > 0
        # the only positive of its box: target = its metric / itself x the box's best CIoU
        torch.testing.assert_close(target_scores[0, shared, 0], ciou[winner])
        assert torch.isfinite(target_scores).all() and target_scores[0, ~fg[0]].eq(0).all()
    # no box at all: every anchor is background
    _, _, target_scores, fg, _ = task_aligned_assign(
        scores, pred, points, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 4), mask[:, :0]
    )
    assert not fg.any() and target_scores.eq(0).all()


def _fractional_logits(targets: list[float], shift: float = 0.0) -> Tensor:
    """Per side, all mass on the two bins around the target, split by nearness (``shift`` moves
    mass from the left bin to the right one)."""
    probs = torch.full((4, REG_MAX), 1e-12)
    for side, t in enumerate(targets):
        left = int(t)
        probs[side, left] = max(left + 1 - t - shift, 1e-6)  # softmax renormalises
        probs[side, left + 1] = max(t - left + shift, 1e-6)
    return probs.log().flatten()


def test_dfl_is_least_at_the_split_of_a_fractional_target_and_ciou_of_equal_boxes_is_zero() -> None:
    # one positive at point (40, 40), stride 2, sides (3.3, 5.6, 0.2, 20) strides; 20 is clamped to 14.99
    points, strides = torch.tensor([[40.0, 40.0]]), torch.tensor([2.0])
    box = torch.tensor([[[40 - 6.6, 40 - 11.2, 40 + 0.4, 40 + 40]]])
    sides = [3.3, 5.6, 0.2, REG_MAX - 1 - 0.01]
    torch.testing.assert_close(box_distances(points, box[0], strides, REG_MAX)[0], torch.tensor(sides))

    def loss(logits: Tensor) -> dict[str, Tensor]:
        return yolov8_loss(
            torch.full((1, 1, 1), 20.0),
            logits.view(1, 1, -1),
            box,
            points,
            strides,
            torch.ones(1, 1, 1),
            box,
            torch.ones(1, 1, dtype=torch.bool),
            REG_MAX,
        )

    best = loss(_fractional_logits(sides))
    assert best["box"].abs().item() < 1e-5  # 1 - CIoU of identical boxes
    # the split distribution's cross-entropy to its own split is its entropy: the minimum
    weights = torch.tensor([[t - int(t), int(t) + 1 - t] for t in sides])
    entropy = -(weights * weights.log()).sum(1).mean()
    torch.testing.assert_close(best["dfl"], 1.5 * entropy, atol=1e-6, rtol=1e-5)
    for shift in (-0.1, 0.005, 0.1):
        assert loss(_fractional_logits(sides, shift))["dfl"] > best["dfl"]
    # and its expectation is the target distance: decoding gives the box back (the clamped side short)
    decoded = decode(_fractional_logits(sides)[None], points, strides)[0]
    torch.testing.assert_close(decoded[:3], box[0, 0, :3], atol=1e-4, rtol=0)
    assert decoded[3].item() == pytest.approx(40 + 2 * sides[3], abs=1e-4)


def test_loss_is_finite_and_trains_a_tiny_model() -> None:
    torch.manual_seed(0)
    model = build_detector("yolov8", 3, "tiny", 64).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [30.0, 10.0, 60.0, 44.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[10.0, 10.0, 10.0, 30.0]]), "labels": torch.tensor([0])},  # degenerate
    ]
    losses = model.loss(images, targets)
    assert set(losses) == {"box", "cls", "dfl"} and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head.box_preds.parameters())
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model.loss(images, empty)
    assert losses["box"] == 0 and losses["dfl"] == 0 and losses["cls"] > 0


def test_predict_scores_decodes_and_maps_back() -> None:
    # predictors fixed by hand: classes 0 and 1 score sigmoid(2) everywhere (class 2 below the
    # threshold), every side one stride long: a box of two strides around each anchor point
    model = build_detector("yolov8", 3, "tiny", 64)
    with torch.no_grad():
        for pred in [*model.head.cls_preds, *model.head.box_preds]:
            pred.weight.zero_()
            pred.bias.zero_()
        for cls, box in zip(model.head.cls_preds, model.head.box_preds, strict=True):
            cls.bias.copy_(torch.tensor([2.0, 2.0, -5.0]))
            box.bias.copy_(_one_hot_logits([1, 1, 1, 1]))
    (out,) = model.predict([torch.rand(3, 32, 32)])  # letterboxed by 2
    assert not model.training
    # no two boxes of a class overlap by 0.7: every (location, class) pair over the threshold stays
    assert len(out["boxes"]) == 2 * 84 and sorted(set(out["labels"].tolist())) == [0, 1]
    torch.testing.assert_close(out["scores"], torch.full((168,), torch.sigmoid(torch.tensor(2.0)).item()))
    boxes = {tuple(round(v, 3) for v in b) for b in out["boxes"].tolist()}
    assert (2.0, 2.0, 10.0, 10.0) in boxes  # stride 8, cell (1, 1): (4, 4, 20, 20) halved
    assert (0.0, 0.0, 6.0, 6.0) in boxes  # stride 8, cell (0, 0): (-4, -4, 12, 12) halved, clipped
    assert out["boxes"].min() >= 0 and out["boxes"].max() <= 32
    model.detections_per_img = 10
    assert len(model.predict([torch.rand(3, 32, 32)])[0]["boxes"]) == 10


def _kept_inputs(original: Tensor, pruned: Tensor) -> list[int]:
    """Index in ``original`` ``[out, in, k, k]`` of each input channel of ``pruned``, whose output
    rows are ``original``'s kept ones: the channel whose weights match exactly (one and only one)."""
    full, narrow = original.transpose(0, 1).flatten(1), pruned.transpose(0, 1).flatten(1)
    found = []
    for column in narrow:
        hits = (full == column).all(1).nonzero().flatten().tolist()
        assert len(hits) == 1
        found.append(hits[0])
    return found


def test_c2f_halves_are_pruned_as_one_coupled_group() -> None:
    """L1 at ``channels:0.5`` on tiny YOLOv8: ``core`` keeps its output shapes and, in every C2f,
    the channels ``cv1`` keeps are exactly the first ``2c`` inputs ``cv2`` keeps, those of its
    second half exactly the first bottleneck's inputs, and each bottleneck's kept outputs exactly
    ``cv2``'s kept inputs at that bottleneck's place. Kept output channels: every BatchNorm's
    running mean is tagged with its channel index beforehand; kept input channels: the pruned
    weights' columns matched to the original weights."""
    torch.manual_seed(0)
    model = build_detector("yolov8", 3, "tiny", 64).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.arange(bn.num_features, dtype=torch.float32))
    original = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
    }
    x = model.example_input(2)
    shapes = [out.shape for out in model.core(x)]
    prune(build_method("l1"), model, PruneContext(progress=False), Target.parse("channels:0.5"))
    assert [out.shape for out in model.core(x)] == shapes

    def kept_out(block: torch.nn.Module) -> list[int]:
        return block.bn.running_mean.long().tolist()

    def kept_in(name: str, block: torch.nn.Module) -> list[int]:
        return _kept_inputs(original[f"{name}.conv"][kept_out(block)], block.conv.weight.detach())

    c2fs = [(n, m) for n, m in model.named_modules() if isinstance(m, C2f)]
    assert len(c2fs) == 8
    uneven = 0
    for name, c2f in c2fs:
        half = c2f.c  # the unpruned half width
        cv1_kept = kept_out(c2f.cv1)
        cv2_in = kept_in(f"{name}.cv2", c2f.cv2)
        assert [i for i in cv2_in if i < 2 * half] == cv1_kept
        assert kept_in(f"{name}.m.0.cv1", c2f.m[0].cv1) == [i - half for i in cv1_kept if i >= half]
        for k, block in enumerate(c2f.m):
            offset = (2 + k) * half
            assert [i - offset for i in cv2_in if offset <= i < offset + half] == kept_out(block.cv2)
        second = sum(i >= half for i in cv1_kept)
        uneven += len(cv1_kept) - second != second
    assert uneven > 0  # halves pruned unequally: the case a ``chunk(2)`` would get wrong
