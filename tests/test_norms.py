"""Per-level BatchNorm statistics in the heads shared over pyramid levels (detectors/norms.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from detectors import build_detector
from detectors.norms import LevelBatchNorm2d, track_levels


class TwoLevelHead(nn.Module):
    """One conv + norm tower applied to two levels, like FCOS's head over P3..P7."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(3, 4, 1), norm)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.tower(x) for x in levels]


def _levels(generator: torch.Generator, batch: int = 8) -> list[torch.Tensor]:
    # the two levels differ in scale by 20x, as P3 and P7 do in a trained tiny head
    return [
        torch.randn(batch, 3, 8, 8, generator=generator),
        20 * torch.randn(batch, 3, 2, 2, generator=generator) + 5,
    ]


def _train_then_eval(norm: nn.Module, track: bool) -> list[torch.Tensor]:
    """Train ``norm`` in a two-level head, then return its evaluation outputs on fresh levels."""
    torch.manual_seed(0)
    head = TwoLevelHead(norm)
    if track:
        track_levels(head, [head.tower])
    g = torch.Generator().manual_seed(1)
    head.train()
    with torch.no_grad():
        for _ in range(200):  # momentum 0.1: the running statistics converge to the batches'
            head(_levels(g))
        head.eval()
        return head(_levels(torch.Generator().manual_seed(2), batch=256))


def _per_channel(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = y.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.std(1)


def test_eval_normalises_each_level_as_training_did() -> None:
    # training normalises each level by its own batch statistics to mean 0 and std 1 (the affine is
    # still the identity), so evaluation with the right running statistics must do the same
    for y in _train_then_eval(LevelBatchNorm2d(4, levels=2), track=True):
        mean, std = _per_channel(y)
        assert mean.abs().max() < 0.15 and (std - 1).abs().max() < 0.15
    # a single set of running statistics (the old head) mixes the levels: far off at either level
    for y in _train_then_eval(nn.BatchNorm2d(4), track=False):
        mean, std = _per_channel(y)
        assert mean.abs().max() > 0.3 or (std - 1).abs().max() > 0.3


def test_same_parameters_as_one_batchnorm_and_a_clear_error_past_the_levels() -> None:
    norm = LevelBatchNorm2d(6, levels=5)
    assert sum(p.numel() for p in norm.parameters()) == sum(p.numel() for p in nn.BatchNorm2d(6).parameters())
    assert norm.running_mean.shape == norm.running_var.shape == (6, 5)
    head = TwoLevelHead(LevelBatchNorm2d(4, levels=1))
    track_levels(head, [head.tower])
    with pytest.raises(RuntimeError, match="level 1 of a norm kept for 1 levels"):
        head(_levels(torch.Generator().manual_seed(0)))


def test_pruning_keeps_each_levels_statistics_of_the_kept_channels() -> None:
    torch.manual_seed(0)
    head = TwoLevelHead(LevelBatchNorm2d(4, levels=2))
    track_levels(head, [head.tower])
    head.tower[1].running_mean.copy_(torch.arange(8.0).view(4, 2))
    head.tower[1].running_var.copy_(torch.arange(1.0, 9.0).view(4, 2))
    example = _levels(torch.Generator().manual_seed(0))
    graph = tp.DependencyGraph().build_dependency(
        head, example_inputs=(example,), forward_fn=lambda m, x: m(*x)
    )
    graph.get_pruning_group(head.tower[0], tp.prune_conv_out_channels, idxs=[1, 2]).prune()
    norm = head.tower[1]
    assert norm.num_features == 2 and norm.weight.shape == (2,)
    assert norm.running_mean.tolist() == [[0.0, 1.0], [6.0, 7.0]]
    assert norm.running_var.tolist() == [[1.0, 2.0], [7.0, 8.0]]
    head.eval()
    assert [y.shape[1] for y in head(example)] == [2, 2]


@pytest.mark.parametrize("name", ["fcos", "atss", "gfl"])
def test_heads_use_one_statistics_column_per_level_and_copies_keep_theirs(name: str) -> None:
    model = build_detector(name, 3, "tiny", 64)
    norms = [m for m in model.head.modules() if isinstance(m, LevelBatchNorm2d)]
    assert norms and all(n.levels == len(model.strides) for n in norms)
    seen: list[int] = []
    handle = norms[0].register_forward_pre_hook(lambda m, a: seen.append(m.level))
    model.train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    model.loss(images, targets)
    model.loss(images, targets)  # the count restarts with every pass of the head
    handle.remove()
    assert seen == list(range(len(model.strides))) * 2
    # every level's column moved away from its initial value, each by its own statistics
    assert not torch.allclose(norms[0].running_var[:, 0], norms[0].running_var[:, -1])
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        assert torch.equal(twin.core(twin.example_input())[0], model.eval().core(model.example_input())[0])


def test_a_checkpoint_with_one_set_of_statistics_is_refused_with_the_reason() -> None:
    from detectors.base import DetectorError

    old = nn.BatchNorm2d(4).state_dict()  # what the head saved before statistics per level
    with pytest.raises(DetectorError, match="from before the head kept statistics per level"):
        LevelBatchNorm2d(4, levels=2).load_state_dict(old)
    fresh = LevelBatchNorm2d(4, levels=2)
    fresh.running_var.copy_(torch.arange(8.0).view(4, 2))
    loaded = LevelBatchNorm2d(4, levels=2)
    loaded.load_state_dict(fresh.state_dict())
    assert torch.equal(loaded.running_var, fresh.running_var)
