"""The one training loop: its hooks, its endless stream across rounds, and its optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from methods.engine.training import Schedule, Trainer, TrainingHook, _optimizer, loss_health
from tests.conftest import ToyDetector


class Toy(ToyDetector):
    def preprocess(self, images: list[Tensor]) -> Tensor:
        return torch.stack(images)

    def loss(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        cls, box = self.core(self.preprocess(images))
        return {"toy": cls.pow(2).mean() + box.pow(2).mean()}


def _samples(n: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.rand(3, 16, 16, generator=g), {"boxes": torch.zeros(0, 4), "image_id": i}) for i in range(n)
    ]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_batched_optimizer_updates_equal_the_per_tensor_loop(kind: str) -> None:
    torch.manual_seed(0)
    a = Toy()
    b = copy.deepcopy(a)
    schedule = Schedule(optimizer=kind, lr=1e-2)
    fast = _optimizer(a, schedule)
    keys = ("lr", "momentum", "weight_decay") if kind == "sgd" else ("lr", "weight_decay")
    slow = type(fast)(b.parameters(), **{k: fast.defaults[k] for k in keys}, foreach=False)
    batch = [s[0] for s in _samples(4)]
    for _ in range(3):
        for model, opt in ((a, fast), (b, slow)):
            opt.zero_grad()
            sum(model.loss(batch, []).values()).backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_steps_continue_one_stream_and_call_the_hooks() -> None:
    torch.manual_seed(0)
    model = Toy()
    seen: list[int] = []
    calls = {"before_train": 0, "after_backward": 0, "after_train": 0}

    class Hook(TrainingHook):
        def before_train(self, m: nn.Module) -> None:
            calls["before_train"] += 1

        def after_backward(self, m: nn.Module) -> None:
            calls["after_backward"] += 1
            assert all(p.grad is not None for p in m.parameters())  # between backward and step

        def after_train(self, m: nn.Module) -> None:
            calls["after_train"] += 1

    def extra(m, batch, losses, neck):
        seen.extend(int(t["image_id"]) for t in batch[1])
        assert neck is not None and neck[0].shape[1] == 16  # the neck (conv2) maps of this pass
        return None

    trainer = Trainer(model, _samples(8), Schedule(batch_size=2, flip=0.0), extra_loss=extra, progress=False)
    trainer.steps(2, [Hook()])
    trainer.steps(2, [Hook()])
    assert sorted(seen) == list(range(8))  # four batches: one epoch, no batch twice
    assert calls == {"before_train": 2, "after_backward": 4, "after_train": 2}
    assert trainer.iterations == 4 and not model.training


def test_loss_health_names_a_rising_or_dominated_loss() -> None:
    falling = [3.0, 2.5, 2.0, 1.6, 1.4, 1.2, 1.1, 1.0, 0.95, 0.9]
    assert loss_health(falling, [0.0] * 10) == "ok"
    assert loss_health(falling, [-0.01] * 10) == "ok"  # a small method term, as LDT's default reading
    assert loss_health([1.0] * 10, [0.0] * 10) == "ok"  # flat: within the noise allowance
    rising = loss_health(list(reversed(falling)), [0.0] * 10)
    assert rising.startswith("detection loss rose from 0.925 to 2.75")
    dominated = loss_health(falling, [-5.0, -50.0, -500.0, -3000.0, -3000.0] * 2)
    assert "outweighs the detection loss" in dominated and "rose" not in dominated
    assert loss_health([2.0], [0.0]) == "ok"  # one step says nothing


def test_trainer_reports_its_health() -> None:
    torch.manual_seed(0)
    schedule = Schedule(epochs=3, batch_size=2, lr=0.05, warmup_iters=0, flip=0.0)
    assert Trainer(Toy(), _samples(8), schedule, progress=False).epochs()["health"] == "ok"

    def huge(m, batch, losses, neck):  # a method's term that swamps the detection loss
        return -1e3 * sum(p.abs().sum() for p in m.cls.parameters()) / 1e3 - 1e3

    stats = Trainer(Toy(), _samples(8), schedule, extra_loss=huge, progress=False).epochs()
    assert "outweighs the detection loss" in stats["health"]
