"""PX (Path eXclusion): the saliency against a closed form, the treatment of batch norm, shared
and inplace activations and max-pooling, filter scores, and the rounds meeting the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import methods.px  # noqa: F401  (registers "px")
from detectors import build_detector
from detectors.base import Detector
from methods import MethodError, PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.budget import removal_steps
from methods.engine.groups import ChannelScores, normalize_scores, score_groups
from methods.engine.sizes import count_params
from methods.px import PX, PathPasses, filter_saliency, path_objective, px_saliencies, px_saliency


class _Toy(Detector):
    input_size = 8
    strides = (1,)
    spec = {"name": "toy"}

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return torch.stack(images)


class MLP(_Toy):
    """x -> fc1 -> ReLU -> (fc2, fc3): two head outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 2)
        self.fc3 = nn.Linear(4, 1)

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        h = self.act(self.fc1(x))
        return self.fc2(h), self.fc3(h)


def test_saliency_matches_the_closed_form_on_linear_relu_linear() -> None:
    model = MLP()
    w1 = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0], [-1.0, 0.2, 2.0], [0.7, 0.7, 0.7]])
    b1 = torch.tensor([0.1, -0.2, 0.0, -0.5])
    w2 = torch.tensor([[0.5, -1.0, 2.0, 1.5], [1.0, 0.25, -0.5, -2.0]])
    w3 = torch.tensor([[-0.3, 0.6, 1.2, 0.9]])
    with torch.no_grad():
        for layer, w in ((model.fc1, w1), (model.fc2, w2), (model.fc3, w3)):
            layer.weight.copy_(w)
            layer.bias.fill_(0.7)  # biases start no path: they must not matter beyond the gates
        model.fc1.bias.copy_(b1)
    batches = [torch.tensor([[1.0, 0.5, -1.0], [-0.5, 2.0, 1.0]]), torch.tensor([[0.2, -1.5, 0.3]])]

    # closed form: with unit weights every output is (active hidden units) * |x|^2, so
    # R = Z * sum over outputs of z2, Z = sum_x (#active units of x) * |x|^2, and
    # dR/d(w1_ji^2) = Z * (sum_k w2_kj^2 + sum_k w3_kj^2), dR/d(wo_kj^2) = Z * sum_i w1_ji^2
    x = torch.cat(batches).double()
    active = (x @ w1.double().T + b1.double() > 0).sum(1)
    big_z = (active * x.pow(2).sum(1)).sum()
    w1d, w2d, w3d = w1.double(), w2.double(), w3.double()
    out_sq = w2d.pow(2).sum(0) + w3d.pow(2).sum(0)  # [4]
    in_sq = w1d.pow(2).sum(1)  # [4]
    expected = {
        "fc1.weight": w1d.pow(2) * big_z * out_sq[:, None],
        "fc2.weight": w2d.pow(2) * big_z * in_sq[None, :],
        "fc3.weight": w3d.pow(2) * big_z * in_sq[None, :],
    }
    scores = px_saliencies(model, batches)
    assert set(scores) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(scores[name], value, rtol=1e-12), name
    assert float(model.fc1.bias[0].detach()) == pytest.approx(0.1)  # the model itself is untouched


def test_pure_functions() -> None:
    assert torch.equal(
        px_saliency(torch.tensor([-2.0, 3.0]), torch.tensor([0.5, -1.0])), torch.tensor([2.0, 9.0]).double()
    )
    assert (
        path_objective([torch.ones(2, 3), torch.full((1,), 2.0)], [torch.ones(2, 3), torch.full((1,), 3.0)])
        == 12
    )
    s = torch.arange(24.0).reshape(2, 3, 2, 2)
    assert torch.equal(filter_saliency(s), s.sum(dim=(1, 2, 3)))
    assert torch.equal(filter_saliency(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))


class ConvNet(_Toy):
    """conv-BN-ReLU -> max-pool -> conv-BN -(+ skip)-> ReLU -> fixed head; one ReLU module used
    twice, inplace, as in torchvision's BasicBlock."""

    def __init__(self, shared_inplace: bool = True, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        if shared_inplace:
            self.relu = nn.ReLU(inplace=True)
            self.relu2 = self.relu
        else:
            self.relu, self.relu2 = nn.ReLU(), nn.ReLU()

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        h = self.pool(self.relu(self.bn1(self.conv1(x))))
        y = self.bn2(self.conv2(h))
        return (self.head(self.relu2(y + h if self.residual else y)),)

    def prune_ignored(self) -> list[nn.Module]:
        return [self.head]


@pytest.fixture
def convnet() -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet()
    with torch.no_grad():  # non-trivial eval-mode statistics
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _images(n: int = 3, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 8, 8, generator=g) for _ in range(n)]


def test_flow_through_a_channel_is_counted_once_per_layer(convnet: ConvNet) -> None:
    """Every path through channel c crosses one conv1 weight of filter c and the BN scale γ_c:
    with the BN as a diagonal weight a_c^2 = γ_c^2 / (var_c + eps), both saliencies agree."""
    s = px_saliencies(convnet, [torch.stack(_images())])
    assert torch.allclose(filter_saliency(s["conv1.weight"]), s["bn1.weight"], rtol=1e-10)
    assert torch.allclose(filter_saliency(s["conv2.weight"]), s["bn2.weight"], rtol=1e-10)
    assert (s["bn1.weight"] > 0).all()


def test_shared_inplace_relu_replays_each_call(convnet: ConvNet) -> None:
    separate = ConvNet(shared_inplace=False)
    separate.load_state_dict(convnet.state_dict())
    separate.eval()
    images = [torch.stack(_images(2, seed)) for seed in range(2)]
    a, b = px_saliencies(convnet, images), px_saliencies(separate, images)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-12), name


def test_unit_pass_follows_the_data_gates_and_pool_choices(convnet: ConvNet) -> None:
    x = torch.stack(_images(2))
    with PathPasses(convnet) as passes:
        (z1,) = passes.z1(x)
    # the same computation by hand: unit weights, BN = identity, no biases, the real gates,
    # the real network's max-pool positions
    with torch.no_grad():
        pre1 = convnet.bn1(convnet.conv1(x))
        _, where = nn.functional.max_pool2d(torch.relu(pre1), 2, return_indices=True)
        pre2 = convnet.bn2(convnet.conv2(convnet.pool(torch.relu(pre1)))) + convnet.pool(torch.relu(pre1))
        ones = lambda conv: nn.functional.conv2d(  # noqa: E731
            conv, torch.ones(4, conv.shape[1], 3, 3, dtype=torch.float64), padding=1
        )
        u = ones(x.double().pow(2)) * (pre1 > 0)
        u = u.flatten(2).gather(2, where.flatten(2)).view(where.shape)
        u = (ones(u) + u) * (pre2 > 0)
        expected = nn.functional.conv2d(u, torch.ones(2, 4, 1, 1, dtype=torch.float64))
    assert torch.allclose(z1, expected, rtol=1e-12)
    assert convnet.relu._forward_pre_hooks == {} and convnet.pool._forward_pre_hooks == {}


def test_zero_filter_scores_zero(convnet: ConvNet) -> None:
    chain = ConvNet(residual=False)
    chain.load_state_dict(convnet.state_dict())
    with torch.no_grad():
        chain.conv1.weight[1].zero_()
        chain.conv2.weight[3].zero_()
    ctx = PruneContext(calibration=[(_images(), [{}] * 3)])
    groups = {g.root: g for g in score_groups(chain.eval(), build_method("px").importance(chain, ctx))}
    assert set(groups) == {"conv1", "conv2"}
    for root, zero in (("conv1", 1), ("conv2", 3)):
        g = groups[root]
        assert g.order[0] == zero and g.sorted_scores[0] == 0
        assert (g.sorted_scores[1:] > 0).all()


def _synthetic(n: int, size: int) -> list:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(n):
        x, y = torch.randint(0, size // 2, (2,), generator=g).tolist()
        box = torch.tensor([[x, y, x + size / 3, y + size / 4]], dtype=torch.float32)
        targets.append({"boxes": box, "labels": torch.tensor([i % 3]), "image_id": i})
        images.append(torch.rand(3, size, size, generator=g))
    return [(images[i : i + 4], targets[i : i + 4]) for i in range(0, n, 4)]


@pytest.mark.parametrize(("target", "round_to"), [("params:0.3", 1), ("flops:0.2", 1), ("params:0.3", 8)])
def test_rounds_reach_the_budget(target: str, round_to: int) -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    reference = copy.deepcopy(model)
    t = Target.parse(target)
    ctx = PruneContext(round_to=round_to, calibration=_synthetic(4, 64), progress=False)
    report = prune(build_method("px", rounds=3), model, ctx, t)
    assert abs(report.achieved[t.kind] - t.rate) <= ctx.tolerance
    rounds = report.notes["achieved_per_round"]
    assert len(rounds) == 3 and rounds == sorted(rounds)
    assert abs(rounds[0] - t.rate / 3) <= 0.02  # an equal share per round
    assert report.method == "px" and report.params_after == count_params(model)
    assert report.layers and not model.training
    assert all(after % round_to == 0 for _, after in report.layers.values())
    out, ref = model.core(model.example_input()), reference.core(reference.example_input())
    assert [o.shape for o in out] == [o.shape for o in ref]


def test_errors(convnet: ConvNet) -> None:
    with pytest.raises(MethodError, match="calibration"):
        prune(build_method("px"), convnet, PruneContext(round_to=1), Target.parse("params:0.2"))
    with pytest.raises(MethodError, match="rounds"):
        build_method("px", rounds=0)
    ctx = PruneContext(round_to=1, max_layer_ratio=0.2, calibration=[(_images(), [{}] * 3)])
    with pytest.raises(MethodError, match="out of reach"):
        prune(build_method("px"), convnet, ctx, Target.parse("params:0.9"))


def test_round_zero_scores_are_shared_across_targets(convnet: ConvNet) -> None:
    ctx = PruneContext(round_to=1, calibration=[(_images(), [{}] * 3)], score_cache={})
    first, second = copy.deepcopy(convnet), copy.deepcopy(convnet)
    a = prune(build_method("px"), first, ctx, Target.parse("channels:0.25"))
    b = prune(build_method("px"), second, ctx, Target.parse("channels:0.25"))
    assert not a.notes["scores_cached"] and b.notes["scores_cached"]
    assert a.layers == b.layers and torch.equal(first.conv1.weight, second.conv1.weight)
    assert a.achieved["channels"] == pytest.approx(0.25)  # one channel of the coupled pair


class WideChain(_Toy):
    """conv(3->4)-BN-ReLU -> conv(4->16)-BN-ReLU -> fixed head: two layers of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 2, 1)

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        h = torch.relu(self.bn1(self.conv1(x)))
        return (self.head(torch.relu(self.bn2(self.conv2(h)))),)

    def prune_ignored(self) -> list[nn.Module]:
        return [self.head]


def _wide_chain() -> WideChain:
    torch.manual_seed(0)
    net = WideChain()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.zero_()  # with no shift and no mean, a variance cannot move a gate
    return net.eval()


@pytest.mark.parametrize("bn_variance", [True, False])
def test_every_layer_of_a_chain_carries_the_same_flow_so_raw_scores_scale_like_one_over_width(
    bn_variance: bool,
) -> None:
    """Each path crosses one channel of every layer: each layer's filter flows sum to R. A raw
    channel score is therefore R / width on average, which is why one global ranking of raw
    flows empties the wide layer first (the faithful reading took FCOS's towers to the floor)."""
    net = _wide_chain()
    ctx = PruneContext(round_to=1, calibration=[(_images(), [{}] * 3)])
    s = px_saliencies(net, [torch.stack(_images())], bn_variance=bn_variance)
    flow1, flow2 = filter_saliency(s["conv1.weight"]), filter_saliency(s["conv2.weight"])
    assert float(flow1.sum()) == pytest.approx(float(flow2.sum()), rel=1e-10)
    assert float(flow1.mean() / flow2.mean()) == pytest.approx(16 / 4, rel=1e-10)
    faithful = build_method("px", **PX.FAITHFUL)
    groups = score_groups(net, faithful.importance(net, ctx))
    widths = [len(g.order) for g in groups]
    first = removal_steps(groups, faithful.scope, round_to=1, max_layer_ratio=0.9)[:4]
    assert {widths[gi] for gi, _ in first} == {16}  # the four lowest raw scores are all conv2's
    default = build_method("px")
    assert default.scope == "local"
    groups = score_groups(net, default.importance(net, ctx))
    steps = removal_steps(groups, default.scope, round_to=1, max_layer_ratio=0.9)
    removed = {g.root: 0 for g in groups}
    for gi, after in steps[:5]:  # a quarter of each layer, whatever the scale of its flows
        removed[groups[gi].root] = after
    assert removed == {"conv1": 1, "conv2": 4}


def test_the_default_ignores_a_channels_running_variance_and_the_faithful_score_rewards_a_small_one() -> None:
    """With ``γ² / var`` a channel whose output barely varies (small var) gets the highest score
    however little it carries; the default enters batch norm as ``γ²``."""
    net = _wide_chain()
    x = [torch.stack(_images())]
    before = {v: px_saliencies(net, x, bn_variance=v) for v in (True, False)}
    with torch.no_grad():
        net.bn1.running_var[2] = 1e-4  # channel 2 of conv1: nearly constant output
    after = {v: px_saliencies(net, x, bn_variance=v) for v in (True, False)}
    for name in before[False]:
        assert torch.allclose(after[False][name], before[False][name], rtol=1e-10), name
    faithful = filter_saliency(after[True]["conv1.weight"])
    assert int(faithful.argmax()) == 2
    ratio = faithful[2] / filter_saliency(before[True]["conv1.weight"])[2]
    assert float(ratio) > 1000  # about (var + eps) before / after


def test_options_are_checked_and_the_mean_normaliser_gives_mean_one() -> None:
    with pytest.raises(MethodError, match="scope"):
        build_method("px", scope="layer")
    with pytest.raises(MethodError, match="normalize"):
        build_method("px", normalize="max")
    with pytest.raises(MethodError, match="bn_variance"):
        build_method("px", bn_variance="yes")
    with pytest.raises(MethodError, match="normalizer"):
        ChannelScores(nn.Linear(1, 1), {}, normalizer="max")
    scores = normalize_scores(torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64), "mean")
    assert torch.allclose(scores, torch.tensor([1 / 3, 2 / 3, 2.0], dtype=torch.float64))
    assert torch.equal(normalize_scores(torch.zeros(3), "mean"), torch.zeros(3))
