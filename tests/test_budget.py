"""Matched budgets: targets, the ordered removal steps, and the bisection."""

from __future__ import annotations

import copy

import pytest
import torch

from detectors import build_detector
from methods import MethodError, PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.budget import removal_steps
from methods.engine.groups import GroupScores, score_groups
from methods.engine.sizes import count_channels, count_params


def test_target_parse_and_errors() -> None:
    assert Target.parse("params:0.3") == Target("params", 0.3)
    assert str(Target.parse("flops:0.40")) == "flops:0.4"
    for bad in ("params", "size:0.3", "params:abc", "params:0", "params:1.0", "channels:-0.1"):
        with pytest.raises(MethodError, match="bad target"):
            Target.parse(bad)


def test_unknown_method_and_option() -> None:
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        build_method("nope")
    with pytest.raises(MethodError, match="no option"):
        build_method("l1", bogus=1)


def _group(root: str, scores: list[float]) -> GroupScores:
    s = torch.tensor(scores, dtype=torch.float64)
    sorted_scores, order = torch.sort(s)
    return GroupScores(root, [root], order, sorted_scores)


def test_local_steps_keep_layers_at_the_same_fraction() -> None:
    groups = [_group("a", [1.0] * 4), _group("b", [1.0] * 8)]
    steps = removal_steps(groups, "local", round_to=1, max_layer_ratio=0.9)
    # fractions removed: a: 1/4, 2/4, 3/4; b: 1/8 .. 7/8; sorted by fraction, ties by group
    fractions = [removed / (4 if gi == 0 else 8) for gi, removed in steps]
    assert fractions == sorted(fractions)
    assert steps[:3] == [(1, 1), (0, 1), (1, 2)]
    assert max(r for gi, r in steps if gi == 0) == 3  # keeps >= 1 channel of 4 at ratio 0.9


def test_global_steps_follow_scores_and_round_to() -> None:
    groups = [_group("a", [5.0, 1.0, 9.0, 3.0]), _group("b", [2.0, 8.0, 4.0, 6.0])]
    steps = removal_steps(groups, "global", round_to=1, max_layer_ratio=1.0)
    assert steps == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
    rounded = removal_steps([_group("c", list(range(20)))], "local", round_to=8, max_layer_ratio=0.9)
    assert [r for _, r in rounded] == [4, 12]  # keeps 16, then 8 channels


def test_max_layer_ratio_caps_every_group() -> None:
    steps = removal_steps([_group("a", [1.0] * 10)], "local", round_to=1, max_layer_ratio=0.5)
    assert max(r for _, r in steps) == 5


def test_scores_cover_prunable_groups_only(toy) -> None:
    groups = score_groups(toy, build_method("l1").importance(toy, PruneContext()))
    roots = {g.root for g in groups}
    assert roots == {"conv1", "conv2"}  # the fixed predictors are never roots
    conv1 = next(g for g in groups if g.root == "conv1")
    expected = toy.conv1.weight.abs().sum(dim=(1, 2, 3)) + toy.conv2.weight.abs().sum(dim=(0, 2, 3))
    expected += toy.bn1.weight.abs() + toy.conv1.bias.abs() + toy.bn1.bias.abs()
    assert torch.argsort(expected).tolist()[:3] == conv1.order[:3].tolist()


@pytest.mark.parametrize("target", ["params:0.3", "params:0.6", "flops:0.4", "channels:0.5"])
def test_bisection_meets_every_target_within_half_a_point(target: str) -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    pruned = copy.deepcopy(model)
    t = Target.parse(target)
    report = prune(build_method("l1"), pruned, PruneContext(round_to=1), t)
    assert abs(report.achieved[t.kind] - t.rate) <= 0.005
    assert report.params_after == count_params(pruned) < count_params(model)
    assert count_channels(pruned) < count_channels(model)
    assert report.layers and all(after < before for before, after in report.layers.values())
    out = pruned.core(pruned.example_input())
    assert [o.shape for o in out] == [o.shape for o in model.core(model.example_input())]


def test_out_of_reach_target_is_one_clear_error(toy) -> None:
    with pytest.raises(MethodError, match="out of reach"):
        prune(
            build_method("l1"), toy, PruneContext(round_to=1, max_layer_ratio=0.2), Target.parse("params:0.9")
        )


def test_random_is_seeded(toy) -> None:
    a, b, c = (copy.deepcopy(toy) for _ in range(3))
    prune(build_method("random"), a, PruneContext(round_to=1, seed=1), Target.parse("channels:0.5"))
    prune(build_method("random"), b, PruneContext(round_to=1, seed=1), Target.parse("channels:0.5"))
    prune(build_method("random"), c, PruneContext(round_to=1, seed=2), Target.parse("channels:0.5"))
    assert torch.equal(a.conv2.weight, b.conv2.weight)
    assert not torch.equal(a.conv2.weight, c.conv2.weight)


def test_random_draws_are_other_choices_on_the_same_seed_and_draw_zero_is_the_seed(toy) -> None:
    pruned = {}
    for name, options, seed in (
        ("d0", {"draw": 0}, 1),
        ("plain", {}, 1),
        ("d1", {"draw": 1}, 1),
        ("d1b", {"draw": 1}, 1),
    ):
        model = copy.deepcopy(toy)
        prune(
            build_method("random", **options),
            model,
            PruneContext(round_to=1, seed=seed),
            Target.parse("channels:0.5"),
        )
        pruned[name] = model.conv2.weight
    assert torch.equal(pruned["d0"], pruned["plain"]) and torch.equal(pruned["d1"], pruned["d1b"])
    assert not torch.equal(pruned["d0"], pruned["d1"])
