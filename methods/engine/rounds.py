"""The one pruning engine: rounds of (train) -> score -> plan -> remove, for every method.

Its callers (the runners, the tests) call ``prune(method, model, ctx, target)`` directly
(``from methods.engine import prune``): a method only scores, it does not prune itself.

A one-shot method is one round. PX declares ``rounds`` (rescored rounds, each an equal share of
what is left of the budget), GroupFisher ``channels_per_round`` with ``train_iterations`` of the
shared training loop before each scoring, its hooks collecting the Fisher sums there. Round 0
of a method that does not train first scores the unpruned model, so its scores go to
``ctx.score_cache`` and are shared by the targets of one baseline. Before anything trains or
scores, the largest allowed removal is probed once: an unreachable target fails at once.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch
import torch_pruning as tp

from detectors.base import Detector

from .base import Method
from .budget import SizeProbe, largest_removal, plan_round, removal_steps
from .groups import GroupScores, apply_removal, score_groups
from .sizes import Snapshot, build_report
from .training import Trainer
from .types import MethodError, PruneContext, PruneReport, Target


class _Structure(tp.importance.Importance):
    """Zero scores: the groups as they are, before any method has looked at them."""

    def __call__(self, group: tp.Group, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(len(group[0].idxs))


def _trainer(method: Method, model: Detector, ctx: PruneContext) -> Trainer:
    data = ctx.train_set
    if data is None or len(data) == 0:
        if not ctx.calibration:
            raise MethodError(f"{method.name} trains while it prunes: the context has no train_set")
        data = [s for images, targets in ctx.calibration for s in zip(images, targets, strict=True)]
    schedule = ctx.schedule
    if ctx.batch_size:
        schedule = dataclasses.replace(schedule, batch_size=ctx.batch_size)
    return Trainer(
        model,
        data,
        schedule,
        seed=ctx.seed,
        extra_loss=method.loss_hook(ctx) if method.finetune_loss else None,
        desc=f"{method.name} training",
        progress=ctx.progress,
    )


def _score(method: Method, model: Detector, ctx: PruneContext, shareable: bool) -> tuple:
    """``(groups, seconds, cached, notes)`` of one scoring, from ``ctx.score_cache`` if shareable."""
    key = json.dumps(
        [method.name, method.options, len(ctx.calibration), ctx.seed], sort_keys=True, default=str
    )
    cache = ctx.score_cache if (shareable and ctx.score_cache is not None) else {}
    if key in cache:
        return (*cache[key][:2], True, cache[key][2])
    start = time.perf_counter()
    method.prepare(model, ctx)
    groups = score_groups(model, method.importance(model, ctx))
    entry = (groups, time.perf_counter() - start, method.scoring_notes(model))
    cache[key] = entry
    return entry[0], entry[1], False, entry[2]


def _limit(groups: list[GroupScores], steps: list[tuple[int, int]], channels: int) -> int:
    """The shortest prefix of ``steps`` that removes at least ``channels`` channels."""
    removed: dict[int, int] = {}
    total = 0
    for i, (gi, after) in enumerate(steps):
        total += after - removed.get(gi, 0)
        removed[gi] = after
        if total >= channels:
            return i + 1
    return len(steps)


def prune(method: Method, model: Detector, ctx: PruneContext, target: Target) -> PruneReport:
    """Prune ``model`` in place until ``target`` is met within ``ctx.tolerance``."""
    start = time.perf_counter()
    kind, tol = target.kind, ctx.tolerance
    model.eval()
    before = Snapshot.of(model)
    size0 = before.size(kind)
    structure = score_groups(model, _Structure())
    original = {g.root: len(g.order) for g in structure}
    probe = SizeProbe(model, kind, size0)
    most = probe(structure, largest_removal(structure, ctx.round_to, ctx.max_layer_ratio))
    if most < target.rate - tol:
        raise MethodError(
            f"{target} is out of reach: removing all allowed channels (max_layer_ratio="
            f"{ctx.max_layer_ratio}) saves {most:.1%}"
        )
    trainer = _trainer(method, model, ctx) if method.train_iterations > 0 else None
    achieved, history, scoring, cached_any, probes = 0.0, [], 0.0, False, 0
    notes: dict[str, Any] = {}
    unscored: set[str] = set()
    r = 0
    while True:
        by_channels = method.channels_per_round is not None
        if by_channels and achieved >= target.rate - tol:
            break
        if not by_channels and (r >= method.rounds or (r > 0 and abs(achieved - target.rate) <= tol)):
            break
        if trainer is not None:
            trainer.steps(method.train_iterations, method.training_hooks(model, ctx))
        groups, seconds, cached, round_notes = _score(
            method, model, ctx, shareable=r == 0 and trainer is None and method.shares_scores
        )
        scoring, cached_any, notes = scoring + seconds, cached_any or cached, notes or round_notes
        unscored |= set(original) - {g.root for g in groups}
        steps = removal_steps(groups, method.scope, ctx.round_to, ctx.max_layer_ratio, original)
        if r > 0:
            probe = SizeProbe(model, kind, size0)
        if by_channels:
            goal, limit, final = target.rate, _limit(groups, steps, int(method.channels_per_round)), False
        else:
            final = r == method.rounds - 1
            goal, limit = achieved + (target.rate - achieved) / (method.rounds - r), None
        counts, reached = plan_round(groups, steps, probe, target, tol, goal, limit, final)
        probes += len(probe.cache)
        if by_channels and not any(counts.values()) and reached < target.rate - tol:
            raise MethodError(f"{target}: stuck at {achieved:.2%}: no allowed removal fits; lower round_to")
        method.after_removal(model, ctx, apply_removal(model, groups, counts))
        achieved = reached
        history.append(round(achieved, 6))
        r += 1
    model.eval()
    report = build_report(
        model, before, target, {g.root: {"members": g.members, "consumers": g.consumers} for g in structure}
    )
    report.method, report.probes = method.name, probes
    # a cached score still cost its scoring time: counted, so every row's time is comparable
    report.seconds = time.perf_counter() - start + (scoring if cached_any else 0.0)
    report.notes = {
        "rounds": r,
        "achieved_per_round": history,
        "scoring_seconds": scoring,
        "scores_cached": cached_any,
        "unscored_groups": sorted(unscored),
        "training_iterations": trainer.iterations if trainer is not None else 0,
        **({method.name: notes} if notes else {}),
    }
    return report
