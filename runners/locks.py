"""Locks that let two runs share a work and a results directory.

One lock file per baseline (``<work>/locks/baseline-<key>.lock``) and per cell
(``<work>/locks/cell-<id>.lock``), held with the operating system's advisory locks through
``filelock``: the kernel drops them when their process dies, ``kill -9`` included, so a lock is
never left stale. A run that finds a cell held by another skips it and comes back to it at the
end (by then the other has stored it, or died and left it to this run); a baseline is waited for,
so it is trained once however many runs need it.

Temporary files and folders carry their writer's host and process id (the convention and its
parser live in ``results.files``): two runs never write the same temporary name, none is ever
read, and ``remove_stale`` deletes those whose writer is gone, on this host only (another node
sharing the folder may be writing its own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from results.files import host, temporary_writer


def lock_path(work_dir: Path, kind: str, key: str) -> Path:
    folder = Path(work_dir) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{key}.lock"


@contextlib.contextmanager
def held(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the lock at ``path`` for the block; yields False (without holding it) when ``wait`` is
    False and another process holds it."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Delete the temporary files under ``folder`` whose writing process is no longer running
    (a killed run's half-written checkpoints); never one that a live process is writing."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    here = host()
    for path in sorted(Path(folder).rglob(".*.tmp*")):
        writer = temporary_writer(path.name)
        if writer is not None and writer[0] == here and path.exists() and not _alive(writer[1]):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
