"""LDT: location-aware discriminant training and tracing (Lan & Tian; DESIGN.md §4 "LDT").

Two halves, both driven by the ground-truth boxes:

* **Training** (``regime = "ldt"``): ``train_loss`` adds ``α L_LD + β L_cov`` on the neck
  features of the same forward pass that computed the detection losses: the shared training
  loop hands it that pass's neck maps. (Called directly without them, it recomputes them:
  ``core`` on the same batch, in the same mode.) The reading is well posed and scale invariant
  by default (DESIGN.md §4): a ridge relative to the total scatter, this batch's instances
  pooled with a detached queue of recent ones, ``log(1 + ν)``, and a relative covariance
  penalty; ``regime_hooks`` logs the per-epoch trajectory (terms, top eigenvalue, and the LD
  gradient's norm against the detection loss's).
* **Scoring**: ``prepare`` pools the calibration instances per neck scale and solves the
  discriminant problem once (``ν``, ``V``); ``importance`` makes one forward/backward pass per
  calibration batch in which every prunable layer's output maps ``F`` and ``dD/dF`` (or
  ``dL_det/dF``) are captured, and accumulates ``I_{l,c} = Σ_n Σ_p A_n(p) |w_{l,c,n} F_{l,c,n}(p)|``
  with ``w = mean_{x,y} dD/dF``. Scores are summed over each torch-pruning group; global scope.
  ``D`` never reaches the head (it lies after the neck), so by default (``head = "none"``) the
  head gets no score and stays whole; the engine names its groups in the report's notes. With
  ``head = "detection"`` the head layers are scored by the same location-attended ``|w F|`` with
  ``w`` traced from the detection loss in the same pass, scaled onto ``D``'s footing by the median
  ratio of the two scores over the layers both reach. The ldt_ablation suite chose the default:
  scoring the head buys FLOPs and speed-up at the rate it costs mAP (README, "LDT's head").

Every constant is an option (``defaults``); the ablation switches are ``ldt_training``,
``utility`` ("discriminant" | "detection"), ``location_attention`` and ``head``.
"""

from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detectors.base import Detector

from .engine.base import Method, register
from .engine.groups import ROOT_TYPES, ChannelScores, fixed_layers
from .engine.training import neck_maps
from .engine.types import Batch, Losses, Maps, MethodError, PruneContext
from .ldt_math import (
    FEW_CLASSES,
    NONFINITE,
    DegenerateScatter,
    Instances,
    check_classes,
    covariance_penalty,
    discriminants,
    discriminating_power,
    generalized_eigvals,
    ld_loss_of_eigenvalues,
    location_attention,
    map_instances,
    normalise_instances,
    with_head,
)
from .ldt_regime import (
    REGIME_KEYS,
    InstanceQueue,
    Trajectory,
    capture,
    check_options,
    device_batches,
    new_counters,
    scoring_mode,
)


@register("ldt")
class LDT(Method):
    """Location-aware discriminant training (baseline and re-training) and tracing (scores)."""

    scope = "global"
    regime = "ldt"
    defaults = {
        "alpha": 5e-3,  # weight of L_LD
        "beta": 5e-4,  # weight of L_cov
        "epsilon": 1.2,  # window above the smallest of the top n-1 eigenvalues
        "lam": 1e-3,  # ridge on S_w (relative to the mean variance, see ridge)
        "ridge": "total",  # S_w + lam tr(S_t)/C I: scale invariant, nu <= C / lam ("within", "absolute")
        "transform": "log",  # the loss averages log(1 + nu) ("none": nu itself)
        "queue": 512,  # detached instances of recent batches pooled per scale (0: this batch only)
        "normalise": False,  # each instance feature scaled to unit length before the scatter
        "cov_relative": True,  # L_cov / tr(S_t)^2: bounded in [0, 1), scale invariant
        "a": 0.062,  # attention decay rate
        "b": 7.5,  # attention decay exponent
        "ldt_training": True,  # off: plain baseline and plain fine-tuning (regime "plain")
        "utility": "discriminant",  # or "detection": trace dL_det/dF instead of dD/dF
        "location_attention": True,  # off: A = 1 everywhere
        "head": "none",  # "detection": score the head (which D never reaches) from the detection loss
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_options(o)
        # the regime decides the baseline; without LDT training the plain baseline is shared
        self.regime = "ldt" if o["ldt_training"] else "plain"  # type: ignore[misc]
        self.counters = new_counters()
        self.discriminants: list[tuple[Tensor, Tensor] | None] = []
        self.summary: list[dict[str, Any]] = []
        self._tensor_sizes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.queue = InstanceQueue(int(o["queue"]))
        self.head_notes: dict[str, Any] = {}
        self.trajectory = Trajectory()

    def regime_options(self) -> dict[str, Any]:
        """The options that shape the LDT baseline's training; the scoring switches do not."""
        if not self.options["ldt_training"]:
            return {}
        return {k: self.options[k] for k in REGIME_KEYS}

    def regime_hooks(self) -> list[Any]:
        return [self.trajectory] if self.options["ldt_training"] else []

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters per phase (train / trace) with the share of (batch, scale) pairs skipped."""
        out: dict[str, Any] = copy.deepcopy(self.counters)
        for phase in out.values():
            phase["skip_rate"] = phase["skipped"] / phase["scales"] if phase["scales"] else 0.0
        out["trajectory"] = copy.deepcopy(self.trajectory.epochs)
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

    def _features(self, inst: Instances, feat: Tensor, stride: int) -> Tensor:
        X = inst.features(feat, stride)
        return normalise_instances(X) if self.options["normalise"] else X

    def _instances(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
        tensor_hw: Sequence[int],
        counter: dict[str, int],
        model: Detector,
    ) -> Instances:
        inst, dropped = map_instances(images, targets, tensor_hw, model.input_offsets(list(images)))
        counter["batches"] += 1
        counter["dropped_boxes"] += dropped
        counter["instances"] += int(inst.y.numel())
        return inst

    # -- training --------------------------------------------------------------------------------
    def _recomputed_maps(self, model: Detector, images: list[Tensor]) -> list[Tensor]:
        """The neck maps of ``images`` through the same network in the same mode (a direct call:
        the shared loop hands the loss pass's own maps instead)."""
        self.counters["train"]["recomputed"] += 1
        with capture(model.neck) as outs:
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
        inst = self._instances(images, targets, self._tensor_hw(model, images), counter, model)
        y = inst.y
        o = self.options
        ld: Tensor | None = None
        cov: Tensor | None = None
        tops: list[float] = []
        for scale, (feat, stride) in enumerate(zip(maps, self._strides(model, maps), strict=True)):
            counter["scales"] += 1
            if not y.numel():
                self._skip(counter, FEW_CLASSES)
                continue
            X = self._features(inst, feat, stride)
            Xp, yp = self.queue.pooled(scale, X, y.to(X.device))
            self.queue.push(scale, X, y.to(X.device))
            reason = check_classes(yp)
            if reason is not None:
                self._skip(counter, reason)
                continue
            try:
                nu = generalized_eigvals(Xp, yp, o["lam"], o["ridge"])
                ld_s, top = (
                    ld_loss_of_eigenvalues(nu, yp, o["epsilon"], o["transform"]),
                    float(nu[-1].detach()),
                )
                cov_s = covariance_penalty(Xp, o["cov_relative"])
            except DegenerateScatter as exc:
                self._skip(counter, exc.reason)
                continue
            if not (torch.isfinite(ld_s) and torch.isfinite(cov_s)):
                self._skip(counter, NONFINITE)
                continue
            ld, cov = (ld_s, cov_s) if ld is None else (ld + ld_s, cov + cov_s)
            tops.append(top)
        if ld is None or cov is None:
            return None
        terms = (o["alpha"] * ld, o["beta"] * cov)
        self.trajectory.record(model, losses, terms, ld, cov, max(tops))
        total = terms[0] + terms[1]
        dtype = next(iter(losses.values())).dtype if losses else maps[0].dtype
        return total.to(dtype)

    # -- scoring ---------------------------------------------------------------------------------
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
        with scoring_mode(model, "discriminant"), torch.no_grad(), capture(model.neck) as outs:
            for images, targets in device_batches(ctx, device, "ldt discriminants"):
                x = model.preprocess(images)
                outs.clear()
                model.core(x)
                maps = neck_maps(outs[0])
                inst = self._instances(images, targets, x.shape[-2:], counter, model)
                strides = self._strides(model, maps)
                feats = feats or [[] for _ in maps]
                for s, (feat, stride) in enumerate(zip(maps, strides, strict=True)):
                    X = self._features(inst, feat, stride)
                    feats[s].append(X.to(torch.float64).cpu())
                labels.append(inst.y.cpu())
        y = torch.cat(labels)
        for s, stride in enumerate(model.strides):
            X = torch.cat(feats[s])
            counter["scales"] += 1
            entry: dict[str, Any] = {"stride": stride, "instances": int(X.shape[0])}
            entry["classes"] = int(torch.unique(y).numel())
            try:
                nu, V = discriminants(X, y, self.options["lam"], self.options["ridge"])
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
            X = self._features(inst, feat, stride)
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
        utility = self.options["utility"]
        if utility == "discriminant" and not self.discriminants:
            self.prepare(model, ctx)
        if not ctx.calibration:
            raise MethodError("ldt: needs calibration images with boxes (ctx.calibration is empty)")
        device = next(model.parameters()).device
        fixed = fixed_layers(model)
        layers = [m for m in model.modules() if isinstance(m, ROOT_TYPES) and id(m) not in fixed]
        # the head: scored from the detection loss in the same pass, where D does not reach
        head = utility == "discriminant" and self.options["head"] == "detection"
        mode = "detection" if head else utility
        scores: dict[str, dict[nn.Module, Tensor]] = {"D": {}, "det": {}}
        records: dict[nn.Module, list[Tensor]] = defaultdict(list)

        def keep(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.requires_grad:
                records[module].append(out)

        counter = self.counters["trace"]
        handles = [m.register_forward_hook(keep) for m in layers]
        try:
            for images, targets in device_batches(ctx, device, f"ldt tracing ({utility})"):
                records.clear()
                objectives: dict[str, Tensor | None] = {}
                with scoring_mode(model, mode), torch.enable_grad(), capture(model.neck) as outs:
                    tensor_hw = self._tensor_hw(model, images)
                    if mode == "detection":
                        objectives["det"] = sum(model.loss(images, targets).values())
                    else:
                        model.core(model.preprocess(images))
                    inst = self._instances(images, targets, tensor_hw, counter, model)
                    if utility == "discriminant":
                        objectives["D"] = self._objective(model, neck_maps(outs[-1]), inst)
                main = objectives["D" if utility == "discriminant" else "det"]
                if main is None or not main.requires_grad:
                    counter["empty_batches"] += 1
                    continue
                captured = [(m, out) for m, outs_m in records.items() for out in outs_m]
                attention: dict[tuple[int, int], Tensor] = {}
                live = [(k, o) for k, o in objectives.items() if o is not None and o.requires_grad]
                for i, (key, objective) in enumerate(live):
                    grads = torch.autograd.grad(  # the graph is kept only for a second objective
                        objective, [o for _, o in captured], allow_unused=True, retain_graph=i + 1 < len(live)
                    )
                    for (module, out), grad in zip(captured, grads, strict=True):
                        if grad is None:
                            continue
                        value = self._layer_importance(out.detach(), grad, inst, attention)
                        scores[key][module] = scores[key].get(module, 0) + value.to(torch.float64).cpu()
                del captured
        finally:
            for h in handles:
                h.remove()
            records.clear()
        if utility == "detection":
            return scores["det"]
        if not head:
            return scores["D"]
        merged, self.head_notes = with_head(scores["D"], scores["det"])
        return merged

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

    def importance(self, model: Detector, ctx: PruneContext) -> ChannelScores:
        names = {m: n for n, m in model.named_modules()}
        return ChannelScores(model, {names[m]: s for m, s in self.trace(model, ctx).items()})

    def scoring_notes(self, model: Detector) -> dict[str, Any]:
        """The discriminants per scale and the tracing counters (the training counters are in
        ``stats``: the runner stores them after fine-tuning)."""
        return {
            "options": dict(self.options),
            "discriminants": self.summary,
            "head": dict(self.head_notes),
            "trace_counters": copy.deepcopy(self.counters["trace"]),
        }
