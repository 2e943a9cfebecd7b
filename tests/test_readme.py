"""The README's code runs: every ```python block is executed as a new user would paste it.

Each block runs in a fresh namespace once the harness is imported; every method a block
registers then prunes a tiny detector one-shot to ``params:0.3`` and must meet the budget, and
every executor a block registers runs the tests' tiny suite (3 cells) to the end. What
the blocks registered (methods, executors) is removed afterwards, so the other tests see the
registries as they were. A block that cannot run here must say so on its first line with
``# not run by tests/test_readme.py: <why>``; no block is skipped silently.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import methods  # noqa: F401  (the harness, imported first as a user's checkout would)
from detectors import build_detector
from methods import PruneContext, Target, build_method
from methods.engine import prune
from methods.engine.sizes import count_params
from results import ResultStore
from runners.executors import Driver, executor_names, get_executor
from runners.suite import load_suite
from tests.test_detector_matrix import _samples
from tests.test_grid import TINY_SUITE

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "# not run by tests/test_readme.py:"
# (module, attribute) of every registry a README block may add to
REGISTRIES = (("methods.engine.base", "_REGISTRY"), ("runners.executors.registry", "_EXECUTORS"))


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks, in order."""
    return re.findall(r"^```python[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def _registries() -> list[dict[str, Any]]:
    found = []
    for module, attribute in REGISTRIES:
        try:
            found.append(getattr(importlib.import_module(module), attribute))
        except ImportError:
            continue
    return found


@pytest.fixture
def restored_registries() -> Iterator[None]:
    saved = [(registry, dict(registry)) for registry in _registries()]
    try:
        yield
    finally:
        for registry, before in saved:
            registry.clear()
            registry.update(before)


def test_the_readme_has_python_blocks() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2 and all(block.strip() for block in blocks)


BLOCKS = python_blocks(README.read_text())


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_and_its_plugins_work(
    index: int, restored_registries: None, tmp_path: Path
) -> None:
    block = BLOCKS[index]
    if block.lstrip().startswith(SKIP):
        pytest.skip(block.lstrip().splitlines()[0][len(SKIP) :].strip())
    registry = importlib.import_module("methods.engine.base")._REGISTRY
    known, known_executors = set(registry), set(executor_names())
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})
    for name in sorted(set(registry) - known):
        torch.manual_seed(0)
        model = build_detector("fcos", 3, "tiny", 64).eval()
        samples = _samples(8)
        ctx = PruneContext(
            calibration=[([s[0] for s in b], [s[1] for s in b]) for b in (samples[:4], samples[4:])],
            round_to=1,
            progress=False,
            train_set=samples,
            batch_size=4,
        )
        before = count_params(model)
        report = prune(build_method(name), model, ctx, Target.parse("params:0.3"))
        assert abs(report.achieved["params"] - 0.3) <= ctx.tolerance, name
        assert count_params(model) == report.params_after < before
    for name in sorted(set(executor_names()) - known_executors):
        suite = tmp_path / "tiny.toml"
        suite.write_text(TINY_SUITE)
        driver = Driver(load_suite(suite), tmp_path / "results", tmp_path / "work", progress=False)
        driver.run(get_executor(name)(jobs=2))
        assert len(ResultStore(tmp_path / "results" / "tiny").finished_ids()) == 3, name
