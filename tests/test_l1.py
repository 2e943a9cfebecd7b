"""L1 and random go through the one group reduction (``ChannelScores``) and choose as before.

L1 used torch-pruning's ``GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)``
and random a seeded ``torch.rand`` per group in the engine's group order: both are kept here as
the references the shared reduction must reproduce bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import Tensor, nn

import methods  # noqa: F401  (registers the methods)
from detectors import build_detector
from methods.engine.groups import dependency_graph, prunable_groups, score_groups
from methods.engine.types import PruneContext
from methods.l1 import L1, input_l1, output_l1
from methods.random import Random


def _reference_l1() -> tp.importance.Importance:
    return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)


class _ReferenceRandom(tp.importance.Importance):
    """The former random importance: one draw per group, as the engine calls the groups."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: tp.Group, **kwargs: object) -> Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


class Mixed(nn.Module):
    """Every kind of layer the magnitude reduction meets: BN, grouped and depthwise convs, a
    transposed conv, a residual add, a LayerNorm and linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.out = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.depthwise(self.grouped(x))
        x = self.pool(self.up(x)).flatten(1)
        return self.out(self.norm(self.fc(x)))


def _groups(model: nn.Module, example: Tensor, ignored: list[nn.Module]) -> list[tp.Group]:
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return list(graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)))


def _same(reference: Tensor | None, mine: Tensor | None) -> bool:
    if reference is None or mine is None:
        return reference is None and mine is None
    return mine.dtype == reference.dtype and torch.equal(reference, mine)


def test_l1_layer_scores_are_the_filter_and_input_sums() -> None:
    w = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 0.0]]]])  # [C_out=2, C_in=1, 1, 2]
    assert torch.equal(output_l1(w), torch.tensor([3.0, 0.5]))
    assert torch.equal(input_l1(w), torch.tensor([3.5]))
    # a grouped conv, as torch-pruning reads it: slot j of every group, summed over all filters
    assert torch.equal(input_l1(torch.ones(4, 2, 1, 1), groups=2, in_channels=4), torch.full((4,), 4.0))


def test_l1_reduction_equals_torch_pruning_magnitude_on_hand_built_groups() -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    for m in model.modules():  # norms away from their all-ones start, so they count visibly
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.uniform_(m.weight, -2, 2)
    groups = _groups(model, torch.randn(1, 3, 8, 8), [model.out])
    assert len(groups) == 2  # fc+norm+out; stem+bn+grouped(in)+depthwise+up(in), coupled by the add
    mine = L1().importance(model, PruneContext())
    for group in groups:
        assert _same(_reference_l1()(group), mine(group)), group[0].dep.target.module


@pytest.mark.parametrize("name", ["fcos", "yolox", "yolov8"])
def test_l1_reduction_equals_torch_pruning_magnitude_on_detectors(name: str) -> None:
    torch.manual_seed(0)
    model = build_detector(name, 3, "tiny", 64).eval()
    mine = L1().importance(model, PruneContext())
    groups = prunable_groups(model, dependency_graph(model))
    assert groups
    for group in groups:
        assert _same(_reference_l1()(group), mine(group)), group[0].dep.target.module
    ours, theirs = score_groups(model, mine), score_groups(model, _reference_l1())
    assert [(g.root, g.order.tolist()) for g in ours] == [(g.root, g.order.tolist()) for g in theirs]


@pytest.mark.parametrize("draw", [0, 2])
def test_random_draws_the_same_numbers_in_the_same_order(draw: int) -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    ctx = PruneContext(seed=3)
    mine = score_groups(model, Random(draw=draw).importance(model, ctx))
    theirs = score_groups(model, _ReferenceRandom(3 + 1_000_003 * draw))
    assert [(g.root, g.order.tolist()) for g in mine] == [(g.root, g.order.tolist()) for g in theirs]
    assert all(torch.equal(a.sorted_scores, b.sorted_scores) for a, b in zip(mine, theirs, strict=True))
