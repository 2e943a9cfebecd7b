"""The machinery every criterion shares: one place, so a criterion file holds only its criterion.

* ``base``: the ``Method`` interface (``importance`` abstract) and the registry;
* ``types``: targets, the context, the report, the one error;
* ``rounds``: the engine itself, ``prune(method, model, ctx, target)``: rounds of
  (train) -> score -> plan -> remove, the same for every method;
* ``groups``: dependency groups, ``ChannelScores`` (the one reduction of per-layer channel
  scores to a group's scores) and channel removal;
* ``budget``: the search for how many channels each group loses to meet a target;
* ``sizes``: parameters, GMACs, per-channel costs and the report's layer widths;
* ``activations``: the shared feature-map capture of HRank, CHIP and DCODP;
* ``training``: the one training loop (baselines, fine-tuning, training between rounds) and
  ``TrainingHook``, the points where a method or a runner hooks into it.

Callers prune with ``from methods.engine import prune; prune(method, model, ctx, target)``.
"""

from .rounds import prune

__all__ = ["prune"]
