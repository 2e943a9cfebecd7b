"""Suites -> cells -> rows: the pipeline, the training loop, measurements and the CLI."""
