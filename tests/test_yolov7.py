"""YOLOv7: the layout, the published sizes, the deploy fusion, and decode / assigner / losses on
hand-made inputs; ELAN concatenations stay coupled under pruning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from detectors import DetectorError, build_detector, load_checkpoint, save_checkpoint
from detectors.common import dynamic_k_matching, ota_cost
from detectors.yolov7 import ELAN, MPDown, RepConv
from detectors.yolov7_loss import anchor_grid, decode, find_3_positive, yolov7_loss
from methods import PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.sizes import count_gmacs, count_params

LN2 = math.log(2.0)


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Distinct, non-trivial BatchNorm affines and statistics (fusion must fold all four).

    The statistics are the network's own on a random batch (a cumulative average over one
    training-mode pass), so the activations keep a realistic scale through every layer."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None
        was_training = model.training
        model.train()
        if hasattr(model, "core"):
            model.core(torch.rand(2, 3, 64, 64, generator=g))
        else:
            model(torch.randn(2, model.rbr_dense[0].in_channels, 12, 12, generator=g))
        model.train(was_training)
        for m in norms:
            m.momentum = 0.03


def test_layout_and_outputs() -> None:
    torch.manual_seed(0)
    tiny = build_detector("yolov7", 3, None, 64)  # tiny is the default size
    assert tiny.spec["size"] == "tiny" and tiny.strides == (8, 16, 32)
    kinds = {type(m) for m in tiny.modules()}
    assert nn.LeakyReLU in kinds and nn.SiLU not in kinds and RepConv not in kinds
    bn = next(m for m in tiny.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    locations = 3 * sum((64 // s) ** 2 for s in tiny.strides)
    cls, box, obj = tiny.eval().core(tiny.example_input(2))
    assert (
        cls.shape == (2, locations, 3) and box.shape == (2, locations, 4) and obj.shape == (2, locations, 1)
    )
    assert [m.out_channels for m in tiny.prune_ignored()] == [3 * 8] * 3
    assert {id(m) for m in tiny.prune_ignored()} == {id(m) for m in tiny.head.m}
    base = build_detector("yolov7", 3, "base", 64)
    assert sum(isinstance(m, RepConv) for m in base.modules()) == 3
    assert any(isinstance(m, nn.SiLU) for m in base.modules())


def test_unknown_size_and_bad_input_size() -> None:
    with pytest.raises(DetectorError, match="unknown size 'huge'; known: tiny, base"):
        build_detector("yolov7", 3, size="huge")
    with pytest.raises(DetectorError, match="divisible by 32"):
        build_detector("yolov7", 3, input_size=100)


# Parameter counts (80 classes). yolov7's own model summaries: training-time yolov7.yaml 37.62 M,
# fused deploy model 36.91 M; the README's 36.9 M / 6.2 M are the fused (deploy) model's, which
# the training-time base misses by 2%. GFLOPs: README 104.7 / 13.8 (fused model, thop): ours
# fused within 0.2% / 0.7%; the training-time rows are in test_published_sizes.py.
@pytest.mark.parametrize(
    ("size", "train", "fused", "published_m", "published_gflops"),
    [("tiny", 6_228_762, 6_219_709, 6.2, 13.8), ("base", 37_622_682, 36_905_341, 36.9, 104.7)],
)
def test_parameter_counts_and_the_published_figures(
    size: str, train: int, fused: int, published_m: float, published_gflops: float
) -> None:
    model = build_detector("yolov7", 80, size, 640)
    deploy = model.deployed()
    assert count_params(model) == train and count_params(deploy) == fused
    assert fused / 1e6 == pytest.approx(published_m, rel=0.01)
    assert 2 * count_gmacs(deploy, (640, 640)) == pytest.approx(published_gflops, rel=0.03)
    if size == "base":  # the published count is not the training-time model's
        assert train / 1e6 != pytest.approx(published_m, rel=0.01)


@pytest.mark.parametrize(("cin", "cout", "stride"), [(8, 8, 1), (8, 16, 1), (8, 16, 2)])
def test_repconv_fuses_to_one_conv_with_identical_outputs(cin: int, cout: int, stride: int) -> None:
    torch.manual_seed(0)
    block = RepConv(cin, cout, stride)
    assert (block.rbr_identity is not None) == (cin == cout and stride == 1)
    _randomise_norms(block)
    x = torch.randn(2, cin, 12, 12)
    expected = block.eval()(x)
    block.fuse()
    assert block.rbr_dense is None and isinstance(block.rbr_reparam, nn.Conv2d)
    assert block.rbr_reparam.kernel_size == (3, 3)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_deploy_model_matches_the_training_model() -> None:
    """The Conv+BN and implicit-layer folds over a whole (tiny) model, in float64: float32
    rounding over some 50 layers would hide a small error. RepConv: the test above."""
    torch.manual_seed(0)
    model = build_detector("yolov7", 3, "tiny", 64).eval()
    _randomise_norms(model)
    model.double()
    x = model.example_input(2).double()
    deploy = model.deployed()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert count_params(deploy) < count_params(model)
    for a, b in zip(model.core(x), deploy.core(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_mp_downsample_halves_and_concatenates_conv_then_pool() -> None:
    torch.manual_seed(0)
    mp = MPDown(16, 8).eval()
    x = torch.randn(1, 16, 32, 32)
    y = mp(x)
    assert y.shape == (1, 16, 16, 16)
    torch.testing.assert_close(y[:, :8], mp.cv2(mp.cv1(x)))
    torch.testing.assert_close(y[:, 8:], mp.cv_pool(nn.functional.max_pool2d(x, 2)))


def test_anchor_grid_order_and_decode() -> None:
    anchors = torch.tensor(
        [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    )
    anchors = anchors.float().view(3, 3, 2)
    cells, strides, wh, shapes = anchor_grid(64, 64, (8, 16, 32), anchors)
    assert shapes == [(8, 8), (4, 4), (2, 2)] and len(cells) == 3 * (64 + 16 + 4)
    i = 1 * 64 + 1 * 8 + 2  # level 0, anchor 1, row 1, column 2
    assert cells[i].tolist() == [2, 1] and strides[i] == 8 and wh[i].tolist() == [16, 30]
    # sigmoid(0) = 0.5: the centre of the cell, the anchor's size
    torch.testing.assert_close(
        decode(torch.zeros(4), cells[i], strides[i], wh[i]), torch.tensor([20.0, 12, 16, 30])
    )
    # saturated: half a cell beyond the cell's far corner, four times the anchor; the other way:
    # half a cell before it, size 0
    big = decode(torch.full((4,), 50.0), cells[i], strides[i], wh[i])
    torch.testing.assert_close(big, torch.tensor([(2 + 1.5) * 8, (1 + 1.5) * 8, 64.0, 120.0]))
    small = decode(torch.full((4,), -50.0), cells[i], strides[i], wh[i])
    torch.testing.assert_close(small, torch.tensor([(2 - 0.5) * 8, (1 - 0.5) * 8, 0.0, 0.0]))


def test_find_3_positive_centre_and_two_nearest_neighbours() -> None:
    # one box at (3.3, 4.7) cells, 2 x 2 cells; anchors of ratio 1 (kept), 4.5 and 5 (rejected)
    gt = torch.tensor([[3.3, 4.7, 2.0, 2.0]])
    anchors = torch.tensor([[2.0, 2.0], [9.0, 2.0], [0.4, 0.4]])
    box, anchor, gj, gi = find_3_positive(gt, anchors, 8, 8)
    assert box.tolist() == [0, 0, 0] and anchor.tolist() == [0, 0, 0]
    # centre (row 4, column 3); x in the left half -> column 2; y in the lower half -> row 5
    assert list(zip(gj.tolist(), gi.tolist(), strict=True)) == [(4, 3), (4, 2), (5, 3)]
    # a ratio of exactly anchor_t is rejected (strict), just under it kept
    assert find_3_positive(gt, torch.tensor([[8.0, 2.0]]), 8, 8)[0].numel() == 0
    assert find_3_positive(gt, torch.tensor([[7.9, 2.0]]), 8, 8)[0].numel() == 3
    # near the first cell: no neighbour across the grid's edge (gx, gy must exceed 1)
    _, _, gj, gi = find_3_positive(torch.tensor([[0.7, 0.2, 1.0, 1.0]]), torch.tensor([[1.0, 1.0]]), 8, 8)
    assert list(zip(gj.tolist(), gi.tolist(), strict=True)) == [(0, 0), (0, 1)]
    assert find_3_positive(torch.zeros(0, 4), anchors, 8, 8)[0].numel() == 0


def test_ota_cost_and_dynamic_k_matching() -> None:
    # logits 0: joint score sqrt(0.25) = 0.5, BCE ln 2 per class; a perfect box adds 3 * -log 1 = 0
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])
    cost, ious = ota_cost(torch.zeros(2, 3), torch.zeros(2), pred, gt, torch.tensor([1]))
    torch.testing.assert_close(ious, torch.tensor([[1.0, 0.5]]))
    torch.testing.assert_close(
        cost, torch.tensor([[3 * LN2, 3 * LN2 + 3 * math.log(2.0)]]), atol=1e-6, rtol=0
    )
    # k = int(sum of the top-10 IoUs) = int(2.7) = 2: the two cheapest win
    ious = torch.tensor([[0.9, 0.8, 0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    matched, _ = dynamic_k_matching(torch.arange(11, 0, -1).float()[None], ious)
    assert torch.nonzero(matched == 0).flatten().tolist() == [9, 10]
    # two boxes both take candidate 1; it goes to the cheaper one
    cost = torch.tensor([[1.0, 2.0, 9.0], [9.0, 1.5, 1.0]])
    ious = torch.tensor([[0.95, 0.95, 0.2], [0.2, 0.9, 0.95]])
    assert dynamic_k_matching(cost, ious)[0].tolist() == [0, 1, 1]
    cost[0, 1] = 1.2
    assert dynamic_k_matching(cost, ious)[0].tolist() == [0, 0, 1]


def test_losses_on_a_prediction_equal_to_its_box() -> None:
    # one level, one anchor (12 x 16) at stride 8; the box sits on cell (2, 2)'s centre with the
    # anchor's size, so raw zeros decode to it exactly: CIoU loss 0, objectness target 1; every
    # BCE of a zero logit is ln 2, whatever the target
    anchors = torch.tensor([[[12.0, 16.0]]])
    grid = anchor_grid(64, 64, (8,), anchors)
    num = 64
    gts = [(torch.tensor([[20.0, 20.0, 12.0, 16.0]]), torch.tensor([1]))]
    zeros = torch.zeros(1, num, 4, requires_grad=True)
    gains = {"box": 1.0, "obj": 1.0, "cls": 1.0}
    losses = yolov7_loss(
        torch.zeros(1, num, 2), zeros, torch.zeros(1, num, 1), gts, grid, anchors, (8,), gains
    )
    assert set(losses) == {"box", "obj", "cls"}
    assert losses["box"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["obj"].item() == pytest.approx(4.0 * LN2)  # P3's balance 4.0
    assert losses["cls"].item() == pytest.approx(LN2)


def test_loss_trains_and_gains_scale() -> None:
    torch.manual_seed(0)
    model = build_detector("yolov7", 3, "tiny", 64).train()
    # hyp.scratch.tiny: obj 1.0 * (64 / 640)^2, cls 0.5 * 3 / 80
    assert model.gains == pytest.approx({"box": 0.05, "obj": 0.01, "cls": 0.5 * 3 / 80})
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [20.0, 24.0, 60.0, 62.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model.loss(images, targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(ia.implicit.grad is not None and ia.implicit.grad.abs().sum() > 0 for ia in model.head.ia)


def test_predict_decodes_and_maps_back() -> None:
    # predictors fixed by hand: every anchor scores sigmoid(2)^2 for class 0 and predicts its
    # anchor box at its cell's centre (raw zeros)
    model = build_detector("yolov7", 3, "tiny", 64)
    with torch.no_grad():
        for pred, im in zip(model.head.m, model.head.im, strict=True):
            pred.weight.zero_()
            bias = torch.zeros(3, 8)
            bias[:, 4], bias[:, 5:] = 2.0, torch.tensor([2.0, -2.0, -2.0])
            pred.bias.copy_(bias.flatten())
            im.implicit.fill_(1.0)
    (out,) = model.predict([torch.rand(3, 32, 32)])  # letterboxed by 2
    assert not model.training and out["labels"].eq(0).all()
    torch.testing.assert_close(
        out["scores"], torch.full_like(out["scores"], torch.sigmoid(torch.tensor(2.0)).item() ** 2)
    )
    # stride 8, cell (1, 1), anchor 10 x 13: centre (12, 12) at 64 px, halved
    boxes = {tuple(round(v, 4) for v in b) for b in out["boxes"].tolist()}
    assert (3.5, 2.75, 8.5, 9.25) in boxes
    assert out["boxes"].min() >= 0 and out["boxes"].max() <= 32
    model.detections_per_img = 5
    assert len(model.predict([torch.rand(3, 32, 32)])[0]["boxes"]) == 5


def _kept_rows(original: nn.BatchNorm2d, pruned: nn.BatchNorm2d) -> list[int]:
    """The original channels a pruned norm kept, by its (distinct) running means."""
    match = (pruned.running_mean[:, None] == original.running_mean[None]).float().argmax(1)
    assert torch.equal(original.running_mean[match], pruned.running_mean)
    return match.tolist()


def _kept_columns(original: nn.Conv2d, pruned: nn.Conv2d, rows: list[int]) -> list[int]:
    """The original input channels a pruned conv kept, by matching its weight columns."""
    old = original.weight[rows].transpose(0, 1).flatten(1)  # [in, out' * k * k]
    new = pruned.weight.transpose(0, 1).flatten(1)
    dist = torch.cdist(new, old, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(1).values.max() < 1e-6
    return dist.argmin(1).tolist()


def test_elan_concatenations_stay_coupled_under_pruning(tmp_path) -> None:
    """channels:0.5 with L1: every layer feeding an ELAN's concatenation loses exactly the input
    channels the fusing 1x1 conv lost at that layer's offset; outputs keep their shapes."""
    torch.manual_seed(0)
    model = build_detector("yolov7", 3, "tiny", 64).eval()
    _randomise_norms(model)
    original = copy.deepcopy(model)
    x = model.example_input()
    shapes = [t.shape for t in model.core(x)]
    prune(build_method("l1"), model, PruneContext(round_to=1, progress=False), Target.parse("channels:0.5"))
    assert [t.shape for t in model.eval().core(x)] == shapes

    old_modules = dict(original.named_modules())
    pruned_elans = 0
    for name, elan in model.named_modules():
        if not isinstance(elan, ELAN):
            continue
        old = old_modules[name]
        feeders = [(elan.cv1, old.cv1), (elan.cv2, old.cv2)]
        feeders += [(elan.m[t - 1], old.m[t - 1]) for t in elan.taps]
        rows = _kept_rows(old.cv_out.bn, elan.cv_out.bn)
        columns = _kept_columns(old.cv_out.conv, elan.cv_out.conv, rows)
        offset = 0
        for new, orig in feeders[::-1]:  # the concatenation's order
            width = orig.conv.out_channels
            kept = [offset + k for k in _kept_rows(orig.bn, new.bn)]
            assert sorted(c for c in columns if offset <= c < offset + width) == sorted(kept), name
            offset += width
        assert offset == old.cv_out.conv.in_channels
        pruned_elans += elan.cv_out.conv.in_channels < offset
    assert pruned_elans > 0

    # ImplicitA, the predictor's input bias, lost the channels its conv lost; the deploy fold and
    # a checkpoint reload still fit the narrowed layer
    for i, ia in enumerate(model.head.ia):
        rows = _kept_rows(original.head.convs[i].bn, model.head.convs[i].bn)
        assert (
            ia.implicit.shape[1] == model.head.m[i].in_channels == len(rows) < original.head.m[i].in_channels
        )
        assert torch.equal(ia.implicit.flatten(), original.head.ia[i].implicit.flatten()[rows])
    double = copy.deepcopy(model).double()
    for a, b in zip(double.core(x.double()), double.deployed().core(x.double()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    reloaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "pruned.pt"))
    for a, b in zip(model.core(x), reloaded.eval().core(x), strict=True):
        torch.testing.assert_close(a, b)
