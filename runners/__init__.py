"""Suites -> cells -> rows: suite files, one cell's pipeline, the driver and its executors, the CLI.

``suite.py`` expands a suite into cells; ``cells.py`` computes one (baseline from ``baselines.py``
-> ``prune.py`` -> ``evaluate.py`` and ``measure.py`` -> a row); ``executors/`` runs a suite's cells
(the driver stores each outcome; ``local`` and ``ray`` decide where a cell runs); ``cli.py`` is
``detprune``. The training loop is the methods' (``methods/engine``).
"""

import warnings

# torchvision's import emits this once per process (worker processes included); it is noise here
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
