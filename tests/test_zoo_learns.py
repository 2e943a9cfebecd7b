"""Every detector's tiny size learns the synthetic set: AP50 >= 0.5 after the zoo suite's training.

Slow (one CPU training per detector, about half an hour on 2 cores): `pytest -m slow`.
The committed figures are in results/zoo/.
"""

from __future__ import annotations

import pytest

from detectors import detector_names
from results import ResultStore
from runners.cells import Runner
from runners.suite import load_suite


@pytest.mark.slow
def test_every_tiny_detector_reaches_ap50_half(tmp_path) -> None:
    suite = load_suite("zoo")
    assert {p.experiment.detector for p in suite.experiments} == set(detector_names())
    Runner(suite, tmp_path / "results", tmp_path / "work", progress=False).run()
    frame = ResultStore(tmp_path / "results" / "zoo" / "results.sqlite").frame("zoo")
    ap50 = dict(zip(frame["detector"], frame["ap50"], strict=True))
    assert len(ap50) == len(suite.experiments)
    assert all(value >= 0.5 for value in ap50.values()), ap50
