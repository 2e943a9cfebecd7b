"""ThiNet: its sampled contributions add up to the next layer's output, its greedy choice equals
exhaustive search where the error is additive (and where it may not, shown), its refit reaches
the least-squares optimum, and the coupling switch sums or takes the first consumer."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from detectors import build_detector
from methods import MethodError, PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.groups import score_groups
from methods.thinet import _sample_contributions, thinet_greedy, thinet_refit, thinet_scores
from tests.conftest import ToyDetector


def _error(x: torch.Tensor, removed: list[int]) -> float:
    return float((x[:, removed].sum(dim=1) ** 2).sum())


def _exhaustive(x: torch.Tensor, r: int) -> float:
    return min(_error(x, list(t)) for t in itertools.combinations(range(x.shape[1]), r))


def test_sampled_contributions_add_up_to_the_conv_output() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 4, 9, 7)
    contrib, o = _sample_contributions(conv, x, 5, torch.Generator().manual_seed(0))
    assert contrib.shape == (10, 4)
    y = conv(x)
    # each sample's channel contributions sum to one element of the output, at its image and
    # output channel (the location is recovered as the matching element)
    for i in range(10):
        row = y[i // 5, o[i]].flatten()
        assert torch.isclose(row, contrib[i].sum(), atol=1e-5).any()


def test_greedy_equals_exhaustive_where_the_error_is_additive() -> None:
    # orthogonal contributions over the samples: the error of a set is the sum of its norms
    q, _ = torch.linalg.qr(
        torch.randn(12, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    x = q * torch.tensor([3.0, 0.5, 2.0, 0.1, 1.0, 4.0], dtype=torch.float64)
    order = thinet_greedy(x).tolist()
    assert order == [3, 1, 4, 2, 0, 5]  # smallest contribution first
    for r in range(1, 6):
        assert _error(x, order[:r]) == pytest.approx(_exhaustive(x, r), rel=1e-9)


def test_greedy_may_miss_a_cancelling_pair_that_exhaustive_search_finds() -> None:
    """Where contributions correlate, a channel's value depends on the set: two large channels
    that cancel are the best pair to remove, but greedy takes the smallest one first."""
    g = torch.Generator().manual_seed(2)
    big = torch.randn(20, generator=g) * 5
    x = torch.stack([big, -big, torch.randn(20, generator=g) * 0.3, torch.randn(20, generator=g)], dim=1)
    order = thinet_greedy(x).tolist()
    assert order[0] == 2 and _exhaustive(x, 2) == pytest.approx(0.0, abs=1e-9)
    assert _error(x, order[:2]) > _exhaustive(x, 2)
    scores = thinet_scores(x)
    assert scores.argsort().tolist() == order and scores.min() == 0 and scores.max() == 0.75


def test_the_refit_reaches_the_least_squares_optimum() -> None:
    g = torch.Generator().manual_seed(3)
    kept, outputs = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, generator=g)
    w = thinet_refit(kept, outputs)
    residual = kept @ w - outputs.double()
    torch.testing.assert_close(kept.T @ residual, torch.zeros(5, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(w, torch.linalg.solve(kept.T @ kept, kept.T @ outputs.double()))


class _Toy(ToyDetector):
    def preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(images)


def test_after_removal_weighs_the_kept_inputs_by_the_refit_and_lowers_the_error() -> None:
    torch.manual_seed(0)
    toy = _Toy().eval()
    g = torch.Generator().manual_seed(4)
    batches = [([torch.rand(3, 16, 16, generator=g) for _ in range(8)], [{}] * 8) for _ in range(4)]
    ctx = PruneContext(calibration=batches, round_to=1, progress=False)
    method = build_method("thinet", samples=20)
    method.prepare(toy, ctx)
    contrib, _ = method.collected["conv2"]  # conv2 reads conv1's 8 channels
    kept = sorted(set(range(8)) - set(thinet_greedy(contrib)[:2].tolist()))
    with torch.no_grad():  # what the engine's removal does to conv2: its inputs sliced
        sliced = toy.conv2.weight[:, kept].clone()
        toy.conv2.weight = nn.Parameter(sliced.clone())
    method.after_removal(toy, ctx, {"conv2": {"in": kept, "out": list(range(16))}})
    w = thinet_refit(contrib[:, kept], contrib.sum(dim=1))
    torch.testing.assert_close(toy.conv2.weight, sliced * w.float()[None, :, None, None])
    target = contrib.double().sum(dim=1)
    plain = ((contrib[:, kept].double().sum(dim=1) - target) ** 2).sum()
    assert ((contrib[:, kept].double() @ w - target) ** 2).sum() < plain


def test_pruning_with_thinet_meets_the_budget_and_refits(toy) -> None:
    model = _Toy().eval()
    model.load_state_dict(toy.state_dict())
    g = torch.Generator().manual_seed(6)
    batches = [([torch.rand(3, 16, 16, generator=g) for _ in range(8)], [{}] * 8) for _ in range(4)]
    method = build_method("thinet", samples=20)
    report = prune(
        method,
        model,
        PruneContext(calibration=batches, round_to=1, progress=False),
        Target.parse("channels:0.25"),
    )
    assert abs(report.achieved["channels"] - 0.25) <= 0.005
    kept_in = sorted(set(range(8)) - set(thinet_greedy(method.collected["conv2"][0])[:2].tolist()))
    # conv2 lost 2 inputs and 4 outputs; its kept slices are rescaled, not merely sliced
    original = toy.conv2.weight[:, kept_in]
    assert not any(torch.allclose(model.conv2.weight[0], original[o]) for o in range(16))


def test_coupling_sum_adds_every_consumers_scores_and_root_takes_the_first() -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    g = torch.Generator().manual_seed(5)
    batches = [([torch.rand(3, 64, 64, generator=g) for _ in range(4)], [{}] * 4)]
    ctx = PruneContext(calibration=batches, round_to=1, progress=False)
    scored, collected = {}, {}
    for coupling in ("root", "sum"):
        method = build_method("thinet", coupling=coupling)
        method.prepare(model, ctx)
        collected[coupling] = method.collected
        scored[coupling] = {s.root: s for s in score_groups(model, method.importance(model, ctx))}
    root = "backbone.body.stem.0"  # its channels feed layer1's convs and the residual adds
    group = scored["sum"][root]
    readers = [n for n in group.consumers if n in collected["sum"]]
    assert len(readers) >= 2
    by_channel = torch.zeros(len(group.order), dtype=torch.float64)
    by_channel[group.order] = group.sorted_scores
    torch.testing.assert_close(by_channel, sum(thinet_scores(collected["sum"][n][0]) for n in readers))
    first = scored["root"][root]
    by_channel[first.order] = first.sorted_scores
    torch.testing.assert_close(by_channel, thinet_scores(collected["root"][readers[0]][0]))


def test_bad_options_are_one_line() -> None:
    with pytest.raises(MethodError, match="samples must be a whole number >= 1"):
        build_method("thinet", samples=0)
    with pytest.raises(MethodError, match="coupling must be one of root, sum"):
        build_method("thinet", coupling="first")
    with pytest.raises(MethodError, match="no calibration images"):
        build_method("thinet").prepare(build_detector("fcos", 3, "tiny", 64), PruneContext())
