"""LDT: location-aware discriminant training and tracing (Lan & Tian; DESIGN.md §4 "LDT").

Two halves, both driven by the ground-truth boxes:

* **Training** (``regime = "ldt"``): ``train_loss`` adds ``α L_LD + β L_cov`` on the neck
  features of the same forward pass that computed the detection losses: the shared training
  loop hands it that pass's neck maps. (Called directly without them, it recomputes them:
  ``core`` on the same batch, in the same mode.)
* **Scoring**: ``prepare`` pools the calibration instances per neck scale and solves the
  discriminant problem once (``ν``, ``V``); ``importance`` makes one forward/backward pass per
  calibration batch in which every prunable layer's output maps ``F`` and ``dD/dF`` (or
  ``dL_det/dF``) are captured, and accumulates ``I_{l,c} = Σ_n Σ_p A_n(p) |w_{l,c,n} F_{l,c,n}(p)|``
  with ``w = mean_{x,y} dD/dF``. Scores are summed over each torch-pruning group; global scope.
  With the discriminant utility, layers that ``D`` never reaches (the head, after the neck) get
  no score and are left unpruned; the engine names them in the report's notes.

Every constant is an option (``defaults``); the ablation switches are ``ldt_training``,
``utility`` ("discriminant" | "detection") and ``location_attention``.
"""

from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from tqdm.auto import tqdm

from detectors.base import Detector

from .base import Method, register
from .groups import NORMS, ROOT_TYPES, ChannelScores, fixed_layers
from .ldt_math import (
    FEW_CLASSES,
    NONFINITE,
    SKIP_REASONS,
    DegenerateScatter,
    Instances,
    check_classes,
    covariance_penalty,
    discriminants,
    discriminating_power,
    ld_loss,
    location_attention,
    map_instances,
)
from .training import neck_maps
from .types import Batch, Losses, Maps, MethodError, PruneContext

UTILITIES = ("discriminant", "detection")
# kept in eval mode while the detection utility runs the losses: statistics and randomness fixed
_FROZEN_WHEN_TRACING = (*NORMS, nn.Dropout, nn.Dropout2d)


def _new_counters() -> dict[str, dict[str, int]]:
    base = {"batches": 0, "instances": 0, "dropped_boxes": 0, "scales": 0, "skipped": 0}
    base |= {reason: 0 for reason in SKIP_REASONS}
    return {"train": {**base, "recomputed": 0}, "trace": {**base, "empty_batches": 0}}


@contextmanager
def _capture(module: nn.Module) -> Iterator[list[Any]]:
    """Every output ``module`` produces inside the block."""
    store: list[Any] = []
    handle = module.register_forward_hook(lambda m, args, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def _scoring_mode(model: nn.Module, utility: str) -> Iterator[None]:
    """Eval mode; for the detection utility, train mode (losses) with frozen norms and dropout."""
    flags = {m: m.training for m in model.modules()}
    try:
        if utility == "detection":
            model.train()
            for m in model.modules():
                if isinstance(m, _FROZEN_WHEN_TRACING):
                    m.eval()
        else:
            model.eval()
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@register("ldt")
class LDT(Method):
    """Location-aware discriminant training (baseline and re-training) and tracing (scores)."""

    scope = "global"
    regime = "ldt"
    defaults = {
        "alpha": 5e-3,  # weight of L_LD
        "beta": 5e-4,  # weight of L_cov
        "epsilon": 1.2,  # window above the smallest of the top n-1 eigenvalues
        "lam": 1e-3,  # ridge on S_w
        "a": 0.062,  # attention decay rate
        "b": 7.5,  # attention decay exponent
        "ldt_training": True,  # off: plain baseline and plain fine-tuning (regime "plain")
        "utility": "discriminant",  # or "detection": trace dL_det/dF instead of dD/dF
        "location_attention": True,  # off: A = 1 everywhere
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        for key in ("alpha", "beta", "epsilon", "lam", "a", "b"):
            if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or not o[key] >= 0:
                raise MethodError(f"method 'ldt': option {key} must be a number >= 0, not {o[key]!r}")
        if o["b"] <= 0:
            raise MethodError("method 'ldt': option b must be > 0")
        for key in ("ldt_training", "location_attention"):
            if not isinstance(o[key], bool):
                raise MethodError(f"method 'ldt': option {key} must be true or false, not {o[key]!r}")
        if o["utility"] not in UTILITIES:
            raise MethodError(
                f"method 'ldt': utility must be one of {', '.join(UTILITIES)}, not {o['utility']!r}"
            )
        # the regime decides the baseline; without LDT training the plain baseline is shared
        self.regime = "ldt" if o["ldt_training"] else "plain"  # type: ignore[misc]
        self.counters = _new_counters()
        self.discriminants: list[tuple[Tensor, Tensor] | None] = []
        self.summary: list[dict[str, Any]] = []
        self._tensor_sizes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def regime_options(self) -> dict[str, Any]:
        """The options that shape the LDT baseline's training; the scoring switches do not."""
        if not self.options["ldt_training"]:
            return {}
        return {k: self.options[k] for k in ("alpha", "beta", "epsilon", "lam")}

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters per phase (train / trace) with the share of (batch, scale) pairs skipped."""
        out: dict[str, Any] = copy.deepcopy(self.counters)
        for phase in out.values():
            phase["skip_rate"] = phase["skipped"] / phase["scales"] if phase["scales"] else 0.0
        return out

    def _skip(self, counter: dict[str, int], reason: str) -> None:
        counter["skipped"] += 1
        counter[reason] += 1

    # -- shared plumbing -------------------------------------------------------------------------
    def _strides(self, model: Detector, maps: list[Tensor]) -> tuple[int, ...]:
        strides = tuple(model.strides)
        if len(strides) != len(maps):
            raise MethodError(f"ldt: the neck gave {len(maps)} maps but the detector has strides {strides}")
        return strides

    def _tensor_hw(self, model: Detector, images: Sequence[Tensor]) -> tuple[int, int]:
        """The preprocessed tensor's size for these image sizes (preprocessed once, then cached)."""
        per_model = self._tensor_sizes.setdefault(model, {})
        key = (model.training, *(tuple(im.shape[-2:]) for im in images))
        if key not in per_model:
            with torch.no_grad():
                per_model[key] = tuple(model.preprocess(list(images)).shape[-2:])
        return per_model[key]

    def _instances(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
        tensor_hw: Sequence[int],
        counter: dict[str, int],
    ) -> Instances:
        inst, dropped = map_instances(images, targets, tensor_hw)
        counter["batches"] += 1
        counter["dropped_boxes"] += dropped
        counter["instances"] += int(inst.y.numel())
        return inst

    # -- training --------------------------------------------------------------------------------
    def _recomputed_maps(self, model: Detector, images: list[Tensor]) -> list[Tensor]:
        """The neck maps of ``images`` through the same network in the same mode (a direct call:
        the shared loop hands the loss pass's own maps instead)."""
        self.counters["train"]["recomputed"] += 1
        with _capture(model.neck) as outs:
            model.core(model.preprocess(images))
        if not outs:
            raise MethodError("ldt: model.neck did not run in core()")
        return neck_maps(outs[-1])

    def train_loss(
        self, model: Detector, ctx: PruneContext, batch: Batch, losses: Losses, neck: Maps | None = None
    ) -> Tensor | None:
        """``α Σ_s L_LD^s + β Σ_s L_cov^s`` on this batch's neck features; None if all skipped."""
        if not self.options["ldt_training"]:
            return None
        images, targets = batch
        images = list(images)
        maps = neck if neck else self._recomputed_maps(model, images)
        counter = self.counters["train"]
        inst = self._instances(images, targets, self._tensor_hw(model, images), counter)
        y = inst.y
        reason = check_classes(y) if y.numel() else FEW_CLASSES
        o = self.options
        total: Tensor | None = None
        for feat, stride in zip(maps, self._strides(model, maps), strict=True):
            counter["scales"] += 1
            if reason is not None:
                self._skip(counter, reason)
                continue
            X = inst.features(feat, stride)
            try:
                term = o["alpha"] * ld_loss(X, y.to(X.device), o["epsilon"], o["lam"])
                term = term + o["beta"] * covariance_penalty(X)
            except DegenerateScatter as exc:
                self._skip(counter, exc.reason)
                continue
            if not torch.isfinite(term):
                self._skip(counter, NONFINITE)
                continue
            total = term if total is None else total + term
        if total is None:
            return None
        dtype = next(iter(losses.values())).dtype if losses else maps[0].dtype
        return total.to(dtype)

    # -- scoring ---------------------------------------------------------------------------------
    def _batches(self, ctx: PruneContext, device: torch.device, desc: str) -> Iterator[tuple[list, list]]:
        for images, targets in tqdm(ctx.calibration, desc=desc, disable=not ctx.progress, leave=False):
            yield (
                [im.to(device) for im in images],
                [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets],
            )

    def prepare(self, model: Detector, ctx: PruneContext) -> None:
        """Pool the calibration instances per scale and solve for ``(ν, V)`` once."""
        self.discriminants, self.summary = [], []
        if self.options["utility"] != "discriminant":
            return
        if not ctx.calibration:
            raise MethodError("ldt: needs calibration images with boxes (ctx.calibration is empty)")
        device = next(model.parameters()).device
        counter = self.counters["trace"]
        feats: list[list[Tensor]] = []
        labels: list[Tensor] = []
        with _scoring_mode(model, "discriminant"), torch.no_grad(), _capture(model.neck) as outs:
            for images, targets in self._batches(ctx, device, "ldt discriminants"):
                x = model.preprocess(images)
                outs.clear()
                model.core(x)
                maps = neck_maps(outs[0])
                inst = self._instances(images, targets, x.shape[-2:], counter)
                strides = self._strides(model, maps)
                feats = feats or [[] for _ in maps]
                for s, (feat, stride) in enumerate(zip(maps, strides, strict=True)):
                    X = inst.features(feat, stride)
                    feats[s].append(X.to(torch.float64).cpu())
                labels.append(inst.y.cpu())
        y = torch.cat(labels)
        for s, stride in enumerate(model.strides):
            X = torch.cat(feats[s])
            counter["scales"] += 1
            entry: dict[str, Any] = {"stride": stride, "instances": int(X.shape[0])}
            entry["classes"] = int(torch.unique(y).numel())
            try:
                nu, V = discriminants(X, y, self.options["lam"])
            except DegenerateScatter as exc:
                self._skip(counter, exc.reason)
                self.discriminants.append(None)
                self.summary.append({**entry, "skipped": exc.reason})
                continue
            self.discriminants.append((nu, V))
            power = discriminating_power(nu, V)
            entry |= {"eigenvalues": nu.tolist(), "neck_power": [float(f"{p:.4g}") for p in power]}
            self.summary.append(entry)
        if not any(d is not None for d in self.discriminants):
            reasons = ", ".join(str(e.get("skipped")) for e in self.summary)
            raise MethodError(
                f"ldt: no neck scale has a usable discriminant on the calibration set ({reasons}); "
                "it needs >= 2 classes with >= 2 boxes each"
            )

    def _objective(self, model: Detector, maps: list[Tensor], inst: Instances) -> Tensor | None:
        """``D = Σ_s Σ_k Σ_j ν_j v_jᵀ f_k^s`` over the batch (None when no instance contributes)."""
        D: Tensor | None = None
        for disc, feat, stride in zip(self.discriminants, maps, self._strides(model, maps), strict=True):
            if disc is None:
                continue
            X = inst.features(feat, stride)
            if X.shape[0] == 0:
                continue
            nu, V = disc
            term = X.sum(dim=0).to(torch.float64) @ (V @ nu).to(X.device)
            D = term if D is None else D + term
        return D

    def _attention(self, inst: Instances, map_hw: tuple[int, int], cache: dict) -> Tensor:
        """``[B, H, W]`` attention at a map's own resolution (stride = tensor size / map size)."""
        if map_hw not in cache:
            th, tw = inst.tensor_hw
            stride = (th / map_hw[0], tw / map_hw[1])
            a, b = self.options["a"], self.options["b"]
            cache[map_hw] = torch.stack([location_attention(bx, map_hw, stride, a, b) for bx in inst.boxes])
        return cache[map_hw]

    def trace(self, model: Detector, ctx: PruneContext) -> dict[nn.Module, Tensor]:
        """``I_{l,c}`` for every prunable layer the objective reaches, one pass per batch."""
        if self.options["utility"] == "discriminant" and not self.discriminants:
            self.prepare(model, ctx)
        if not ctx.calibration:
            raise MethodError("ldt: needs calibration images with boxes (ctx.calibration is empty)")
        device = next(model.parameters()).device
        fixed = fixed_layers(model)
        layers = [m for m in model.modules() if isinstance(m, ROOT_TYPES) and id(m) not in fixed]
        scores: dict[nn.Module, Tensor] = {}
        records: dict[nn.Module, list[Tensor]] = defaultdict(list)

        def keep(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.requires_grad:
                records[module].append(out)

        counter = self.counters["trace"]
        utility = self.options["utility"]
        handles = [m.register_forward_hook(keep) for m in layers]
        try:
            for images, targets in self._batches(ctx, device, f"ldt tracing ({utility})"):
                records.clear()
                with _scoring_mode(model, utility), torch.enable_grad(), _capture(model.neck) as outs:
                    tensor_hw = self._tensor_hw(model, images)
                    if utility == "detection":
                        objective: Tensor | None = sum(model.loss(images, targets).values())
                        inst = self._instances(images, targets, tensor_hw, counter)
                    else:
                        model.core(model.preprocess(images))
                        maps = neck_maps(outs[-1])
                        inst = self._instances(images, targets, tensor_hw, counter)
                        objective = self._objective(model, maps, inst)
                if objective is None or not objective.requires_grad:
                    counter["empty_batches"] += 1
                    continue
                captured = [(m, out) for m, outs_m in records.items() for out in outs_m]
                grads = torch.autograd.grad(objective, [o for _, o in captured], allow_unused=True)
                attention: dict[tuple[int, int], Tensor] = {}
                for (module, out), grad in zip(captured, grads, strict=True):
                    if grad is None:
                        continue
                    value = self._layer_importance(out.detach(), grad, inst, attention)
                    scores[module] = scores.get(module, 0) + value.to(torch.float64).cpu()
                del captured, grads
        finally:
            for h in handles:
                h.remove()
            records.clear()
        return scores

    def _layer_importance(self, F: Tensor, grad: Tensor, inst: Instances, cache: dict) -> Tensor:
        """``Σ_n Σ_p A_n(p) |w_{c,n} F_{c,n}(p)|`` for one captured output (``[C]``)."""
        if F.dim() != 4 or F.shape[0] != len(inst.boxes):  # no image grid (e.g. RoI features)
            return (grad * F).abs().reshape(-1, F.shape[1] if F.dim() > 1 else 1).sum(dim=0)
        w = grad.mean(dim=(2, 3)).abs()  # [B, C]
        if self.options["location_attention"]:
            A = self._attention(inst, (F.shape[2], F.shape[3]), cache).to(F.dtype)
            per = torch.einsum("bchw,bhw->bc", F.abs(), A)
        else:
            per = F.abs().sum(dim=(2, 3))
        return (w * per).sum(dim=0)

    def importance(self, model: Detector, ctx: PruneContext) -> tp.importance.Importance:
        names = {m: n for n, m in model.named_modules()}
        return ChannelScores(model, {names[m]: s for m, s in self.trace(model, ctx).items()})

    def scoring_notes(self, model: Detector) -> dict[str, Any]:
        """The discriminants per scale and the tracing counters (the training counters are in
        ``stats``: the runner stores them after fine-tuning)."""
        return {
            "options": dict(self.options),
            "discriminants": self.summary,
            "trace_counters": copy.deepcopy(self.counters["trace"]),
        }
