"""Network Slimming: scores are |γ| of the norm after each conv, the sparsity penalty's gradient is
λ·sign(γ), the coupling switch sums or takes the root as it says, and its baseline is its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from detectors import build_detector
from methods import MethodError, PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.groups import score_groups
from methods.slimming import norm_scales, slimming_scores, sparsity_penalty
from runners.suite import load_suite


def _scaled(model: nn.Module, seed: int, draw) -> nn.Module:
    """Every BatchNorm's scale drawn by ``draw(size, generator)``: scores that differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(draw(m.num_features, generator=g))
    return model.eval()


def _by_channel(group) -> torch.Tensor:
    scores = torch.zeros(len(group.order), dtype=torch.float64)
    scores[group.order] = group.sorted_scores
    return scores


def test_scores_are_the_magnitude_of_each_norms_scale(toy) -> None:
    with torch.no_grad():  # hand-set scales: signs must not matter, magnitudes must
        toy.bn1.weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.0, -0.25, 3.0, 0.1, -1.5]))
        toy.bn2.weight.copy_(torch.linspace(-1.0, 1.0, 16))
    torch.testing.assert_close(slimming_scores(toy.bn1.weight), toy.bn1.weight.abs())
    method = build_method("slimming")
    groups = {g.root: g for g in score_groups(toy, method.importance(toy, PruneContext()))}
    torch.testing.assert_close(_by_channel(groups["conv1"]), toy.bn1.weight.detach().abs().double())
    torch.testing.assert_close(_by_channel(groups["conv2"]), toy.bn2.weight.detach().abs().double())


def test_the_penalty_is_lambda_times_the_l1_norm_and_its_gradient_lambda_sign_gamma() -> None:
    gammas = [
        torch.tensor([0.5, -2.0, 3.0], requires_grad=True),
        torch.tensor([-0.1, 0.2], requires_grad=True),
    ]
    penalty = sparsity_penalty(gammas, 1e-4)
    torch.testing.assert_close(penalty, torch.tensor(1e-4 * (0.5 + 2.0 + 3.0 + 0.1 + 0.2)))
    penalty.backward()
    for gamma in gammas:
        torch.testing.assert_close(gamma.grad, 1e-4 * gamma.detach().sign())


def test_the_penalty_reaches_every_trainable_norm_scale(toy) -> None:
    assert [id(t) for t in norm_scales(toy)] == [id(toy.bn1.weight), id(toy.bn2.weight)]
    method = build_method("slimming", sparsity=0.01)
    extra = method.train_loss(toy, PruneContext(), ([], []), {})
    torch.testing.assert_close(extra, 0.01 * (toy.bn1.weight.abs().sum() + toy.bn2.weight.abs().sum()))
    assert build_method("slimming", sparsity=0).train_loss(toy, PruneContext(), ([], []), {}) is None


def test_coupling_sum_adds_the_coupled_norms_and_root_takes_the_root_conv() -> None:
    torch.manual_seed(0)
    model = _scaled(build_detector("fcos", 3, "tiny", 64), 1, torch.randn)
    ctx = PruneContext()
    scored = {
        coupling: {
            g.root: g
            for g in score_groups(model, build_method("slimming", coupling=coupling).importance(model, ctx))
        }
        for coupling in ("root", "sum")
    }
    root = "backbone.body.stem.0"  # a residual group: the stem and layer1's second convs share channels
    group = scored["sum"][root]
    modules = dict(model.named_modules())
    norms = {"backbone.body.stem.0": "backbone.body.stem.1"}
    norms |= {f"backbone.body.layer1.{i}.conv2": f"backbone.body.layer1.{i}.bn2" for i in (0, 1)}
    assert set(norms) <= set(group.members)
    by_hand = sum(modules[n].weight.detach().abs().double() for n in norms.values())
    torch.testing.assert_close(_by_channel(group), by_hand)
    torch.testing.assert_close(
        _by_channel(scored["root"][root]), modules["backbone.body.stem.1"].weight.detach().abs().double()
    )


def test_bad_options_are_one_line() -> None:
    with pytest.raises(MethodError, match="coupling must be one of root, sum"):
        build_method("slimming", coupling="all")
    with pytest.raises(MethodError, match="sparsity must be a number >= 0"):
        build_method("slimming", sparsity=-1e-4)
    with pytest.raises(MethodError, match="coupling must be one of root, sum"):
        build_method("hrank", coupling="mean")


def test_slimming_prunes_globally_to_the_budget() -> None:
    torch.manual_seed(0)
    model = _scaled(build_detector("yolov8", 3, "tiny", 64), 2, torch.rand)
    report = prune(
        build_method("slimming"), model, PruneContext(round_to=1, progress=False), Target.parse("params:0.3")
    )
    assert abs(report.achieved["params"] - 0.3) <= 0.005


def test_a_suite_gives_slimming_its_own_sparsity_trained_baseline(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        'methods = ["l1", "slimming", "slimming:plain"]\ntargets = ["params:0.3"]\n'
        "[method_options.'slimming:plain']\nsparsity = 0\n"
        '[[experiments]]\ndetector = "fcos"\ndataset = "synthetic-coco"\n'
    )
    cells = load_suite(path).cells()
    bases = {c.regime: c for c in cells if c.method == "base"}
    assert set(bases) == {"plain", "slimming"} and bases["slimming"].regime_options == {"sparsity": 1e-4}
    regime = {c.method: c.regime for c in cells if c.method != "base"}
    assert regime == {"l1": "plain", "slimming": "slimming", "slimming:plain": "plain"}
    assert bases["slimming"].baseline_key != bases["plain"].baseline_key
