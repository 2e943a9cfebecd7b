"""Where a suite's cells run: one driver (``driver.py``) and executors registered by name.

``detprune run --executor NAME`` looks the name up here. Importing this package imports every
module beside this one, and so registers each executor in it (``local``, ``ray`` ...) without
importing Ray; another executor is one file here with ``@register_executor("name")`` (README,
"Adding an executor").
"""

import importlib
import pkgutil

from .driver import Driver, Executor, tally
from .local import LocalExecutor
from .registry import executor_names, get_executor, register_executor

for _module in pkgutil.iter_modules(__path__):  # after local (imported above), by name
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Driver",
    "Executor",
    "LocalExecutor",
    "executor_names",
    "get_executor",
    "register_executor",
    "tally",
]
