"""LDT's plumbing beyond the math: its options, the queue of recent instances that makes the
scatter well posed (K >> C), the per-epoch trajectory the runner stores with every LDT baseline,
and the modes, captures and batches its tracing runs in."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .engine.groups import NORMS
from .engine.training import TrainingHook
from .engine.types import Losses, MethodError, PruneContext
from .ldt_math import RIDGES, SKIP_REASONS, TRANSFORMS

UTILITIES = ("discriminant", "detection")
HEADS = ("detection", "none")
# the options that shape the LDT baseline's training (the rest only shape the scores)
REGIME_KEYS = ("alpha", "beta", "epsilon", "lam", "ridge", "transform", "queue", "normalise", "cov_relative")
# kept in eval mode while the detection utility runs the losses: statistics and randomness fixed
FROZEN_WHEN_TRACING = (*NORMS, nn.Dropout, nn.Dropout2d)


def new_counters() -> dict[str, dict[str, int]]:
    """LDT's counters per phase: batches, instances, scales and why scales were skipped."""
    base = {"batches": 0, "instances": 0, "dropped_boxes": 0, "scales": 0, "skipped": 0}
    base |= {reason: 0 for reason in SKIP_REASONS}
    return {"train": {**base, "recomputed": 0}, "trace": {**base, "empty_batches": 0}}


def check_options(o: dict[str, Any]) -> None:
    """One ``MethodError`` line for the first option LDT cannot use."""
    for key in ("alpha", "beta", "epsilon", "lam", "a", "b", "queue"):
        if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or not o[key] >= 0:
            raise MethodError(f"method 'ldt': option {key} must be a number >= 0, not {o[key]!r}")
    if o["b"] <= 0:
        raise MethodError("method 'ldt': option b must be > 0")
    if o["queue"] != int(o["queue"]):
        raise MethodError(f"method 'ldt': option queue must be a whole number, not {o['queue']!r}")
    for key in ("ldt_training", "location_attention", "normalise", "cov_relative"):
        if not isinstance(o[key], bool):
            raise MethodError(f"method 'ldt': option {key} must be true or false, not {o[key]!r}")
    for key, allowed in (
        ("utility", UTILITIES),
        ("ridge", RIDGES),
        ("transform", TRANSFORMS),
        ("head", HEADS),
    ):
        if o[key] not in allowed:
            raise MethodError(f"method 'ldt': {key} must be one of {', '.join(allowed)}, not {o[key]!r}")


class InstanceQueue:
    """Detached instance features of recent batches, per neck scale: a FIFO of ``size`` rows.

    Pooled with a batch's own instances (which alone carry gradients), the scatter sees K >> C
    instances, so ``S_w`` has full rank without leaning on its ridge. Rows from a network of
    another width (after pruning) or on another device are dropped, not mixed in.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._X: dict[int, Tensor] = {}
        self._y: dict[int, Tensor] = {}

    def pooled(self, scale: int, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``X`` and ``y`` followed by the queued rows of ``scale`` (none when ``size`` is 0)."""
        old = self._X.get(scale)
        if old is None or old.shape[1] != X.shape[1] or old.device != X.device:
            return X, y
        return torch.cat([X, old.to(X.dtype)]), torch.cat([y, self._y[scale].to(y.device)])

    def push(self, scale: int, X: Tensor, y: Tensor) -> None:
        """Queue ``X`` (detached) in front; the oldest rows beyond ``size`` leave."""
        if self.size <= 0:
            return
        X, y = self.pooled(scale, X.detach(), y.detach())
        self._X[scale], self._y[scale] = X[: self.size], y[: self.size]

    def __len__(self) -> int:
        return sum(int(x.shape[0]) for x in self._X.values())


class Trajectory(TrainingHook):
    """Per-epoch means of the regime's terms (and the lowest ``ld``): a hook of the shared loop
    (``before_epoch`` opens an epoch, ``after_train`` closes the last). ``probe`` is true on an
    epoch's first LDT step, where the LD and detection gradients are measured separately."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._values: dict[str, list[float]] | None = None
        self.probe = False

    def before_epoch(self, model: nn.Module) -> None:
        self._close()
        self._values, self.probe = defaultdict(list), True

    def after_train(self, model: nn.Module) -> None:
        self._close()

    def add(self, **values: float) -> None:
        if self._values is not None:
            for key, value in values.items():
                self._values[key].append(float(value))

    def record(
        self,
        model: nn.Module,
        losses: Losses,
        terms: tuple[Tensor, Tensor],
        ld: Tensor,
        cov: Tensor,
        top: float,
    ) -> None:
        """A step's values; on an epoch's first step also the gradient norms of ``α L_LD`` and
        ``β L_cov`` (``terms``) against the detection loss's (three extra backward passes per epoch)."""
        values = {"ld": float(ld.detach()), "cov": float(cov.detach()), "top_eigenvalue": top}
        if self.probe and losses:
            self.probe = False
            params = [p for p in model.parameters() if p.requires_grad]
            det = grad_norm(sum(losses.values()), params)
            if det > 0:
                values["ld_grad_ratio"] = grad_norm(terms[0], params) / det
                values["cov_grad_ratio"] = grad_norm(terms[1], params) / det
        self.add(**values)

    def _close(self) -> None:
        if self._values is not None:
            epoch = {"epoch": len(self.epochs)} | {k: sum(v) / len(v) for k, v in self._values.items() if v}
            if self._values.get("ld"):  # the lowest step: what a stated bound must hold for
                epoch["ld_min"] = min(self._values["ld"])
            self.epochs.append(epoch)
        self._values, self.probe = None, False


def device_batches(ctx: PruneContext, device: torch.device, desc: str) -> Iterator[tuple[list, list]]:
    """The calibration batches on ``device``, with a progress bar when the context asks for one."""
    for images, targets in tqdm(ctx.calibration, desc=desc, disable=not ctx.progress, leave=False):
        yield (
            [im.to(device) for im in images],
            [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets],
        )


def grad_norm(loss: Tensor, params: list[nn.Parameter]) -> float:
    """``||d loss / d params||``, the graph kept for the training step's own backward."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(sum((g.detach().double() ** 2).sum() for g in grads if g is not None) ** 0.5)


@contextmanager
def capture(module: nn.Module) -> Iterator[list[Any]]:
    """Every output ``module`` produces inside the block."""
    store: list[Any] = []
    handle = module.register_forward_hook(lambda m, args, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def scoring_mode(model: nn.Module, utility: str) -> Iterator[None]:
    """Eval mode; for the detection utility, train mode (losses) with frozen norms and dropout."""
    flags = {m: m.training for m in model.modules()}
    try:
        if utility == "detection":
            model.train()
            for m in model.modules():
                if isinstance(m, FROZEN_WHEN_TRACING):
                    m.eval()
        else:
            model.eval()
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag
