"""HRank, CHIP and DCODP: known answers on hand-built feature maps, the fast path against the
naive SVD loop, the shared activation capture, and pruning to a budget."""

from __future__ import annotations

import copy

import pytest
import torch

from detectors import build_detector
from methods import PruneContext, Target, build_method
from methods.chip import chip_scores, nuclear_norm_drops
from methods.dcodp import coupling_scores
from methods.engine import prune
from methods.engine.activations import capture, observation_points
from methods.engine.groups import score_groups
from methods.hrank import hrank_ranks, hrank_scores


def naive_nuclear_drops(feats: torch.Tensor) -> torch.Tensor:
    """The reference: one SVD of the masked ``C x HW`` matrix per image and channel."""
    n, c = feats.shape[:2]
    a = feats.reshape(n, c, -1).double()
    out = torch.empty(n, c, dtype=torch.float64)
    for i in range(n):
        full = torch.linalg.matrix_norm(a[i], "nuc")
        for j in range(c):
            masked = a[i].clone()
            masked[j] = 0
            out[i, j] = full - torch.linalg.matrix_norm(masked, "nuc")
    return out


def _maps(seed: int = 0, n: int = 3, c: int = 8, hw: int = 6) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed)).double()


def test_hrank_known_ranks() -> None:
    feats = _maps()
    feats[:, 2] = 0
    u, v = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    feats[:, 4] = u @ v  # rank 1
    scores = hrank_scores(feats)
    assert scores[2] == 0 and scores[4] == 1
    assert (scores[[0, 1, 3, 5, 6, 7]] == 6).all()
    loop = torch.stack(
        [torch.tensor([float(torch.linalg.matrix_rank(m.float())) for m in img]) for img in feats]
    )
    assert torch.equal(hrank_ranks(feats), loop)


@pytest.mark.parametrize("score", [chip_scores, coupling_scores])
def test_zero_channel_is_least_important(score) -> None:
    feats = _maps()
    feats[:, 5] = 0
    s = score(feats)
    assert s.argmin() == 5 and s[5] == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("score", [chip_scores, coupling_scores])
def test_duplicate_and_combination_are_least_independent(score) -> None:
    feats = _maps(c=8, hw=5)
    feats[:, 6] = feats[:, 1]  # an exact duplicate
    s = score(feats)
    assert set(s.argsort()[:2].tolist()) == {1, 6}
    feats = _maps(seed=1, c=8, hw=5)
    feats[:, 7] = 0.5 * feats[:, 0] + 0.5 * feats[:, 2]  # a linear combination of others
    s = score(feats)
    assert s.argsort()[:3].tolist()[0] == 7 and set(s.argsort()[:3].tolist()) == {0, 2, 7}


@pytest.mark.parametrize("hw", [5, 3])  # 25 pixels > 12 channels: the channel side; 9 < 12: pixels
@pytest.mark.parametrize("kind", ["random", "rank-deficient", "relu"])
def test_fast_path_equals_naive_svd_loop(kind: str, hw: int) -> None:
    feats = _maps(seed=3, n=3, c=12, hw=hw)
    if kind == "rank-deficient":  # 12 channels spanning 4 directions, plus a zero channel
        basis = feats[:, :4].reshape(3, 4, -1)
        mix = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        feats = (mix @ basis).reshape(3, 12, hw, hw)
        feats[:, 9] = 0
    if kind == "relu":
        feats = feats.clamp(min=0)
    fast, naive = nuclear_norm_drops(feats), naive_nuclear_drops(feats)
    torch.testing.assert_close(fast, naive, rtol=1e-6, atol=1e-6 * naive.abs().max().item())


def test_capture_observes_post_activation_in_one_pass() -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    points = observation_points(model)
    block = "backbone.body.layer1.0"
    bn1, act1 = points[f"{block}.conv1"]
    bn2, act2 = points[f"{block}.conv2"]
    assert bn1 is model.backbone.body.layer1[0].bn1 and isinstance(act1, torch.nn.ReLU) and not act1.inplace
    assert bn2 is model.backbone.body.layer1[0].bn2 and act2 is None  # the residual add comes first
    assert "head.classification_head.cls_logits" not in points
    calls = {"n": 0}
    handle = model.backbone.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    batches = [([torch.rand(3, 64, 64) for _ in range(2)], [{}, {}]) for _ in range(3)]
    stats = capture(model, batches, lambda f: f.amin(dim=(2, 3)))
    handle.remove()
    assert calls["n"] == 1 + 3  # one tracing pass, then one forward per batch for every layer at once
    assert (stats[f"{block}.conv1"] >= 0).all()  # post-ReLU
    assert set(stats) == set(points)


def _calibration(n: int = 4, size: int = 64) -> list:
    g = torch.Generator().manual_seed(0)
    return [([torch.rand(3, size, size, generator=g) for _ in range(n)], [{} for _ in range(n)])]


@pytest.mark.parametrize("method", ["hrank", "chip", "dcodp"])
def test_methods_meet_the_budget(method: str) -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    pruned = copy.deepcopy(model)
    ctx = PruneContext(calibration=_calibration(), round_to=1, progress=False)
    report = prune(build_method(method), pruned, ctx, Target.parse("params:0.3"))
    assert abs(report.achieved["params"] - 0.3) <= 0.005
    pruned.predict([torch.rand(3, 64, 64)])


def test_dcodp_groups_and_its_root_coupling_ablation() -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    ctx = PruneContext(calibration=_calibration(n=2), round_to=1, progress=False)
    scored = {}
    for parent_only in (False, True):
        method = build_method("dcodp", coupling="root" if parent_only else "sum")
        method.prepare(model, ctx)
        groups = {g.root: g for g in score_groups(model, method.importance(model, ctx))}
        scored[parent_only] = groups
    residual = scored[False]["backbone.body.stem.0"]
    assert {"backbone.body.layer1.0.conv2", "backbone.body.layer1.1.conv2"} <= set(residual.members)
    assert "backbone.body.layer1.0.conv1" in residual.consumers
    summed = residual.sorted_scores.sum()
    parent = scored[True]["backbone.body.stem.0"].sorted_scores.sum()
    assert summed > parent > 0  # the coupled layers add their scores to the parent's
    single = scored[False]["backbone.body.layer1.0.conv1"]  # a group of one layer: no difference
    torch.testing.assert_close(
        single.sorted_scores, scored[True]["backbone.body.layer1.0.conv1"].sorted_scores
    )


def test_single_layer_criteria_score_the_root_and_dcodp_sums_the_group() -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 3, "tiny", 64).eval()
    ctx = PruneContext(calibration=_calibration(n=2), round_to=1, progress=False)
    scores = {}
    for name in ("chip", "dcodp"):
        method = build_method(name)
        method.prepare(model, ctx)
        scores[name] = {g.root: g for g in score_groups(model, method.importance(model, ctx))}
    root = "backbone.body.stem.0"  # its group also holds the residual convs of layer1
    chip_stem = torch.zeros(len(scores["chip"][root].order), dtype=torch.float64)
    chip_stem[scores["chip"][root].order] = scores["chip"][root].sorted_scores
    dcodp_stem = torch.zeros_like(chip_stem)
    dcodp_stem[scores["dcodp"][root].order] = scores["dcodp"][root].sorted_scores
    assert (dcodp_stem > chip_stem).all()  # the coupled layers' CP adds to the parent's


def test_capture_moves_the_batches_to_the_models_device() -> None:
    """The model lives on the ``meta`` device: every batch must reach it there, not on the CPU."""
    from tests.conftest import ToyDetector

    class Recording(ToyDetector):
        devices: list[str] = []

        def preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
            self.devices.append(images[0].device.type)
            return torch.stack(images)

    model = Recording().to("meta").eval()
    batches = [([torch.rand(3, 16, 16) for _ in range(2)], [{}, {}]) for _ in range(2)]
    stats = capture(model, batches, lambda f: torch.ones(f.shape[0], f.shape[1]))
    assert model.devices == ["meta", "meta"]
    assert set(stats) == {"conv1", "conv2"} and all(s.device.type == "cpu" for s in stats.values())
