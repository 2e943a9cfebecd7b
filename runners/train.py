"""Training and fine-tuning: one loop for baselines and pruned models alike.

SGD with momentum, linear warm-up then cosine decay per iteration, gradient clipping (a freshly
pruned network can spike), horizontal flips. An optional ``extra_loss`` lets a method add its
own term (LDT trains and re-trains with its discriminant loss).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datasets import collate
from datasets.transforms import RandomHorizontalFlip
from detectors.base import Detector

ExtraLoss = Callable[[Detector, Any, dict[str, Tensor]], Tensor | None]


@dataclass(frozen=True)
class Schedule:
    optimizer: str = "sgd"  # or "adamw"
    epochs: int = 12
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    clip_grad_norm: float = 10.0
    flip: float = 0.5

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Schedule:
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown schedule key(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Augmented(Dataset):
    def __init__(self, dataset: Dataset, flip: float) -> None:
        self.dataset, self.flip = dataset, RandomHorizontalFlip(flip)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.flip(*self.dataset[index])


def _lr_factor(iteration: int, total: int, warmup: int) -> float:
    if iteration < warmup:
        return 0.001 + (1 - 0.001) * iteration / warmup
    progress = (iteration - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: Detector, schedule: Schedule) -> torch.optim.Optimizer:
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
        )
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    raise ValueError(f"unknown optimizer '{schedule.optimizer}': use 'sgd' or 'adamw'")


def train(
    model: Detector,
    dataset: Dataset,
    schedule: Schedule,
    *,
    seed: int = 0,
    extra_loss: ExtraLoss | None = None,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place; returns the last epoch's mean loss and the seconds spent."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        _Augmented(dataset, schedule.flip),
        batch_size=schedule.batch_size,
        shuffle=True,
        drop_last=len(dataset) > schedule.batch_size,
        collate_fn=collate,
        generator=generator,
    )
    optimizer = _optimizer(model, schedule)
    total = schedule.epochs * len(loader)
    warmup = min(schedule.warmup_iters, total // 4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: _lr_factor(it, total, warmup))
    torch.manual_seed(seed)
    model.train()
    start, mean_loss = time.perf_counter(), float("nan")
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for epoch in range(schedule.epochs):
        model.set_epoch(epoch, schedule.epochs)
        running, steps = 0.0, 0
        for images, targets in loader:
            images = [im.to(device) for im in images]
            targets = [
                {k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets
            ]
            losses = model.loss(images, targets)
            loss = sum(losses.values())
            if extra_loss is not None:
                extra = extra_loss(model, (images, targets), losses)
                if extra is not None:
                    loss = loss + extra
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {bar.n}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            running, steps = running + loss.item(), steps + 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        mean_loss = running / max(1, steps)
    bar.close()
    model.eval()
    return {"loss": mean_loss, "seconds": time.perf_counter() - start}
