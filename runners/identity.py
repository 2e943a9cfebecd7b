"""A cell's identity is what ran: its configuration with every default filled in (DESIGN.md §8).

A suite file says only what it changes; the method, the detector, the dataset, the schedules and
the pruning knobs fill in the rest from their defaults. Hashing the written options alone let a
changed default keep every old row as "finished" (LDT's ``head`` default: 28 rows deleted by
hand). So the id hashes the *resolved* configuration:

* the method's options merged over its defaults, with the schedule it declares (scope, rounds,
  channels per round, training iterations, regime);
* the detector's name, size, input size and options, and a fingerprint of the network they
  build: every module's class and public plain settings (widths, kernels, strides, norms' eps,
  thresholds stored on the model), so a changed detector default changes exactly that
  detector's cells;
* the dataset's options over its defaults (and the synthetic generator's version);
* the training, fine-tuning, pruning, evaluation and measurement settings, defaults included
  (``Schedule`` and the suite tables already resolve them).

Code that changes without changing any setting is not in the id: such rows are *stale*, which the
provenance columns find (``runners/provenance.py``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import torch
from torch import nn

from datasets import resolved_options
from detectors import build_detector
from methods import build_method

ID_SCHEME = 2  # 1: the written options (before resolution); 2: the resolved configuration
_SKIP = object()
_FINGERPRINT_CLASSES = 80  # any count builds the same network but its predictors' widths


def digest(payload: Any) -> str:
    """16 hex digits of SHA-256 over ``payload`` as sorted JSON."""
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """``value`` if it is a plain setting (numbers, text, lists and string-keyed tables of them),
    else ``_SKIP`` (tensors, callables, modules: weights and wiring are not settings)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _SKIP}
    return _SKIP


def network_settings(model: nn.Module) -> dict[str, Any]:
    """Every module's class and public plain attributes, by module name (what its constructor
    resolved: widths, kernels, strides, norms' eps and momentum, thresholds). Not ``repr`` and
    not private attributes, which differ between torch versions for the same network (measured:
    torch 2.11 and 2.14 gave the same detector different ``repr``-based digests)."""
    found = {}
    for name, module in model.named_modules():
        public = {k: _plain(v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
        neutral = NEUTRAL_SETTINGS.get(type(module).__qualname__, {})
        settings = {
            k: v for k, v in public.items() if v is not _SKIP and (k not in neutral or v != neutral[k])
        }
        found[name] = {"class": type(module).__qualname__, **settings}
    return found


# keys added to a settings table after ID_SCHEME 2 began, at the value that reproduces what every
# earlier row did: left out of a cell's identity there, so adding them moved no stored row's id
NEUTRAL = {"measure": {"runtimes": ["torch"], "halfwidth": 0.0, "max_seconds": 120.0, "batch_sizes": [1]}}
# the same for a module's settings (``network_settings``), by class: YOLOv8's pipeline came later
NEUTRAL_SETTINGS = {"YOLOv8": {"pipeline": "detprune"}}


def without_neutral(table: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` of a ``[table]`` less the keys at their neutral value (``NEUTRAL``)."""
    neutral = NEUTRAL.get(table, {})
    return {k: v for k, v in values.items() if k not in neutral or v != neutral[k]}


@functools.cache
def detector_fingerprint(name: str, size: str, input_size: int, options_json: str) -> str:
    """A digest of the network ``build_detector`` makes: its module tree and its settings.
    Built once per process per configuration, on a forked RNG (ids never move the seed)."""
    with torch.random.fork_rng(devices=[]):
        model = build_detector(name, _FINGERPRINT_CLASSES, size, input_size, **json.loads(options_json))
    return digest(network_settings(model))


def resolved_detector(name: str, size: str, input_size: int, options: dict[str, Any]) -> dict[str, Any]:
    options_json = json.dumps(options, sort_keys=True)
    return {
        "name": name,
        "size": size,
        "input_size": input_size,
        "options": dict(options),
        "network": detector_fingerprint(name, size, input_size, options_json),
    }


def resolved_dataset(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "options": resolved_options(name, options)}


# method options added after ID scheme 2 began, at the value every earlier row ran with (left out),
# and DCODP's coupling switch, which was its ``parent_only`` option then (spelled that way): so the
# coupling switch moved no stored row's id
NEUTRAL_OPTIONS = {"hrank": {"coupling": "root"}, "chip": {"coupling": "root"}}


def _id_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    base = name.partition(":")[0]
    if base == "dcodp":
        options = {k: v for k, v in options.items() if k != "coupling"} | {
            "parent_only": options["coupling"] == "root"
        }
    neutral = NEUTRAL_OPTIONS.get(base, {})
    return {k: v for k, v in options.items() if k not in neutral or v != neutral[k]}


def resolved_method(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options over its defaults (as ids spell them: ``_id_options``) and the
    schedule it declares."""
    method = build_method(name, **options)
    return {
        "name": name,
        "options": _id_options(name, dict(method.options)),
        "scope": method.scope,
        "rounds": method.rounds,
        "channels_per_round": method.channels_per_round,
        "train_iterations": method.train_iterations,
        "regime": method.regime,
    }
