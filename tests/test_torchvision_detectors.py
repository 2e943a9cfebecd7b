"""torchvision's detection models behind the contract: their files load, they predict what
torchvision predicts, frozen norms become prunable without changing outputs, GroupNorms lose whole
groups. (A file that does not fit is a case of tests/test_bad_input.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import detection as tvd
from torchvision.ops import FrozenBatchNorm2d

from detectors import (
    DetectorError,
    build_detector,
    load_checkpoint,
    load_weights,
    read_state_dict,
    save_checkpoint,
)
from detectors.base import Detector
from detectors.norms import FixedBatchNorm2d
from detectors.torchvision_models import BUILDERS, coco_category_slots, fix_norms, from_torchvision
from methods import PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.groups import apply_removal, norm_groups, score_groups

SIZE = 96
# thresholds low enough that a randomly initialised model returns detections to compare
LOW_THRESHOLD = {
    "fcos_resnet50_fpn": {"score_thresh": 0.01},
    "retinanet_resnet50_fpn": {"score_thresh": 0.001},
    "retinanet_resnet50_fpn_v2": {"score_thresh": 0.001},
}


def _torchvision_model(builder: str, classes: int, **options: object) -> nn.Module:
    """torchvision's own model as a user builds it, with its norms' statistics made non-trivial."""
    torch.manual_seed(0)
    if builder.startswith("ssd"):
        model = getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=classes, **options)
        model.transform.min_size, model.transform.max_size = (SIZE,), SIZE
        model.transform.fixed_size = (SIZE, SIZE)
    else:
        model = getattr(tvd, builder)(
            weights=None, weights_backbone=None, num_classes=classes, min_size=SIZE, max_size=SIZE, **options
        )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def _images() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 80, 96, generator=g), torch.rand(3, 96, 64, generator=g)]


def _assert_same_detections(theirs: list[dict], ours: list[dict], offset: int) -> None:
    assert sum(len(p["boxes"]) for p in theirs) > 0  # something to compare
    for t, o in zip(theirs, ours, strict=True):
        torch.testing.assert_close(o["boxes"], t["boxes"], atol=1e-5, rtol=0)
        torch.testing.assert_close(o["scores"], t["scores"], atol=1e-5, rtol=0)
        assert torch.equal(o["labels"], t["labels"] - offset)


@pytest.mark.parametrize(
    "builder",
    [
        pytest.param(b, marks=[pytest.mark.slow] if b == "fasterrcnn_resnet50_fpn_v2" else [])
        for b in BUILDERS
    ],
)  # Faster R-CNN v2 (5 s: four conv layers on every proposal) runs with -m slow
def test_a_torchvision_state_dict_loads_and_predicts_what_torchvision_predicts(
    builder: str, tmp_path
) -> None:
    options = LOW_THRESHOLD.get(builder, {})
    offset = BUILDERS[builder].label_offset
    theirs = _torchvision_model(builder, 3 + offset, **options)
    torch.save(theirs.state_dict(), tmp_path / "tv.pt")  # as a torchvision user saves it

    ours = build_detector(f"tv:{builder}", 3, None, SIZE, **options)
    load_weights(ours, read_state_dict(tmp_path / "tv.pt"), tmp_path / "tv.pt")
    images = _images()
    with torch.no_grad():
        expected = theirs(images)
    _assert_same_detections(expected, ours.predict(images), offset)


def test_a_frozen_norm_file_loads_into_batchnorm_and_from_torchvision_makes_them_prunable(tmp_path) -> None:
    """torchvision's published files come from models with FrozenBatchNorm2d (no batch counter)."""
    builder = "fasterrcnn_mobilenet_v3_large_fpn"
    theirs = _torchvision_model(builder, 4)
    body = theirs.backbone.body
    for name, module in list(body.named_modules()):
        if isinstance(module, nn.BatchNorm2d):  # what weights=COCO_V1 builds: frozen norms
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(module, key).detach())
            parent = body.get_submodule(name.rpartition(".")[0]) if "." in name else body
            setattr(parent, name.rpartition(".")[2], frozen)
    state = theirs.state_dict()
    assert not any(k.endswith("num_batches_tracked") and k.startswith("backbone.body") for k in state)
    images = _images()
    with torch.no_grad():
        expected = theirs(images)

    plain = build_detector(f"tv:{builder}", 3, None, SIZE)
    load_weights(plain, state, "published.pth")
    _assert_same_detections(expected, plain.predict(images), 1)

    wrapped = from_torchvision(theirs, builder, 3)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in wrapped.modules())
    assert any(isinstance(m, FixedBatchNorm2d) for m in wrapped.backbone.body.modules())
    _assert_same_detections(expected, wrapped.predict(images), 1)

    reloaded, _ = load_checkpoint(save_checkpoint(wrapped, tmp_path / "wrapped.pt"))
    assert reloaded.spec["frozen_norms"] and type(reloaded) is type(wrapped)
    _assert_same_detections(expected, reloaded.predict(images), 1)


def test_fixed_batchnorm_is_frozen_batchnorm_in_training_too_and_prunes() -> None:
    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(8)
    frozen.weight.uniform_(0.5, 1.5)
    frozen.bias.normal_()
    frozen.running_mean.normal_()
    frozen.running_var.uniform_(0.5, 2.0)
    fixed = FixedBatchNorm2d.like(frozen).train()
    x = torch.randn(2, 8, 5, 5) * 3 + 1
    torch.testing.assert_close(fixed(x), frozen(x))  # batch statistics are never used
    torch.testing.assert_close(fixed.running_mean, frozen.running_mean)  # nor accumulated
    x.requires_grad_(True)
    fixed(x).sum().backward()  # the gradient reaches the input, never the affine
    assert x.grad is not None and fixed.weight.grad is None and fixed.bias.grad is None

    net = nn.Sequential(nn.Conv2d(3, 8, 1), fixed, nn.Conv2d(8, 2, 1)).eval()
    fix_norms(net)  # already fixed: left as it is
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(net, torch.randn(1, 3, 4, 4))
    graph.get_pruning_group(net[0], tp.prune_conv_out_channels, [1, 5]).prune()
    assert net[1].num_features == 6 and net[1].running_var.shape == (6,)
    torch.testing.assert_close(net[1].running_mean, frozen.running_mean[[0, 2, 3, 4, 6, 7]])


def test_coco_labels_use_torchvisions_91_slots() -> None:
    slots = coco_category_slots("ssdlite320_mobilenet_v3_large")
    assert len(slots) == 80 and slots[:3].tolist() == [1, 2, 3] and slots[-1].item() == 90
    assert 12 not in slots.tolist()  # COCO has no category 12 ("N/A" in torchvision's list)
    model = build_detector("tv:ssdlite320_mobilenet_v3_large", 80, None, 64, coco_labels=True)
    assert model.head.classification_head.module_list[0][-1].out_channels % 91 == 0
    assert model.to_model_labels(torch.tensor([0, 11, 79])).tolist() == [1, 13, 90]
    out = model.from_model_labels(
        {
            "boxes": torch.zeros(3, 4),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([13, 12, 1]),
        }
    )
    assert out["labels"].tolist() == [11, 0] and out["scores"].tolist() == pytest.approx([0.9, 0.7])
    with pytest.raises(DetectorError, match="80 COCO classes"):
        build_detector("tv:ssdlite320_mobilenet_v3_large", 3, None, 64, coco_labels=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"score_tresh": 0.1}, "did you mean 'score_thresh'"),
        ({"frozen_norms": "yes"}, "true or false"),
        ({"score_thresh": "high"}, "score_thresh must be a number"),
        ({"detections_per_img": 10.5}, "must be a whole number"),
    ],
)
def test_bad_torchvision_options_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        build_detector("tv:fcos_resnet50_fpn", 3, None, 64, **options)
    with pytest.raises(DetectorError, match="one size, 'full'"):
        build_detector("tv:fcos_resnet50_fpn", 3, "tiny", 64)


class GroupNormNet(Detector):
    """conv(3->16) -> GroupNorm(4 groups of 4) -> ReLU -> conv(16->2): one prunable group."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size, self.strides, self.spec = 8, (1,), {"name": "gn"}
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(16, 2, 1)

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        return (self.out(torch.relu(self.norm(self.conv(x)))),)

    def prune_ignored(self) -> list[nn.Module]:
        return [self.out]


class GivenScores:
    def __init__(self, scores: Tensor) -> None:
        self.scores = scores

    def __call__(self, group: object, **kwargs: object) -> Tensor:
        return self.scores


def test_groupnorm_groups_are_ranked_by_their_mean_and_removed_whole() -> None:
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    # channel scores: group 2 (channels 8..11) has the lowest mean though channel 1 is the lowest
    scores = torch.tensor([5.0, 0.0, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1, 9, 9, 9, 9])
    (group,) = score_groups(model, GivenScores(scores))
    assert group.unit == 4
    assert group.order.tolist()[:8] == [8, 9, 10, 11, 4, 5, 6, 7]
    assert group.sorted_scores[:8].tolist() == [1.0] * 4 + [3.0] * 4

    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model.norm(model.conv(x))
    apply_removal(model, [group], {group.root: 4})
    assert (model.norm.num_channels, model.norm.num_groups) == (12, 3)
    with torch.no_grad():  # the other groups normalise exactly as before
        torch.testing.assert_close(
            model.norm(model.conv(x)), before[:, [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]]
        )


def test_a_partial_groupnorm_removal_is_refused_and_round_to_respects_the_groups() -> None:
    from methods.engine.budget import removal_steps
    from methods.engine.types import MethodError

    model = GroupNormNet().eval()
    (group,) = score_groups(model, GivenScores(torch.arange(16.0)))
    assert {removed for _, removed in removal_steps([group], "local", round_to=1)} == {4, 8, 12}
    assert {removed for _, removed in removal_steps([group], "local", round_to=8)} == {8}
    with pytest.raises(MethodError, match="not a whole number of its 4-channel norm groups"):
        apply_removal(model, [group], {group.root: 2})
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(
        model, model.example_input(), forward_fn=lambda m, x: m.core(x)
    )
    (tp_group,) = graph.get_all_groups(ignored_layers=[model.out], root_module_types=(nn.Conv2d,))
    assert norm_groups(tp_group)[0] == 4


def test_fcos_prunes_whole_groupnorm_groups(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_detector("tv:fcos_resnet50_fpn", 3, None, 64).eval()
    g = torch.Generator().manual_seed(0)
    samples = [
        (
            torch.rand(3, 64, 64, generator=g),
            {"boxes": torch.tensor([[4.0, 4, 40, 30]]), "labels": torch.tensor([i % 3])},
        )
        for i in range(4)
    ]
    ctx = PruneContext(
        calibration=[([s[0] for s in samples], [s[1] for s in samples])], round_to=1, progress=False
    )
    prune(build_method("l1"), model, ctx, Target.parse("params:0.3"))
    norms = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert any(m.num_channels < 256 for m in norms)
    assert all(m.num_channels == 8 * m.num_groups for m in norms)  # 8 channels a group, as built
    reloaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "fcos.pt"))
    x = model.example_input()
    for a, b in zip(model.core(x), reloaded.eval().core(x), strict=True):
        torch.testing.assert_close(a, b)
