"""LDT: the pure math on hand-made inputs, the training hook, tracing on a toy, a tiny-FCOS prune."""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import methods.ldt  # noqa: F401  (registers "ldt")
from datasets import build_dataset
from detectors import build_detector
from methods import MethodError, PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.groups import score_groups
from methods.ldt import LDT, map_instances
from methods.ldt_math import (
    FEW_CLASSES,
    SINGLETON_CLASS,
    SINGULAR,
    DegenerateScatter,
    box_cells,
    covariance_penalty,
    discriminants,
    discriminating_power,
    generalized_eigvals,
    instance_features,
    ld_loss,
    ld_loss_bound,
    ld_loss_of_eigenvalues,
    location_attention,
    normalise_instances,
    scatter_matrices,
)
from methods.ldt_regime import InstanceQueue
from tests.conftest import ToyDetector

SUITE = Path(__file__).resolve().parents[1] / "runners" / "suites" / "ldt_ablation.toml"


# -- the math -----------------------------------------------------------------------------------


def _clusters(seed: int = 0, per_class: int = 10, classes: int = 3, dims: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per_class)
    means = 4.0 * torch.randn(classes, dims, generator=g, dtype=torch.float64)
    return means[y] + torch.randn(len(y), dims, generator=g, dtype=torch.float64), y


def test_ld_loss_is_lower_for_separated_classes() -> None:
    X, y = _clusters()
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert ld_loss(X, y) < ld_loss(X, shuffled)
    assert ld_loss(X, y) < 0


def test_ld_loss_gradient_matches_finite_differences() -> None:
    X, y = _clusters(seed=2, per_class=4, classes=3, dims=4)
    X.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ld_loss(x, y, epsilon=1.2, lam=1e-3), (X,))
    # a wide window averages both discriminants; the gradient stays exact
    assert torch.autograd.gradcheck(lambda x: ld_loss(x, y, epsilon=1e6, lam=1e-2), (X,))
    assert torch.autograd.gradcheck(
        lambda x: ld_loss(x, y, 1.2, 1e-3, ridge="absolute", transform="none"), (X,)
    )
    assert torch.autograd.gradcheck(lambda x: covariance_penalty(x, relative=False), (X,))
    assert torch.autograd.gradcheck(covariance_penalty, (X,))  # the default: LDT's relative penalty


def test_ld_loss_window_keeps_the_top_eigenvalues_near_their_minimum() -> None:
    X, y = _clusters(seed=3, per_class=6, classes=4, dims=6)
    S_b, S_w, _ = scatter_matrices(X, y, 1e-3, ridge="absolute")
    nu = torch.linalg.eigvals(torch.linalg.solve(S_w, S_b)).real.sort().values
    top = nu[-3:]  # n - 1 = 3
    for eps in (0.0, 1.2, 1e9):
        expected = -top[top <= top.min() + eps].mean()
        assert torch.allclose(
            ld_loss(X, y, epsilon=eps, ridge="absolute", transform="none"), expected, rtol=1e-6
        )


def test_discriminants_solve_the_generalised_problem() -> None:
    X, y = _clusters(seed=4, per_class=8, classes=3, dims=5)
    for ridge in ("absolute", "total"):
        S_b, S_w, _ = scatter_matrices(X, y, 1e-3, ridge)
        nu, V = discriminants(X, y, 1e-3, ridge)
        assert torch.allclose(S_b @ V, S_w @ V * nu, atol=1e-8)
    S_b, S_w, _ = scatter_matrices(X, y, 1e-3, ridge="absolute")
    nu, V = discriminants(X, y, 1e-3, ridge="absolute")
    assert nu.shape == (2,) and V.shape == (5, 2) and nu[0] >= nu[1]
    assert torch.allclose(S_b @ V, S_w @ V * nu, atol=1e-8)
    assert torch.allclose(V.T @ S_w @ V, torch.eye(2, dtype=V.dtype), atol=1e-8)
    assert (X.mean(0) @ V >= 0).all()  # the sign convention
    assert torch.allclose(discriminating_power(nu, V), (nu * V**2).sum(1))


def test_covariance_penalty_zero_for_diagonal_scatter_and_grows_with_correlation() -> None:
    z1 = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    z2 = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=torch.float64)
    assert covariance_penalty(torch.stack([z1, 3 * z2], dim=1), relative=False) == 0
    values = [
        float(
            covariance_penalty(torch.stack([z1, r * z1 + math.sqrt(1 - r * r) * z2], dim=1), relative=False)
        )
        for r in (0.0, 0.3, 0.6, 0.9)
    ]
    assert values[0] == 0 and all(a < b for a, b in zip(values[:-1], values[1:], strict=True))


def test_degenerate_scatter_raises_with_a_reason() -> None:
    X = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(DegenerateScatter) as exc:
        ld_loss(X, torch.zeros(6, dtype=torch.long))
    assert exc.value.reason == FEW_CLASSES
    with pytest.raises(DegenerateScatter) as exc:
        ld_loss(X, torch.tensor([0, 0, 0, 0, 0, 1]))
    assert exc.value.reason == SINGLETON_CLASS
    with pytest.raises(DegenerateScatter) as exc:
        ld_loss(torch.zeros(6, 3), torch.tensor([0, 0, 0, 1, 1, 1]), lam=0.0, ridge="absolute")
    assert exc.value.reason == SINGULAR


def test_location_attention_inside_outside_and_overlap() -> None:
    box = torch.tensor([[20.0, 40.0, 60.0, 60.0]])  # centre (40, 50), half-sides 20 x 10
    A = location_attention(box, (100, 100), 1)
    assert A.shape == (100, 100)
    assert A[40:60, 20:60].min() >= 0.9  # every pixel centre inside the box
    ys, xs = torch.meshgrid(torch.arange(100) + 0.5, torch.arange(100) + 0.5, indexing="ij")
    twice = ((xs - 40).abs() >= 40) | ((ys - 50).abs() >= 20)  # outside the box doubled in size
    assert A[twice].max() < 1e-3
    other = torch.tensor([[50.0, 45.0, 90.0, 95.0]])
    both = location_attention(torch.cat([box, other]), (100, 100), 1)
    assert torch.equal(both, torch.maximum(A, location_attention(other, (100, 100), 1)))
    # a coarser map (stride 4) evaluates it at its own cell centres 2, 6, 10, ...
    coarse = location_attention(box, (25, 25), 4)
    assert coarse[10:15, 5:15].min() >= 0.9 and coarse[:, :1].max() < 1e-3
    assert location_attention(torch.zeros(0, 4), (3, 3), 8).eq(0).all()


def test_box_cells_and_instance_features() -> None:
    boxes = torch.tensor(
        [
            [0.0, 0.0, 8.0, 8.0],  # exactly one cell
            [3.0, 3.0, 3.5, 3.5],  # smaller than a cell: still one
            [9.0, 1.0, 17.0, 30.0],  # x cells 1..2, y cells 0..3
            [60.0, 60.0, 200.0, 200.0],  # runs off the map: clipped
        ]
    )
    cells = box_cells(boxes, 8, (8, 8))
    assert cells.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 0, 3, 4], [7, 7, 8, 8]]
    feat = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    X = instance_features(feat, cells, [0] * len(cells))
    expected = [[feat[0, c, y0:y1, x0:x1].max().item() for c in range(2)] for x0, y0, x1, y1 in cells]
    assert X.tolist() == expected
    # values and gradient match the plain per-box max, over several images and chunks
    feat = torch.randn(2, 3, 8, 8, requires_grad=True)
    image = [0, 1, 1, 0]
    X = instance_features(feat, cells, image, chunk=3 * 64)  # one box per chunk
    reference = torch.stack(
        [
            feat[b, :, y0:y1, x0:x1].amax(dim=(1, 2))
            for b, (x0, y0, x1, y1) in zip(image, cells.tolist(), strict=True)
        ]
    )
    weights = torch.randn_like(reference)
    assert torch.equal(X, reference)
    assert torch.allclose(*(torch.autograd.grad((v * weights).sum(), feat)[0] for v in (X, reference)))


def test_boxes_map_to_the_preprocessed_tensor_and_outside_boxes_drop() -> None:
    image = torch.zeros(3, 100, 200)  # H x W
    target = {
        "boxes": torch.tensor(
            [[10.0, 20.0, 30.0, 40.0], [210.0, 0.0, 220.0, 10.0], [-5.0, 90.0, 5.0, 120.0]]
        ),
        "labels": torch.tensor([0, 1, 2]),
    }
    inst, dropped = map_instances([image], [target], (64, 128))  # resized by 0.64
    assert dropped == 1
    assert torch.allclose(inst.boxes[0], torch.tensor([[10.0, 20, 30, 40], [-5, 90, 5, 120]]) * 0.64)
    assert inst.labels[0].tolist() == [0, 2]
    assert inst.extents[0] == pytest.approx((64.0, 128.0))


# -- the method on a toy ------------------------------------------------------------------------


class TraceToy(ToyDetector):
    """The shared toy with the preprocessing and loss the method needs."""

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return torch.stack(images)

    def loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        cls, box = self.core(self.preprocess(images))
        return {"toy": cls.pow(2).mean() + box.pow(2).mean()}


def _toy_batch(labels: list[list[int]], seed: int = 0) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for row in labels:
        images.append(torch.rand(3, 16, 16, generator=g))
        boxes = [
            [1.0 + 7 * (i % 2), 2.0 + 6 * (i // 2), 7.0 + 7 * (i % 2), 7.0 + 6 * (i // 2)]
            for i in range(len(row))
        ]
        targets.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(row)})
    return images, targets


@pytest.fixture
def trace_toy() -> TraceToy:
    torch.manual_seed(0)
    return TraceToy().eval()


def test_tracing_gives_zero_importance_to_channels_that_do_not_reach_the_neck(trace_toy) -> None:
    with torch.no_grad():
        trace_toy.conv2.weight[:, 1:] = 0  # conv1's channel 0 alone feeds the neck (conv2)
    batch = _toy_batch([[0, 1], [1, 0], [0, 1], [1, 0]])
    method = LDT()
    ctx = PruneContext(calibration=[batch], progress=False)
    groups = {g.root: g for g in score_groups(trace_toy, method.importance(trace_toy, ctx))}
    conv1 = groups["conv1"]
    scores = conv1.sorted_scores[torch.argsort(conv1.order)]  # back to channel order
    assert scores[0] > 0 and scores[1:].eq(0).all()
    assert groups["conv2"].sorted_scores.gt(0).any()
    assert method.summary[0]["instances"] == 8 and len(method.summary[0]["eigenvalues"]) == 1
    # the detection utility, and no attention, trace the same structure
    for options in ({"utility": "detection"}, {"location_attention": False}):
        traced = LDT(**options).trace(trace_toy, ctx)
        assert traced[trace_toy.conv1][0] > 0 and traced[trace_toy.conv1][1:].eq(0).all()


def test_attention_weights_the_pixels_near_the_boxes(trace_toy) -> None:
    batch = _toy_batch([[0, 1], [1, 0], [0, 1], [1, 0]])
    ctx = PruneContext(calibration=[batch], progress=False)
    with_attention = LDT().trace(trace_toy, ctx)[trace_toy.conv1]
    without = LDT(location_attention=False).trace(trace_toy, ctx)[trace_toy.conv1]
    assert (with_attention <= without).all()  # attention <= 1, and < 1 away from the boxes
    assert with_attention.sum() < without.sum()
    assert not torch.allclose(with_attention / with_attention.sum(), without / without.sum())


def _train_step(model: TraceToy, method: LDT, batch) -> tuple[Tensor | None, dict[str, Tensor]]:
    model.train()
    losses = model.loss(*batch)
    return method.train_loss(model, PruneContext(progress=False), batch, losses), losses


def test_train_loss_uses_the_loss_pass_neck_maps(trace_toy) -> None:
    method = LDT(queue=0)  # this batch alone: the expected value below is computed from it
    batch = _toy_batch([[0, 1], [1, 0], [0, 1], [1, 0]])
    extra, _ = _train_step(trace_toy, method, batch)  # called without the neck maps: recomputed
    assert extra is not None and torch.isfinite(extra)
    assert method.stats()["train"]["recomputed"] == 1
    # the shared loop hands over the maps of the pass that computed the losses
    captured = []
    probe = trace_toy.conv2.register_forward_hook(lambda m, a, out: captured.append(out))
    trace_toy.train()
    losses = trace_toy.loss(*batch)
    probe.remove()
    extra = method.train_loss(trace_toy, PruneContext(progress=False), batch, losses, [captured[0]])
    assert method.stats()["train"]["recomputed"] == 1  # the loss pass's features were used
    inst, _ = map_instances(*batch, (16, 16))
    X = inst.features(captured[0], 1)
    expected = 5e-3 * ld_loss(X, inst.y, 1.2, 1e-3, "total", "log") + 5e-4 * covariance_penalty(X, True)
    assert torch.allclose(extra, expected.float())
    (grad,) = torch.autograd.grad(extra, trace_toy.conv1.weight)
    assert grad.abs().sum() > 0


def test_training_loop_passes_the_neck_maps_of_its_step(trace_toy) -> None:
    from methods.engine.training import Schedule, Trainer

    seen: list[tuple[int, int]] = []
    captured = []
    probe = trace_toy.conv2.register_forward_hook(lambda m, a, out: captured.append(out))

    def extra(model, batch, losses, neck):
        seen.append((id(neck[0]), id(captured[-1])))
        return None

    samples = list(zip(*_toy_batch([[0, 1], [1, 0], [0, 1], [1, 0]]), strict=True))
    trainer = Trainer(trace_toy, samples, Schedule(batch_size=2, flip=0.0), extra_loss=extra, progress=False)
    trainer.steps(3)
    probe.remove()
    assert len(seen) == 3 and all(a == b for a, b in seen)  # the very tensors of the loss pass
    assert trace_toy.conv2._forward_hooks == {}  # the loop's capture is gone with it


def test_degenerate_batches_are_skipped_and_counted(trace_toy) -> None:
    method = LDT()
    one_class = _toy_batch([[0, 0], [0, 0]])
    singleton = _toy_batch([[0, 0], [0, 1]])
    for batch in (one_class, singleton):
        extra, _ = _train_step(trace_toy, method, batch)
        assert extra is None
    zero = TraceToy()
    with torch.no_grad():
        zero.conv2.weight.zero_()
        zero.conv2.bias.zero_()
    singular = LDT(lam=0.0)
    extra, losses = _train_step(zero, singular, _toy_batch([[0, 1], [1, 0]]))
    assert extra is None and all(torch.isfinite(v) for v in losses.values())
    train = method.stats()["train"]
    assert train["scales"] == 2 and train["skipped"] == 2 and train["skip_rate"] == 1.0
    assert train[FEW_CLASSES] == 1 and train[SINGLETON_CLASS] == 1
    assert singular.stats()["train"][SINGULAR] == 1
    # a calibration set without a usable scale is one clear error, not an empty ranking
    with pytest.raises(MethodError, match="no neck scale has a usable discriminant"):
        LDT().prepare(trace_toy, PruneContext(calibration=[one_class], progress=False))


def test_options_regime_and_validation() -> None:
    assert build_method("ldt").regime == "ldt" and LDT.scope == "global"
    off = build_method("ldt", ldt_training=False)
    assert off.regime == "plain" and off.regime_options() == {}
    assert off.train_loss(None, PruneContext(), ([], []), {}) is None
    assert set(build_method("ldt", a=0.1).regime_options()) == {
        "alpha", "beta", "epsilon", "lam", "ridge", "transform", "queue", "normalise", "cov_relative"
    }  # fmt: skip
    assert LDT.defaults["alpha"] == 5e-3 and LDT.defaults["epsilon"] == 1.2 and LDT.defaults["b"] == 7.5
    bad_options = (
        {"utility": "both"}, {"alpha": -1.0}, {"b": 0.0}, {"location_attention": "yes"}, {"nope": 1},
        {"ridge": "relative"}, {"transform": "sqrt"}, {"queue": 2.5}, {"queue": -1}, {"head": "all"},
        {"normalise": 1},
    )  # fmt: skip
    for bad in bad_options:
        with pytest.raises(MethodError):
            build_method("ldt", **bad)


def test_ablation_suite_names_valid_variants() -> None:
    raw = tomllib.loads(SUITE.read_text())
    assert raw["methods"][0] == "ldt"
    for name in raw["methods"]:
        build_method(name.partition(":")[0], **raw.get("method_options", {}).get(name, {}))
    variants = {n: o for n, o in raw["method_options"].items() if n.startswith("ldt")}
    assert {"ldt_training", "utility", "location_attention"} <= {k for o in variants.values() for k in o}


# -- a real detector ----------------------------------------------------------------------------


def test_tiny_fcos_prunes_to_the_budget_and_keeps_training(tmp_path) -> None:
    data = build_dataset("synthetic-coco", "train", root=tmp_path, num_train=8, num_val=0, image_size=64)
    samples = [data[i] for i in range(len(data))]
    batch = ([s[0] for s in samples], [s[1] for s in samples])
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64)
    method = build_method("ldt")
    extra, _ = _train_step(model, method, batch)  # an LDT training step before pruning
    assert extra is not None and torch.isfinite(extra)
    model.eval()
    shapes = [o.shape for o in model.core(model.example_input())]
    ctx = PruneContext(calibration=[batch], round_to=1, progress=False)
    headed = prune(
        build_method("ldt", head="detection"), copy.deepcopy(model), ctx, Target.parse("params:0.3")
    )
    assert not headed.notes["unscored_groups"] and headed.notes["ldt"]["head"]["head_layers"] > 0
    assert any(name.startswith("head.") for name in headed.layers)  # scored from the detection loss
    report = prune(method, model, ctx, Target.parse("params:0.3"))
    assert abs(report.achieved["params"] - 0.3) <= 0.005
    assert [o.shape for o in model.core(model.example_input())] == shapes
    notes = report.notes["ldt"]
    assert len(notes["discriminants"]) == len(model.strides)
    unscored = report.notes["unscored_groups"]  # the default: D never reaches the head
    assert unscored and all(n.startswith("head.") for n in unscored)
    assert not any(name.startswith("head.") for name in report.layers)
    extra, _ = _train_step(model, method, batch)  # re-training on the pruned model
    assert extra is not None and torch.isfinite(extra)
    assert method.stats()["train"]["batches"] == 2
    assert notes["trace_counters"]["batches"] == 2  # calibration: one pooling pass, one tracing pass


def test_cached_scores_share_the_scoring_notes(trace_toy) -> None:
    if "score_cache" not in PruneContext.__dataclass_fields__:
        pytest.skip("this tree's PruneContext has no score cache")
    batch = _toy_batch([[0, 1], [1, 0], [0, 1], [1, 0]])
    ctx = PruneContext(calibration=[batch], round_to=1, progress=False, score_cache={})
    first = prune(LDT(), copy.deepcopy(trace_toy), ctx, Target.parse("channels:0.25"))
    second = prune(LDT(), copy.deepcopy(trace_toy), ctx, Target.parse("channels:0.5"))
    assert second.notes["scores_cached"] and not first.notes["scores_cached"]
    assert second.notes["ldt"]["discriminants"] == first.notes["ldt"]["discriminants"] != []
    assert second.notes["ldt"]["trace_counters"]["batches"] == 2


# -- the regime's well-posedness (DESIGN.md §4 "LDT": scale invariant, bounded at K < C) ----------

SCALE_INVARIANT = [
    {"ridge": "within", "transform": "none"},
    {"ridge": "total", "transform": "none"},
    {"ridge": "total", "transform": "log"},
    {"ridge": "within", "transform": "log"},
]


def _few_instances(seed: int = 0) -> tuple[Tensor, Tensor]:
    """K = 6 instances of 3 classes in C = 16 channels: S_w has rank 3 apart from its ridge."""
    return _clusters(seed=seed, per_class=2, classes=3, dims=16)


@pytest.mark.parametrize("reading", SCALE_INVARIANT)
def test_scaling_the_features_leaves_the_ld_loss_unchanged(reading) -> None:
    for X, y in (_clusters(seed=3), _few_instances(seed=4)):
        base = ld_loss(X, y, **reading)
        assert torch.isfinite(base)
        for factor in (10.0, 1e-3, 1e3):
            assert abs(float(ld_loss(X * factor, y, **reading) - base)) <= 1e-6 * max(1.0, abs(float(base)))
    # the gradient of a scale-invariant loss is orthogonal to the features: it never grows them
    X, y = _few_instances(seed=5)
    X.requires_grad_(True)
    (grad,) = torch.autograd.grad(ld_loss(X, y, **reading), X)
    assert abs(float((grad * X.detach()).sum())) <= 1e-8 * float(grad.norm() * X.detach().norm())


def test_the_absolute_ridge_rewards_growing_the_features() -> None:
    """The fault the relative readings remove: at K < C the loss falls like the squared scale."""
    X, y = _few_instances(seed=6)
    original = {"lam": 1e-3, "ridge": "absolute", "transform": "none"}
    small, large = ld_loss(X, y, **original), ld_loss(X * 10, y, **original)
    assert large < 50 * small < 0  # ~100x lower for 10x larger features


def test_normalised_instances_are_invariant_to_any_per_instance_scaling() -> None:
    X, y = _few_instances(seed=7)
    scales = torch.logspace(-2, 2, X.shape[0], dtype=torch.float64)[:, None]
    a = ld_loss(normalise_instances(X), y)
    b = ld_loss(normalise_instances(X * scales), y)
    assert abs(float(a - b)) <= 1e-6 * abs(float(a))
    assert torch.allclose(normalise_instances(X).norm(dim=1), torch.ones(X.shape[0], dtype=X.dtype))
    assert normalise_instances(torch.zeros(2, 3)).eq(0).all()


def test_with_fewer_instances_than_channels_the_loss_is_finite_and_bounded() -> None:
    """ridge "total" + log: L_LD >= -log(1 + C / lam) for every batch, even when each class has
    collapsed to a point (S_w = 0 apart from the ridge), and the gradient stays finite; the
    gradient of a scale-invariant loss falls as 1/scale, so ||grad|| * ||X|| is constant."""
    lam, C = 1e-3, 16
    bound = ld_loss_bound(C, lam)
    assert bound == pytest.approx(-math.log(1 + C / lam))
    X, y = _few_instances(seed=8)
    collapsed = X.clone()
    for c in y.unique():  # every instance of a class at its class mean: the worst case for LDA
        collapsed[y == c] = X[y == c].mean(dim=0) + 1e-9 * torch.randn_like(X[y == c])
    norms = []
    for features in (X, collapsed, X * 1e3, collapsed * 1e-3):
        Z = features.clone().requires_grad_(True)
        nu = generalized_eigvals(Z, y, lam=lam, ridge="total")
        loss, top = ld_loss_of_eigenvalues(nu, y, transform="log"), float(nu[-1].detach())
        assert torch.equal(loss, ld_loss(Z, y, lam=lam))  # the defaults: ridge "total", "log"
        (grad,) = torch.autograd.grad(loss, Z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert float(loss.detach()) >= bound and top <= C / lam * (1 + 1e-9)
        norms.append(float(grad.norm() * Z.norm()))
    assert norms[2] == pytest.approx(norms[0], rel=1e-6) and norms[3] == pytest.approx(norms[1], rel=1e-6)
    assert max(norms) < 1e3  # d log(1 + nu) = d nu / (1 + nu): the log keeps the collapse's gradient small
    raw = ld_loss(collapsed, y, lam=lam, transform="none")  # without the log: nu itself, in the thousands
    assert -C / lam <= float(raw) < -0.1 * C / lam


def test_relative_covariance_penalty_is_scale_invariant_and_below_one() -> None:
    X, _ = _clusters(seed=9)
    X = X @ torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # correlated
    rel = covariance_penalty(X, relative=True)
    assert 0 < float(rel) < 1
    assert float(covariance_penalty(X * 10, relative=True)) == pytest.approx(float(rel), rel=1e-9)
    raw, raw10 = covariance_penalty(X, relative=False), covariance_penalty(X * 10, relative=False)
    assert float(raw10) == pytest.approx(1e4 * float(raw), rel=1e-9)


def test_instance_queue_pools_detached_rows_first_in_first_out() -> None:
    queue = InstanceQueue(5)
    X1, y1 = torch.ones(3, 4, requires_grad=True), torch.tensor([0, 1, 1])
    assert queue.pooled(0, X1, y1)[0] is X1  # empty: the batch alone
    queue.push(0, X1, y1)
    X2, y2 = 2 * torch.ones(3, 4, requires_grad=True), torch.tensor([1, 0, 0])
    Xp, yp = queue.pooled(0, X2, y2)
    assert Xp.shape == (6, 4) and yp.tolist() == [1, 0, 0, 0, 1, 1]
    (grad,) = torch.autograd.grad(Xp.sum(), X2)  # gradients reach this batch's rows only
    assert grad.eq(1).all() and not queue._X[0].requires_grad
    queue.push(0, X2, y2)
    assert len(queue) == 5 and queue._X[0][:3].eq(2).all()  # the newest first, the oldest dropped
    narrow = torch.ones(2, 3)  # after pruning the width changed: the queued rows are not mixed in
    assert queue.pooled(0, narrow, torch.tensor([0, 1]))[0] is narrow
    off = InstanceQueue(0)
    off.push(0, X1, y1)
    assert len(off) == 0


def test_the_queue_lets_a_one_class_batch_train(trace_toy) -> None:
    """With this batch alone a one-class batch is skipped; pooled with earlier batches it trains."""
    mixed, one_class = _toy_batch([[0, 1], [1, 0], [0, 1], [1, 0]]), _toy_batch([[0, 0], [0, 0]], seed=1)
    alone, pooled = LDT(queue=0), LDT(queue=64)
    for method in (alone, pooled):
        _train_step(trace_toy, method, mixed)
    assert _train_step(trace_toy, alone, one_class)[0] is None
    extra, _ = _train_step(trace_toy, pooled, one_class)
    assert extra is not None and torch.isfinite(extra)
    (grad,) = torch.autograd.grad(extra, trace_toy.conv1.weight)
    assert grad.abs().sum() > 0


def test_training_logs_the_trajectory_per_epoch(trace_toy) -> None:
    from methods.engine.training import Schedule, train

    method = LDT()
    samples = list(zip(*_toy_batch([[0, 1], [1, 0], [0, 1], [1, 0]]), strict=True))
    train(
        trace_toy,
        samples,
        Schedule(epochs=3, batch_size=2, flip=0.0, warmup_iters=0),
        extra_loss=method.loss_hook(PruneContext(progress=False)),
        hooks=method.regime_hooks(),
        progress=False,
    )
    trajectory = method.stats()["trajectory"]
    assert [e["epoch"] for e in trajectory] == [0, 1, 2]
    for epoch in trajectory:
        assert {"ld", "ld_min", "cov", "top_eigenvalue", "ld_grad_ratio", "cov_grad_ratio"} <= set(epoch)
        assert all(math.isfinite(v) for v in epoch.values())
        assert epoch["ld_min"] >= ld_loss_bound(16, 1e-3) and 0 <= epoch["cov"] < 1  # one scale
    assert LDT(ldt_training=False).regime_hooks() == []


class HeadToy(TraceToy):
    """The toy with a prunable head layer after the neck (which D never reaches)."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Conv2d(16, 16, 3, padding=1)

    def core(self, x: Tensor) -> tuple[Tensor, ...]:
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        h = torch.relu(self.tower(h))
        return self.cls(h), self.box(h)


def test_the_head_is_scored_from_the_detection_loss_on_the_traced_footing() -> None:
    torch.manual_seed(0)
    model = HeadToy().eval()
    ctx = PruneContext(calibration=[_toy_batch([[0, 1], [1, 0], [0, 1], [1, 0]])], progress=False)
    without = LDT().trace(model, ctx)  # the default: the head unscored
    assert model.tower not in without and without[model.conv1].gt(0).any()
    method = LDT(head="detection")
    with_head = method.trace(model, ctx)
    detection = LDT(utility="detection").trace(model, ctx)
    notes = method.head_notes
    assert notes["head_layers"] == 1 and notes["shared_layers"] == 2
    # the head's scores are the detection loss's, scaled by the median traced/detection ratio
    ratios = sorted(float(without[m].mean() / detection[m].mean()) for m in (model.conv1, model.conv2))
    assert notes["head_scale"] == pytest.approx(ratios[1])
    assert torch.allclose(with_head[model.tower], detection[model.tower] * ratios[1])
    for layer in (model.conv1, model.conv2):  # the traced layers keep D's own scores
        assert torch.allclose(with_head[layer], without[layer], rtol=1e-5)
