"""GFL: the detector contract, a pruned checkpoint, the paper's losses and decode on hand-made
inputs with known answers, and the full-size parameter counts against the published ones."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from detectors import DetectorError, build_detector
from detectors.common import distribution_focal_loss, integral
from detectors.gfl import GFLHead, aligned_iou, quality_focal_loss
from methods.engine.sizes import count_params

REG_MAX = 16


def _one_hot_logits(sides: list[int], sharp: float = 50.0) -> torch.Tensor:
    """Distribution logits ``[4 (n + 1)]`` putting (almost) all mass on the given integers."""
    logits = torch.zeros(4, REG_MAX + 1)
    logits[torch.arange(4), torch.tensor(sides)] = sharp
    return logits.flatten()


# -- contract ------------------------------------------------------------------------------------


def test_layout() -> None:
    """What GFL adds to the contract (``tests/test_detectors.py``): the distribution outputs, the
    per-level scales in the graph, and the two predictors as the fixed layers."""
    torch.manual_seed(0)
    model = build_detector("gfl", 3, "tiny", 64)
    assert model.strides == (8, 16, 32, 64, 128)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    sum(model.train().loss(images, targets).values()).backward()
    assert model.head.gfl_reg.weight.grad.abs().sum() > 0 and model.head.scales[0].scale.grad is not None
    cls, dist = model.core(model.example_input(2))
    assert cls.shape == (2, 86, 3) and dist.shape == (2, 86, 4 * (REG_MAX + 1))
    assert model.prune_ignored() == [model.head.gfl_cls, model.head.gfl_reg]


def test_images_without_boxes_give_zero_box_losses() -> None:
    torch.manual_seed(0)
    model = build_detector("gfl", 3, "tiny", 64).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model.loss([torch.rand(3, 64, 64)] * 2, [empty, empty])
    assert losses["giou"].item() == 0 and losses["dfl"].item() == 0 and losses["qfl"].item() > 0
    sum(losses.values()).backward()


# -- the paper's math ----------------------------------------------------------------------------


def test_qfl_is_focal_loss_on_hard_labels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g) * 3
    labels = (torch.rand(50, 4, generator=g) > 0.7).float()
    expected = sigmoid_focal_loss(logits, labels, alpha=-1, gamma=2.0, reduction="none")
    torch.testing.assert_close(quality_focal_loss(logits, labels, beta=2.0), expected)


@pytest.mark.parametrize("y", [0.1, 0.45, 0.9])
def test_qfl_is_minimised_where_the_score_equals_the_soft_target(y: float) -> None:
    logits = torch.linspace(-8, 8, 4001)
    loss = quality_focal_loss(logits, torch.full_like(logits, y))
    best = logits[loss.argmin()].sigmoid().item()
    assert best == pytest.approx(y, abs=2e-3)
    at_target = torch.tensor([math.log(y / (1 - y))], requires_grad=True)
    value = quality_focal_loss(at_target, torch.tensor([y]))
    value.backward()
    assert value.item() == pytest.approx(0, abs=1e-6) and at_target.grad.abs().item() < 1e-6
    assert (loss[(logits.sigmoid() - y).abs() > 0.05] > 1e-4).all()


def test_integral_of_a_one_hot_distribution_is_that_integer() -> None:
    for i in (0, 5, REG_MAX):
        logits = torch.full((REG_MAX + 1,), -math.inf)
        logits[i] = 0.0
        assert integral(logits).item() == i
    assert integral(torch.zeros(REG_MAX + 1)).item() == pytest.approx(REG_MAX / 2)


def test_dfl_optimum_puts_the_two_neighbour_weights_and_integrates_to_the_target() -> None:
    y = torch.tensor([3.3])
    # the distribution DFL asks for: 0.7 on 3, 0.3 on 4; its integral is 3.3 exactly
    optimum = torch.full((1, REG_MAX + 1), -math.inf)
    optimum[0, 3], optimum[0, 4] = math.log(0.7), math.log(0.3)
    assert integral(optimum).item() == pytest.approx(3.3, abs=1e-6)
    entropy = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert distribution_focal_loss(optimum, y).item() == pytest.approx(entropy, abs=1e-6)
    # gradient descent from random logits finds the same distribution
    logits = torch.randn(1, REG_MAX + 1, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    for _ in range(600):
        optimiser.zero_grad()
        distribution_focal_loss(logits, y).sum().backward()
        optimiser.step()
    p = logits.detach().softmax(dim=-1)[0]
    assert p[3].item() == pytest.approx(0.7, abs=0.01) and p[4].item() == pytest.approx(0.3, abs=0.01)
    assert integral(logits.detach()).item() == pytest.approx(3.3, abs=0.03)
    # an integer target wants all mass on that integer
    assert distribution_focal_loss(_one_hot_logits([2, 2, 2, 2])[None, :17], torch.tensor([2.0])) < 1e-6


def test_giou_and_iou_known_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [10.0, 10.0, 20.0, 30.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [10.0, 10.0, 20.0, 30.0]])
    torch.testing.assert_close(aligned_iou(a, b), torch.tensor([1 / 7, 1.0]))
    giou = generalized_box_iou_loss(a, b, reduction="none")
    torch.testing.assert_close(giou, torch.tensor([1 - (1 / 7 - 2 / 9), 0.0]))


def test_decode_distances_in_strides_from_the_anchor_centre() -> None:
    head = GFLHead(8, 3, num_convs=1)
    anchor = torch.tensor([[96.0, 56.0, 104.0, 64.0]])  # stride 8, centre (100, 60)
    box = head.decode(_one_hot_logits([2, 1, 3, 4])[None], anchor)
    torch.testing.assert_close(box, torch.tensor([[84.0, 52.0, 124.0, 92.0]]))


def test_loss_targets_and_quality_weighting_on_a_hand_made_case() -> None:
    """Two positives: A predicts its box exactly, B predicts sides 2 where the truth is 1."""
    head = GFLHead(8, 3, num_convs=1)
    anchors = [torch.tensor([[12.0, 12.0, 20.0, 20.0], [36.0, 36.0, 44.0, 44.0]])]  # centres 16, 40
    targets = [
        {
            "boxes": torch.tensor([[0.0, 8.0, 40.0, 48.0], [32.0, 32.0, 48.0, 48.0]]),
            "labels": torch.tensor([1, 2]),
        }
    ]
    a, b = 2.0, -1.0
    cls_logits = torch.full((1, 2, 3), -30.0)
    cls_logits[0, 0, 1], cls_logits[0, 1, 2] = a, b
    dist = torch.stack([_one_hot_logits([2, 1, 3, 4]), _one_hot_logits([2, 2, 2, 2])])[None]
    losses = head.compute_loss(
        targets, {"cls_logits": cls_logits, "bbox_regression": dist}, anchors, [torch.tensor([0, 1])]
    )

    # B's box [24, 24, 56, 56] holds the truth [32, 32, 48, 48]: IoU 1/4 = GIoU, loss 3/4
    wa, wb = torch.sigmoid(torch.tensor(a)).item(), torch.sigmoid(torch.tensor(b)).item()
    assert losses["giou"].item() == pytest.approx(2.0 * wb * 0.75 / (wa + wb), rel=1e-5)
    # DFL: A's targets are its integers (loss ~0); B's are 1.0, predicted 2 with margin 50
    assert losses["dfl"].item() == pytest.approx(0.25 * wb * 50.0 / (wa + wb), rel=1e-4)
    # QFL: soft targets IoU 1 (A, class 1) and 1/4 (B, class 2), over 2 positives
    sa, sb = wa, wb
    qa = -math.log(sa) * (1 - sa) ** 2
    qb = -(0.25 * math.log(sb) + 0.75 * math.log(1 - sb)) * (0.25 - sb) ** 2
    assert losses["qfl"].item() == pytest.approx((qa + qb) / 2, rel=1e-4)


def test_detections_are_scored_by_the_joint_score_alone() -> None:
    model = build_detector("gfl", 3, "tiny", 64).eval()
    cls_logits = torch.full((1, 2, 3), -10.0)
    cls_logits[0, 1, 2] = math.log(0.9 / 0.1)  # score 0.9 for class 2 at location 1
    cls_logits[0, 0, 0] = math.log(0.04 / 0.96)  # below the 0.05 threshold
    dist = torch.stack([_one_hot_logits([1, 1, 1, 1]), _one_hot_logits([1, 2, 4, 1])])[None]
    anchors = [[torch.tensor([[12.0, 12.0, 20.0, 20.0], [36.0, 36.0, 44.0, 44.0]])]]
    (det,) = model.postprocess_detections(
        {"cls_logits": [cls_logits], "bbox_regression": [dist]}, anchors, [(64, 64)]
    )
    assert det["labels"].tolist() == [2]
    torch.testing.assert_close(det["scores"], torch.tensor([0.9]))
    torch.testing.assert_close(det["boxes"], torch.tensor([[32.0, 24.0, 64.0, 48.0]]))  # x2 = 72 clipped


# -- full size: parameters against the published counts ------------------------------------------


def _frozen_by_mmdet(model) -> int:
    """mmdet's ResNet-50 configs freeze the stem and layer1 (``frozen_stages=1``), and mmcv's
    complexity tool counts only parameters that require grad."""
    body = model.backbone.body
    return sum(p.numel() for m in (body.stem, body.layer1) for p in m.parameters())


def test_r50_parameter_counts_match_the_published_ones() -> None:
    # torchvision's fcos_resnet50_fpn (91 classes, GroupNorm head) publishes 32,269,600 parameters;
    # its FrozenBatchNorm2d keeps the ResNet's 53,120 affine values as buffers, ours trains them.
    # GroupNorm -> BatchNorm in the head leaves the count as is: the match is exact.
    fcos = build_detector("fcos", 91, "r50", 640)
    body_bn = sum(
        p.numel()
        for m in fcos.backbone.body.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    )
    assert body_bn == 53_120 and count_params(fcos) - body_bn == 32_269_600
    # P6 is computed from P5 (256 channels) as in mmdet's ATSS/GFL configs (add_extra_convs='on_output')
    assert fcos.backbone.fpn.extra_blocks.p6.in_channels == 256

    # LDT paper Table 4 (KITTI, 3 classes): ATSS 32.12 M, GFL 32.26 M, all parameters counted.
    # Tolerance: the published two decimals (+-5,000) plus, for ATSS, torchvision's FCOS tower
    # convs keep their bias under the norm (8 x 256 = 2,048) where mmdet's conv-norm modules drop it.
    atss3, gfl3 = build_detector("atss", 3, "r50", 640), build_detector("gfl", 3, "r50", 640)
    assert abs(count_params(atss3) - 32_120_000) <= 5_000 + 2_048
    assert abs(count_params(gfl3) - 32_260_000) <= 5_000
    # GFL's extra: 4 x 17 distribution outputs in place of 4 deltas + 1 centerness, no tower
    # conv biases, and five per-level scalar Scales
    assert count_params(gfl3) - count_params(atss3) == 63 * (256 * 9 + 1) - 2_048 + 5

    # mmdetection's COCO figures (80 classes): GFL 32.2 M, ATSS 32.1 M, trainable parameters only
    # (one decimal: +-50,000).
    gfl80, atss80 = build_detector("gfl", 80, "r50", 640), build_detector("atss", 80, "r50", 640)
    assert abs(count_params(gfl80) - _frozen_by_mmdet(gfl80) - 32_200_000) <= 50_000
    assert abs(count_params(atss80) - _frozen_by_mmdet(atss80) - 32_100_000) <= 50_000


def test_sizes_build() -> None:
    for size in ("tiny", "r18"):
        for name in ("fcos", "atss", "gfl"):
            assert count_params(build_detector(name, 3, size, 64)) > 0
    with pytest.raises(DetectorError, match="unknown size"):
        build_detector("gfl", 3, "huge")
