"""Safe writes: files and folders written whole or not at all, and checksums kept beside them.

A run killed while writing a table, a plot, a checkpoint or a synthetic set leaves the previous
file intact (or none), never half of a new one: everything is written under a temporary name
beside its destination and renamed into place in one step. The one temporary-name convention
lives here, ``.<name>.<host>-<pid>.<rand>.tmp`` (a table's or plot's
``.<stem>.<host>-<pid>.<rand>.tmp<suffix>``, so the writer still sees its format), together with
the parser that tells whose a leftover is: two runs never write the same temporary name, and
``runners.locks.remove_stale`` deletes only those whose writer is gone, on this host (another
node sharing the folder may be writing its own).

A checksum record ``<file>.sha256`` (``"<hex>  <name>\\n"``, as ``sha256sum`` writes it) lets a
reader tell a truncated or overwritten file from the one that was written.

Standard library only: ``results`` is the lowest package, and the checkpoint writer
(``detectors``), the synthetic data (``datasets``) and the runners all build on this module.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

# what ``temporary`` writes: ``.<name>.<host>-<pid>.<rand or tag>.tmp`` and an optional suffix
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.\w+\.tmp(\.\w+)?$")


def host() -> str:
    """This machine's short name, as temporary names carry it."""
    return socket.gethostname().split(".")[0]


def temporary(path: Path, keep_suffix: bool = False, tag: str | None = None) -> Path:
    """A temporary name beside ``path``, unique to this process (its host and id, then ``tag``
    or a random token), so that two writers never share one and a killed writer's leftover is
    recognised by ``temporary_writer``. ``keep_suffix``: end in ``path``'s suffix (``.tmp.csv``),
    for writers that choose the format by it."""
    path = Path(path)
    writer = f"{host()}-{os.getpid()}.{tag or secrets.token_hex(4)}"
    if keep_suffix:
        return path.with_name(f".{path.stem}.{writer}.tmp{path.suffix}")
    return path.with_name(f".{path.name}.{writer}.tmp")


def temporary_writer(name: str) -> tuple[str, int] | None:
    """The ``(host, pid)`` that wrote the temporary file or folder called ``name``; None when
    ``name`` is not a temporary name."""
    found = _TEMPORARY.match(name)
    return (found["host"], int(found["pid"])) if found else None


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it onto ``path`` in
    one step."""
    path = Path(path)
    tmp = temporary(path, keep_suffix=True)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def publish_directory(path: Path, fill: Callable[[Path], object]) -> bool:
    """Fill a new folder under a temporary name beside ``path``, then rename it onto ``path`` in
    one step: a killed writer never leaves a half-filled folder under the real name. False (and
    nothing published) when ``path`` is already there and not empty: a rival finished first, or
    something else is there; the caller tells which."""
    path = Path(path)
    tmp = temporary(path)
    tmp.mkdir()
    try:
        os.chmod(tmp, 0o755)  # readable by all, like any folder of a shared cache, whatever the umask
        fill(tmp)
        try:
            os.replace(tmp, path)  # atomic; fails when path exists and is not empty
        except OSError:
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def remove_directory(path: Path) -> bool:
    """Remove the folder ``path``, first renamed aside in one step so that no reader ever sees it
    half deleted; False when it was gone already (another process removed it first)."""
    path = Path(path)
    aside = temporary(path, tag="damaged")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


# -- checksums -------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, in hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tree_sha256(root: Path, skip: str = "") -> dict[str, str]:
    """Every file under ``root`` (but those named ``skip``) by its ``/``-separated relative path,
    with its SHA-256, in path order: a folder's manifest."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != skip)
    return {path.relative_to(root).as_posix(): sha256(path) for path in files}


def checksum_path(path: Path) -> Path:
    """Where ``path``'s checksum record lives: ``<file>.sha256`` beside it."""
    return Path(path).with_name(Path(path).name + ".sha256")


def write_with_checksum(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically with its checksum record beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, record = temporary(path), temporary(checksum_path(path))
    try:
        tmp.write_bytes(data)
        record.write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
        tmp.replace(path)  # a kill between the two renames leaves a file its record does not match:
        record.replace(checksum_path(path))  # a cache then rebuilds it, a user is told
    finally:
        tmp.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    return path


def checksum_problem(path: Path, required: bool = False) -> str | None:
    """What is wrong with ``path`` against its checksum record, or None when it matches (or has
    no record and ``required`` is False). The caller raises its own error with it."""
    record = checksum_path(path)
    if not record.is_file():
        return "no checksum recorded beside it (an older or interrupted write)" if required else None
    text = record.read_text()
    expected = text.split()[0] if text.strip() else ""
    if sha256(path) != expected:
        return "checksum mismatch, the file changed after it was written (truncated or overwritten)"
    return None
