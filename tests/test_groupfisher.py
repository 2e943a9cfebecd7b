"""GroupFisher: the per-sample Fisher terms, joint scoring of coupled channels, the cost
normalisation, and the prune-while-training loop meeting its budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import methods.groupfisher  # noqa: F401  (registers "groupfisher")
from detectors import build_detector
from detectors.base import Detector
from methods import MethodError, PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.budget import removal_steps
from methods.engine.groups import GroupScores, dependency_graph, describe_groups
from methods.engine.sizes import channel_costs, count_gmacs, count_params, output_positions
from methods.groupfisher import FisherCollector, fisher_per_sample, group_fisher, normalized_scores


class TwoBranch(Detector):
    """stem conv -> ReLU -> two parallel convs whose outputs are added -> ReLU -> fixed head."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size = 8
        self.strides = (1,)
        self.spec = {"name": "two-branch"}
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        h = torch.relu(self.stem(x))
        return (self.head(torch.relu(self.a(h) + self.b(h))),)

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return torch.stack(images)

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        out = self.core(self.preprocess(images))[0]
        goal = torch.stack([t["map"] for t in targets])
        return {"mse": (out - goal).pow(2).mean()}

    def prune_ignored(self) -> list[nn.Module]:
        return [self.head]


def _batch(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 8, 8, generator=g) for _ in range(n)]
    targets = [{"map": torch.randn(2, 8, 8, generator=g)} for _ in range(n)]
    return images, targets


@pytest.fixture
def net() -> TwoBranch:
    torch.manual_seed(0)
    return TwoBranch()


def _stem_group(model: TwoBranch):
    groups = describe_groups(model, dependency_graph(model))
    return groups, next(i for i, g in enumerate(groups) if g.root == "stem")


# -- the math ------------------------------------------------------------------------------------


def test_fisher_per_sample_sums_activation_times_gradient() -> None:
    a, g = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert torch.allclose(fisher_per_sample(a, g), (a * g).sum(dim=(2, 3)))
    lin_a, lin_g = torch.randn(4, 7), torch.randn(4, 7)  # linear layers: channels last
    assert torch.allclose(fisher_per_sample(lin_a, lin_g, channel_dim=-1), lin_a * lin_g)


def test_coupled_layers_are_summed_before_squaring() -> None:
    g1 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # [N=2, C=2]
    g2 = torch.tensor([[-1.0, 2.0], [-3.0, 1.0]])
    joint = group_fisher([(g1, [0, 1], [0, 1]), (g2, [0, 1], [0, 1])], 2)
    assert torch.allclose(joint, torch.tensor([0.0, 16.0], dtype=torch.float64))  # (1-1)^2+(3-3)^2; 4^2+0
    separate = g1.pow(2).sum(0) + g2.pow(2).sum(0)
    assert not torch.allclose(joint, separate.double())
    # a layer seeing the group's channels in another order (a concat, say) maps them back
    swapped = group_fisher([(g1, [0, 1], [1, 0])], 2)
    assert torch.allclose(swapped, g1.pow(2).sum(0).flip(0).double())


def _scored(root: str, scores: Tensor) -> GroupScores:
    sorted_scores, order = torch.sort(scores.double(), stable=True)
    return GroupScores(root, [root], order, sorted_scores)


def test_costlier_channel_with_the_same_score_goes_first() -> None:
    same = torch.tensor([2.0, 2.0])
    cheap, costly = normalized_scores(same, 1.0), normalized_scores(same, 4.0)
    assert (costly < cheap).all()
    steps = removal_steps([_scored("cheap", cheap), _scored("costly", costly)], "global", 1, 0.5)
    assert steps[0][0] == 1  # the first removal comes from the costly group
    with pytest.raises(ValueError):
        normalized_scores(same, 0.0)


def test_steps_respect_round_to_and_the_original_width() -> None:
    steps = removal_steps([_scored("a", torch.arange(20.0))], "global", round_to=8, max_layer_ratio=0.9)
    assert [after for _, after in steps] == [4, 12]  # 20 -> 16 -> 8, never 0
    # a group already pruned from 20 to 10 keeps ceil(20 * 0.5) = 10 at max_layer_ratio 0.5
    pruned = [_scored("a", torch.arange(10.0))]
    assert removal_steps(pruned, "global", 1, 0.5, original={"a": 20}) == []
    assert len(removal_steps(pruned, "global", 1, 0.5)) == 5  # against today's width it could go on


# -- hooks on a two-branch network ---------------------------------------------------------------


def _reference_g(model: TwoBranch, images, targets) -> tuple[Tensor, Tensor]:
    """Per-sample g of the stem channels, through branch a and branch b separately."""
    x = model.preprocess(images)
    h = torch.relu(model.stem(x)).detach()
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    out = model.head(torch.relu(model.a(ha) + model.b(hb)))
    goal = torch.stack([t["map"] for t in targets])
    (out - goal).pow(2).mean().backward()
    return (h * ha.grad).sum(dim=(2, 3)), (h * hb.grad).sum(dim=(2, 3))


def test_coupled_consumers_are_scored_jointly(net: TwoBranch) -> None:
    images, targets = _batch()
    groups, stem = _stem_group(net)
    assert sorted(c[0] for c in groups[stem].consumers) == ["a", "b"]
    with FisherCollector(groups) as collector:
        sum(net.loss(images, targets).values()).backward()
        collector.fold()
    ga, gb = _reference_g(copy.deepcopy(net), images, targets)
    joint = (ga + gb).pow(2).sum(0).double()
    separate = (ga.pow(2) + gb.pow(2)).sum(0).double()
    assert torch.allclose(collector.scores[stem], joint, rtol=1e-4, atol=1e-12)
    assert not torch.allclose(joint, separate, rtol=1e-2)
    assert net.stem._forward_pre_hooks == {} and net.a._forward_pre_hooks == {}  # hooks removed


def test_opposite_branches_cancel(net: TwoBranch) -> None:
    """b(h) = -a(h) + c: both branches see opposite gradients, so the joint Fisher score is 0."""
    net.b = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        net.b.weight.copy_(-net.a.weight)
        net.b.bias.copy_(-net.a.bias + 0.5)  # keeps the ReLU open, gradients flow
    images, targets = _batch()
    groups, stem = _stem_group(net)
    with FisherCollector(groups) as collector:
        sum(net.loss(images, targets).values()).backward()
        collector.fold()
    ga, gb = _reference_g(copy.deepcopy(net), images, targets)
    assert ga.abs().sum() > 1e-3  # each branch alone would score the channels
    assert collector.scores[stem].abs().max() < 1e-10


def test_channel_with_zero_activation_scores_zero(net: TwoBranch) -> None:
    with torch.no_grad():
        net.stem.weight[2].zero_()
        net.stem.bias[2] = -1.0  # ReLU(-1) = 0 on every input
    groups, stem = _stem_group(net)
    with FisherCollector(groups) as collector:
        for seed in range(2):
            images, targets = _batch(seed=seed)
            net.zero_grad()
            sum(net.loss(images, targets).values()).backward()
            collector.fold()
    scores = collector.scores[stem]
    assert scores[2] == 0
    assert (scores[[0, 1, 3]] > 0).all()


def test_costs_match_the_counted_savings(net: TwoBranch) -> None:
    net.eval()
    groups, stem = _stem_group(net)
    costs = channel_costs(groups, output_positions(net), {id(net.head)})
    probe = copy.deepcopy(net)
    graph = dependency_graph(probe)
    graph.get_pruning_group(
        probe.stem, graph.get_pruner_of_module(probe.stem).prune_out_channels, [1]
    ).prune()
    assert costs["params"][stem] == count_params(net) - count_params(probe)
    assert costs["flops"][stem] == pytest.approx(count_gmacs(net) - count_gmacs(probe), rel=1e-9)
    assert costs["memory"][stem] == 8 * 8  # one output map of the stem
    a_group = next(i for i, g in enumerate(groups) if g.root in ("a", "b"))
    assert costs["channels"][a_group] == 2  # a and b lose an output channel each


# -- the loop ------------------------------------------------------------------------------------


def _synthetic(n: int, size: int) -> list:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        x, y = torch.randint(0, size // 2, (2,), generator=g).tolist()
        box = torch.tensor([[x, y, x + size / 3, y + size / 4]], dtype=torch.float32)
        target = {"boxes": box, "labels": torch.tensor([i % 3]), "image_id": i}
        samples.append((torch.rand(3, size, size, generator=g), target))
    return samples


@pytest.mark.parametrize(("target", "round_to"), [("params:0.3", 1), ("flops:0.3", 1), ("params:0.3", 8)])
def test_loop_stops_at_the_budget(target: str, round_to: int) -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    reference = copy.deepcopy(model)
    ctx = PruneContext(round_to=round_to, train_set=_synthetic(4, 64), batch_size=2, progress=False)
    method = build_method("groupfisher", d=2, channels_per_step=160)
    t = Target.parse(target)
    report = prune(method, model, ctx, t)
    assert abs(report.achieved[t.kind] - t.rate) <= ctx.tolerance
    assert report.method == "groupfisher"
    assert report.notes["training_iterations"] == 2 * report.notes["rounds"] > 0
    assert report.params_after == count_params(model) < report.params_before
    assert report.layers and all(after < before for before, after in report.layers.values())
    assert all(after % round_to == 0 for _, after in report.layers.values())
    assert "backbone.body.stem.0" in report.groups
    assert not model.training
    out, ref = model.core(model.example_input()), reference.core(reference.example_input())
    assert [o.shape for o in out] == [o.shape for o in ref]


def test_options_and_unreachable_targets(net: TwoBranch) -> None:
    with pytest.raises(MethodError, match="normalize"):
        build_method("groupfisher", normalize="latency")
    with pytest.raises(MethodError, match="no option"):
        build_method("groupfisher", interval=3)
    ctx = PruneContext(round_to=1, max_layer_ratio=0.2, calibration=[_batch()], progress=False)
    with pytest.raises(MethodError, match="out of reach"):
        prune(build_method("groupfisher"), net, ctx, Target.parse("params:0.9"))


def test_two_branch_prunes_on_calibration_batches(net: TwoBranch) -> None:
    ctx = PruneContext(round_to=1, calibration=[_batch(seed=s) for s in range(2)], progress=False)
    report = prune(build_method("groupfisher", d=1), net, ctx, Target.parse("channels:0.25"))
    assert abs(report.achieved["channels"] - 0.25) <= 0.005  # 4 of 16 filters
    assert net.a.out_channels == net.b.out_channels  # the coupled pair loses the same channels
    assert net.core(torch.rand(1, 3, 8, 8))[0].shape == (1, 2, 8, 8)
