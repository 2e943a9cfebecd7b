"""Files written whole or not at all: a run killed while writing its tables or plots leaves the
previous file intact (or none), never half of a new one, so a rerun's report is never mixed."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path`` (unique to this process, so two
    runs never share it), then rename it onto ``path`` in one step."""
    path = Path(path)
    writer = f"{socket.gethostname().split('.')[0]}-{os.getpid()}"  # host and process, see runners/locks
    tmp = path.with_name(f".{path.stem}.{writer}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
