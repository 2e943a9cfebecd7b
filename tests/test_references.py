"""Every committed reference is what its store says: its tables regenerate byte for byte from it,
every row is a cell of its suite as configured now, and every row carries the provenance columns."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from results import ResultStore
from runners.cli import main
from runners.provenance import PROVENANCE_COLUMNS
from runners.suite import load_suite, parse_override

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference"
ENTRIES = tomllib.loads((REFERENCE / "references.toml").read_text())["reference"]
TABLES = ("*.md", "*.csv", "*.tex")


def _tables(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for pattern in TABLES for p in sorted(folder.glob(pattern))}


def test_every_reference_folder_is_listed() -> None:
    """And nothing else under results/reference/ is a store (a test that opened a store by a
    path that did not exist would have created one: ResultStore makes its folder)."""
    listed = {(REFERENCE / e["results_dir"] / e["suite"]).resolve() for e in ENTRIES}
    found = {p.parent.resolve() for p in REFERENCE.rglob("results.sqlite")}
    assert found == listed


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e['results_dir']}/{e['suite']}")
def test_a_reference_regenerates_from_its_store(entry: dict, tmp_path: Path) -> None:
    folder = REFERENCE / entry["results_dir"] / entry["suite"]
    assert (folder / "results.sqlite").is_file(), folder
    sets = entry.get("set", [])
    suite = load_suite(entry["suite"], dict(parse_override(s) for s in sets))
    shutil.copytree(folder, tmp_path / suite.name)  # opening a store may migrate it: never the committed one
    frame = ResultStore(tmp_path / suite.name / "results.sqlite").frame()
    # the committed store holds only cells of the suite as configured now, under today's ids
    assert set(frame["cell_id"]) <= {c.cell_id for c in suite.cells()}
    for column in PROVENANCE_COLUMNS:
        assert column in frame, column
    assert frame["python"].notna().all() and frame["torch"].notna().all() and frame["cpu"].notna().all()

    args = ["report", entry["suite"], "--results-dir", str(tmp_path)]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    committed, regenerated = _tables(folder), _tables(tmp_path / suite.name)
    assert committed.keys() == regenerated.keys()
    for name, text in committed.items():
        assert regenerated[name] == text, f"{folder / name} is not what its store reports"
