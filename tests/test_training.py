"""The one training loop: its hooks, its endless stream across rounds, and its optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from methods.training import Schedule, Trainer, _optimizer
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

    class Hook:
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
