"""Executors are plug-ins: one registered here, in the test alone, runs a suite from the CLI with
the driver's resume and tally; the registry names them, and importing it does not import Ray."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from results import ResultStore
from runners import cli
from runners.executors import Driver, Executor, executor_names, get_executor, register_executor
from runners.suite import Cell, SuiteError
from tests.test_grid import TINY_SUITE

ORDER: list[str] = []  # the cells the test executor ran, in its order


@register_executor("test-reversed")
class Reversed(Executor):
    """Test only: the base cells, then the pruned cells last to first, all in this process."""

    summary = "test only"

    def execute(self, driver: Driver, cells: list[Cell]) -> Iterator[tuple[Cell, str]]:
        base = [c for c in cells if c.method == "base"]
        for cell in base + [c for c in reversed(cells) if c.method != "base"]:
            ORDER.append(cell.method)
            yield cell, driver.run_cell(cell)


def test_a_registered_executor_runs_a_suite_from_the_cli(tmp_path: Path, capsys) -> None:
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    argv = ["run", str(suite), "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"),
            "--no-progress", "--executor", "test-reversed"]  # fmt: skip
    ORDER.clear()
    assert cli.main(argv) == 0
    assert ORDER == ["base", "random", "l1"]
    assert "3 cells, 3 run, 0 already done" in capsys.readouterr().out
    assert len(ResultStore(tmp_path / "r" / "tiny").finished_ids()) == 3
    ORDER.clear()  # the driver found every cell done: the executor is given none
    assert cli.main(argv) == 0
    assert ORDER == [] and "3 cells, 0 run, 3 already done" in capsys.readouterr().out


def test_the_registry_names_the_executors() -> None:
    assert executor_names()[:2] == ["local", "ray"] and "test-reversed" in executor_names()
    assert get_executor("test-reversed") is Reversed
    with pytest.raises(SuiteError, match="unknown executor 'rey' \\(did you mean 'ray'\\?\\)"):
        get_executor("rey")
    with pytest.raises(ValueError, match="registered twice"):

        @register_executor("local")
        class Another(Executor):
            def execute(self, driver: Driver, cells: list[Cell]) -> Iterator[tuple[Cell, str]]:
                yield from ()


def test_the_registry_and_the_cli_do_not_import_ray() -> None:
    code = "import sys, runners.cli, runners.executors; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
