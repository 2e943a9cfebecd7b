"""Suites -> cells -> rows: the pipeline, the training loop, measurements and the CLI."""

import warnings

# torchvision's import emits this once per process (worker processes included); it is noise here
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
