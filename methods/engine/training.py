"""The one training loop: baselines, fine-tuning and the training between pruning rounds.

SGD with momentum (or AdamW), linear warm-up then cosine decay per iteration, gradient clipping
(a freshly pruned network can spike), horizontal flips. Like detectron2's single loop, what
differs between its users comes in as hooks, never as a second loop:

* ``extra_loss(model, batch, losses, neck)``: a method's own term (LDT's discriminant loss),
  given the neck maps of the very forward pass that computed ``losses``;
* ``hooks``: ``TrainingHook``s, whose methods name the points where the loop calls them
  (GroupFisher collects its Fisher sums between backward and step; LDT logs its trajectory per
  epoch; the runners mark their fault-injection stages).

``Trainer.epochs`` runs a whole schedule; ``Trainer.steps(n)`` runs ``n`` more iterations of the
same endless, seeded stream of batches (warm-up, then a constant rate: the total is not known
when a method prunes until its budget is met), with a fresh optimizer because pruning changes
the parameters' shapes.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from detectors.base import Detector

_KIND_NAMES = {int: "a whole number", float: "a number", str: "text"}
ExtraLoss = Callable[[Detector, Any, dict[str, Tensor], "list[Tensor] | None"], "Tensor | None"]


@dataclass(frozen=True)
class Schedule:
    optimizer: str = "sgd"  # or "adamw"
    epochs: int = 12
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9  # SGD's momentum; AdamW's beta1 (Ultralytics' reading: DCODP's 0.937)
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    clip_grad_norm: float = 10.0
    flip: float = 0.5

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Schedule:
        """A schedule from a suite's table; a misspelt key, a value of the wrong type or out of
        range is a ValueError naming the key (and the nearest valid one)."""
        values = dict(values or {})
        fields = list(cls.__dataclass_fields__)
        unknown = sorted(set(values) - set(fields))
        if unknown:
            near = difflib.get_close_matches(unknown[0], fields, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ValueError(f"unknown schedule key(s): {', '.join(unknown)}{hint}")
        for key, value in values.items():
            kind = type(getattr(cls, key))
            numeric = kind is float and isinstance(value, int)
            if isinstance(value, bool) or not (isinstance(value, kind) or numeric):
                raise ValueError(f"schedule key {key} must be {_KIND_NAMES[kind]}, not {value!r}")
        schedule = cls(**values)
        schedule.check()
        return schedule

    def check(self) -> None:
        """The ranges a schedule must keep (a ValueError naming the key)."""
        for key, ok, need in (
            ("optimizer", self.optimizer in ("sgd", "adamw"), "'sgd' or 'adamw'"),
            ("epochs", self.epochs >= 0, "0 or more"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"),
            ("warmup_iters", self.warmup_iters >= 0, "0 or more"),
            ("clip_grad_norm", self.clip_grad_norm > 0, "a positive number"),
            ("flip", 0 <= self.flip <= 1, "in [0, 1]"),
        ):
            if not ok:
                raise ValueError(f"schedule key {key} must be {need}, not {getattr(self, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Keep images as a list: detectors batch and resize them themselves."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``, and ``boxes`` / ``ignore_boxes`` with it.

    Draws from torch's global generator, so DataLoader workers (seeded per worker) stay reproducible.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        if self.p == 0.0 or torch.rand(()).item() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)  # never mutate the caller's dict
        for key in ("boxes", "ignore_boxes"):
            if key in target:
                flipped = target[key][:, [2, 1, 0, 3]].clone()
                flipped[:, [0, 2]] = width - flipped[:, [0, 2]]
                target[key] = flipped
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class _Augmented(Dataset):
    def __init__(self, dataset: Any, flip: float) -> None:
        self.dataset, self.flip = dataset, RandomHorizontalFlip(flip)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.flip(*self.dataset[index])


def _lr_factor(iteration: int, total: int | None, warmup: int) -> float:
    if iteration < warmup:
        return 0.001 + (1 - 0.001) * iteration / warmup
    if total is None:
        return 1.0
    progress = (iteration - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: Detector, schedule: Schedule) -> torch.optim.Optimizer:
    # foreach: one batched update over all parameters instead of a Python loop over them (torch
    # picks it by default on CUDA only); on a CPU the per-tensor AdamW loop was ~12% of a tiny
    # detector's step. The same arithmetic: the updates are bit-identical.
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=schedule.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
            foreach=True,
        )
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(),
            lr=schedule.lr,
            betas=(schedule.momentum, 0.999),  # 0.9 by default: torch's own default beta1
            weight_decay=schedule.weight_decay,
            foreach=True,
        )
    raise ValueError(f"unknown optimizer '{schedule.optimizer}': use 'sgd' or 'adamw'")


def _to(device: torch.device, images: list[Tensor], targets: list[dict]) -> tuple[list, list]:
    return [im.to(device) for im in images], [
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets
    ]


class TrainingHook:
    """The points where the training loop calls a hook; each does nothing unless overridden."""

    def before_train(self, model: Detector) -> None:
        """Once, when a session (a whole schedule or ``steps(n)``) starts, the model in train mode."""

    def before_epoch(self, model: Detector) -> None:
        """At the start of every epoch of a whole schedule (never within ``steps``)."""

    def after_backward(self, model: Detector) -> None:
        """After every backward pass, before clipping and the optimizer step: the gradients."""

    def after_train(self, model: Detector) -> None:
        """Once, when the session ends (also on an error)."""


class Trainer:
    """Trains ``model`` in place on shuffled, flipped batches of ``dataset`` (see the module doc)."""

    def __init__(
        self,
        model: Detector,
        dataset: Any,
        schedule: Schedule,
        *,
        seed: int = 0,
        extra_loss: ExtraLoss | None = None,
        desc: str = "train",
        progress: bool = True,
    ) -> None:
        self.model, self.schedule, self.seed = model, schedule, seed
        self.extra_loss, self.desc, self.progress = extra_loss, desc, progress
        self.loader = DataLoader(
            _Augmented(dataset, schedule.flip),
            batch_size=schedule.batch_size,
            shuffle=True,
            drop_last=len(dataset) > schedule.batch_size,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        )
        self.iterations = 0
        self._stream: Iterator | None = None
        self._trace: list[tuple[float, float]] = []

    def epochs(self, hooks: Sequence[TrainingHook] = ()) -> dict[str, float]:
        """The whole schedule; returns the last epoch's mean loss and the seconds spent."""
        model, schedule = self.model, self.schedule
        optimizer = _optimizer(model, schedule)
        total = schedule.epochs * len(self.loader)
        warmup = min(schedule.warmup_iters, total // 4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: _lr_factor(it, total, warmup))
        torch.manual_seed(self.seed)
        start, mean_loss = time.perf_counter(), float("nan")
        with self._session(total, hooks) as bar:
            for epoch in range(schedule.epochs):
                model.set_epoch(epoch, schedule.epochs)
                for hook in hooks:
                    hook.before_epoch(model)
                first = len(self._trace)
                for images, targets in self.loader:
                    self._step(images, targets, optimizer, scheduler, hooks, bar)
                mean_loss = _mean([d + e for d, e in self._trace[first:]])
        return self._stats(mean_loss, start)

    def steps(self, n: int, hooks: Sequence[TrainingHook] = ()) -> dict[str, float]:
        """``n`` more iterations of the endless stream, warm-up counted from the first call."""
        if self._stream is None:
            torch.manual_seed(self.seed)
            self._stream = self._endless()
        optimizer = _optimizer(self.model, self.schedule)
        warmup, first = self.schedule.warmup_iters, self.iterations
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: _lr_factor(first + it, None, warmup)
        )
        start = time.perf_counter()
        with self._session(n, hooks) as bar:
            for _ in range(n):
                images, targets = next(self._stream)
                self._step(images, targets, optimizer, scheduler, hooks, bar)
        return self._stats(_mean([d + e for d, e in self._trace]), start)

    def _stats(self, loss: float, start: float) -> dict[str, Any]:
        """The mean loss, the seconds, and the health of this session's loss (``loss_health``)."""
        det, extra = [d for d, _ in self._trace], [e for _, e in self._trace]
        return {"loss": loss, "seconds": time.perf_counter() - start, "health": loss_health(det, extra)}

    def _endless(self) -> Iterator[tuple[list, list]]:
        while True:
            yield from self.loader

    def _session(self, total: int, hooks: Sequence[TrainingHook]):
        trainer = self

        class Session:
            def __enter__(self) -> tqdm:
                trainer._trace = []  # (detection loss, method's loss) per step of this session
                trainer.model.train()
                trainer._neck_handle = None
                if trainer.extra_loss is not None:  # the extra loss sees this pass's neck maps
                    trainer._neck_handle = trainer.model.neck.register_forward_hook(trainer._keep_neck)
                for hook in hooks:
                    hook.before_train(trainer.model)
                self.bar = tqdm(
                    total=total,
                    desc=trainer.desc,
                    disable=not trainer.progress,
                    leave=False,
                    dynamic_ncols=True,
                )
                return self.bar

            def __exit__(self, *exc: Any) -> None:
                self.bar.close()
                if trainer._neck_handle is not None:
                    trainer._neck_handle.remove()
                trainer._neck = None
                for hook in hooks:
                    hook.after_train(trainer.model)
                trainer.model.zero_grad(set_to_none=True)
                trainer.model.eval()

        return Session()

    def _keep_neck(self, module: Any, args: Any, output: Any) -> None:
        self._neck = output

    def _step(self, images, targets, optimizer, scheduler, hooks, bar) -> float:
        model = self.model
        images, targets = _to(next(model.parameters()).device, images, targets)
        self._neck = None
        losses = model.loss(images, targets)
        loss = detection = sum(losses.values())
        if self.extra_loss is not None:
            neck = neck_maps(self._neck) if self._neck is not None else None
            extra = self.extra_loss(model, (images, targets), losses, neck)
            if extra is not None:
                loss = loss + extra
        self._neck = None
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.desc}: loss became {loss.item()} at step {self.iterations}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for hook in hooks:
            hook.after_backward(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.schedule.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        self.iterations += 1
        # one device sync for both figures (the method's term is the difference)
        det, total = torch.stack([detection.detach().float(), loss.detach().float()]).tolist()
        self._trace.append((det, total - det))
        bar.update()
        bar.set_postfix(loss=f"{total:.3f}", refresh=False)  # drawn at tqdm's own interval
        return total


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


RISE_TOLERANCE = 1.1  # step-to-step noise: a detection loss 10% above its start has not converged


def loss_health(detection: Sequence[float], extra: Sequence[float]) -> str:
    """``"ok"``, or what is wrong with a run's loss, from its per-step detection loss and the
    method's own term (0 where it has none), comparing the first fifth of the steps with the last.

    A non-finite loss stops the loop (a failed cell); this names the finite failures that would
    otherwise yield rows that look like results: a detection loss that ends above where it began,
    and a method's term that outweighs the detection loss (LDT's first reading drove its total
    loss to -3000 while the detector learnt nothing).
    """
    n = len(detection)
    if n < 2:
        return "ok"
    k = max(1, n // 5)
    first, last = _mean(detection[:k]), _mean(detection[-k:])
    term = _mean([abs(e) for e in extra[-k:]])
    problems = []
    if last > RISE_TOLERANCE * first:
        problems.append(
            f"detection loss rose from {first:.3g} to {last:.3g} (first vs last fifth of {n} steps)"
        )
    if term > last:
        problems.append(f"the method's loss term ({term:.3g}) outweighs the detection loss ({last:.3g})")
    return "; ".join(problems) or "ok"


def neck_maps(output: Any) -> list[Tensor]:
    """The per-scale maps of a neck's output: a tensor, a list/tuple, or a (Ordered)dict."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return list(output.values())
    if isinstance(output, (list, tuple)) and all(isinstance(t, Tensor) for t in output):
        return list(output)
    raise ValueError(f"the neck returned {type(output).__name__}, not feature maps")


def train(
    model: Detector, dataset: Any, schedule: Schedule, hooks: Sequence[TrainingHook] = (), **options: Any
) -> dict[str, float]:
    """Train ``model`` in place for the whole ``schedule`` (``options``: ``Trainer``'s keywords)."""
    return Trainer(model, dataset, schedule, **options).epochs(hooks)
