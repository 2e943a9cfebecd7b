"""Matched budgets (DESIGN.md §6): which channels a round removes so the target is met.

A round's scores become one ordered list of removal steps. A step removes ``round_to`` channels
(the lowest-scored remaining ones) from one dependency group (the first step of a group brings it
to a multiple of ``round_to``). Local scope orders the steps by the share of the group they leave
removed, so every layer loses the same share up to one step; global scope orders them by score.
No group goes below ``1 - max_layer_ratio`` of its *original* width, however many rounds it has
been through. The achieved reduction only grows along the list, so a search over its length
finds the prefix closest to a goal; each probe removes the channels on a copy and measures it.
Steps are small enough that the closest prefix is within ``tolerance`` (0.5 points) on any
realistic network; when coarse steps miss it, the fill step adds later steps that still fit.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

from detectors.base import Detector

from .groups import GroupScores, apply_removal
from .sizes import measure_size
from .types import MethodError, Target

Step = tuple[int, int]  # (group index, channels removed from it after this step)


def removal_steps(
    groups: list[GroupScores],
    scope: str,
    round_to: int = 8,
    max_layer_ratio: float = 0.9,
    original: dict[str, int] | None = None,
) -> list[Step]:
    """The ordered steps; ``original`` widths (by root) cap the groups (default: today's widths)."""
    if scope not in ("local", "global"):
        raise MethodError(f"scope must be 'local' or 'global', not '{scope}'")
    keyed = []
    for gi, g in enumerate(groups):
        size = len(g.order)
        orig = (original or {}).get(g.root, size)
        min_keep = max(1, math.ceil(orig * (1 - max_layer_ratio)))
        step = math.lcm(round_to, g.unit)  # a GroupNorm's groups go whole
        keep = size
        while True:
            keep = (keep - 1) // step * step  # next multiple of the step below
            if keep < min_keep:
                break
            removed = size - keep
            key = removed / size if scope == "local" else float(g.sorted_scores[removed - 1])
            keyed.append((key, gi, removed))
    keyed.sort()
    return [(gi, removed) for _, gi, removed in keyed]


def prefix_counts(groups: list[GroupScores], steps: list[Step], prefix: int) -> dict[str, int]:
    """Channels removed per group root after the first ``prefix`` steps."""
    counts: dict[str, int] = {}
    for gi, removed in steps[:prefix]:
        root = groups[gi].root
        counts[root] = max(counts.get(root, 0), removed)
    return counts


class SizeProbe:
    """The reduction (against ``size0``) that removing ``counts`` channels would reach, measured
    on a copy of ``model``; cached by the counts (which channels go does not change the size)."""

    def __init__(self, model: Detector, kind: str, size0: float) -> None:
        self.model, self.kind, self.size0 = model, kind, size0
        self.cache: dict[tuple, float] = {}

    def __call__(self, groups: list[GroupScores], counts: dict[str, int]) -> float:
        key = tuple(sorted((r, n) for r, n in counts.items() if n > 0))
        if key not in self.cache:
            probe = copy.deepcopy(self.model)
            apply_removal(probe, groups, counts)
            self.cache[key] = 1.0 - measure_size(probe, self.kind) / self.size0
        return self.cache[key]


def search(reduction: Callable[[int], float], lo: int, hi: int, target: float, good: float) -> int:
    """The prefix whose reduction is closest to ``target``, for a non-decreasing ``reduction``.

    Interpolation between the bracket's ends (the reduction is nearly linear in the prefix
    length), falling back to bisection when a step shrinks the bracket by less than half;
    stops early at a prefix within ``good`` of the target. Keeps reduction(lo) < target <= reduction(hi).
    """
    if reduction(hi) < target:
        return hi
    interpolate = True
    while hi - lo > 1:
        f_lo, f_hi = reduction(lo), reduction(hi)
        if interpolate and f_hi > f_lo:
            guess = lo + round((target - f_lo) / (f_hi - f_lo) * (hi - lo))
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        value = reduction(guess)
        if abs(value - target) <= good:
            return guess
        width = hi - lo
        lo, hi = (lo, guess) if value >= target else (guess, hi)
        interpolate = (hi - lo) <= width / 2
    return min((lo, hi), key=lambda p: abs(reduction(p) - target))


def plan_round(
    groups: list[GroupScores],
    steps: list[Step],
    probe: SizeProbe,
    target: Target,
    tolerance: float,
    goal: float,
    limit: int | None = None,
    final: bool = True,
) -> tuple[dict[str, int], float]:
    """The channels one round removes and the reduction they reach.

    The prefix of at most ``limit`` steps closest to ``goal``; never past ``target`` by more than
    ``tolerance``. In the ``final`` round (or when the round reaches the target) a miss of more
    than the tolerance goes on from the prefix below the target with the fill step, then fails.
    """

    def reduction(prefix: int) -> float:
        return probe(groups, prefix_counts(groups, steps, prefix))

    limit = len(steps) if limit is None else min(limit, len(steps))
    if final and reduction(len(steps)) < target.rate - tolerance:
        raise MethodError(
            f"{target} is out of reach: removing every channel this method scores saves "
            f"{reduction(len(steps)):.1%}"
        )
    best = search(reduction, 0, limit, goal, tolerance / 2)
    if reduction(best) > target.rate + tolerance or (
        final and abs(reduction(best) - target.rate) > tolerance
    ):
        below = search(reduction, 0, limit, target.rate, tolerance / 2)
        while below > 0 and reduction(below) > target.rate:
            below -= 1
        counts, value = fill(groups, steps, below, probe, target, tolerance)
        if final and abs(value - target.rate) > tolerance:
            raise MethodError(f"{target}: the closest achievable reduction is {value:.2%}; lower round_to")
        return counts, value
    return prefix_counts(groups, steps, best), reduction(best)


def fill(
    groups: list[GroupScores],
    steps: list[Step],
    start: int,
    probe: SizeProbe,
    target: Target,
    tolerance: float,
    max_probes: int = 40,
) -> tuple[dict[str, int], float]:
    """From the prefix ``start`` (below the target), add the later steps that still fit, in
    order, until within ``tolerance``; a group whose next step overshoots adds nothing more."""
    counts = prefix_counts(groups, steps, start)
    value, blocked, probes = probe(groups, counts), set(), 0
    for gi, removed in steps[start:]:
        root = groups[gi].root
        if abs(value - target.rate) <= tolerance or probes >= max_probes:
            break
        if root in blocked or removed <= counts.get(root, 0):
            continue
        trial = {**counts, root: removed}
        reached, probes = probe(groups, trial), probes + 1
        if reached > target.rate + tolerance:
            blocked.add(root)
            continue
        counts, value = trial, reached
    return counts, value


def largest_removal(groups: list[GroupScores], round_to: int, max_layer_ratio: float) -> dict[str, int]:
    """Every group at its smallest allowed width: the most any method may remove."""
    steps = removal_steps(groups, "local", round_to, max_layer_ratio)
    return prefix_counts(groups, steps, len(steps))
