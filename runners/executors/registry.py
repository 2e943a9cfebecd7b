"""The registry that names the executors for ``detprune run --executor``: one decorator, one lookup.

An executor (``driver.Executor``) decides only *where* a suite's cells run: in this process, in a
pool of processes, as tasks on a cluster. Everything else about a run (inputs checked, stale files
removed, pending cells found, outcomes stored, the tally) is the driver's, so every executor
resumes, refuses duplicates and records failures alike. Adding one is a class in one file::

    @register_executor("threads")
    class Threads(Executor):
        def execute(self, driver, cells):
            ...  # yield (cell, driver.run_cell(cell)) as each one finishes

The registry imports no executor's dependencies: an executor that needs an optional package
(Ray) imports it when it is built, never when it is registered.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable

from ..suite import SuiteError
from .driver import Executor

_EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(name: str) -> Callable[[type[Executor]], type[Executor]]:
    """Register an executor class under ``name`` (``--executor NAME``)."""
    return functools.partial(_add, name)


def _add(name: str, cls: type[Executor]) -> type[Executor]:
    old = _EXECUTORS.setdefault(name, cls)
    if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"executor '{name}' registered twice: {old.__qualname__} and {cls.__qualname__}")
    _EXECUTORS[name] = cls  # the same definition run again (a re-executed file) replaces itself
    cls.name = name
    return cls


def executor_names() -> list[str]:
    """The registered executors, in the order they were registered (``local`` first)."""
    return list(_EXECUTORS)


def get_executor(name: str) -> type[Executor]:
    """The executor class registered as ``name``, or one line naming the nearest one."""
    if name not in _EXECUTORS:
        near = difflib.get_close_matches(name, executor_names(), n=1, cutoff=0.5)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise SuiteError(f"unknown executor '{name}'{hint}; known: {', '.join(executor_names())}")
    return _EXECUTORS[name]
