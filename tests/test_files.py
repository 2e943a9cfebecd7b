"""Safe writes (results/files.py): temporary names and whose they are, atomic files and folders,
checksum records, and the stale-file cleanup that reads those names (runners/locks.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from results.files import (
    checksum_path,
    checksum_problem,
    host,
    publish_directory,
    remove_directory,
    temporary,
    temporary_writer,
    write_atomically,
    write_with_checksum,
)
from runners.locks import remove_stale


def test_temporary_names_say_whose_they_are() -> None:
    me = (host(), os.getpid())
    assert temporary(Path("w/base.pt")).name.startswith(f".base.pt.{me[0]}-{me[1]}.")
    assert temporary(Path("r/tiny.csv"), keep_suffix=True).name.endswith(".tmp.csv")
    assert (
        temporary(Path("d/synthetic-s0"), tag="damaged").name == f".synthetic-s0.{me[0]}-{me[1]}.damaged.tmp"
    )
    for path in (temporary(Path("a.pt")), temporary(Path("t.md"), keep_suffix=True)):
        assert temporary_writer(path.name) == me
    # names written before safe writes had one home (a synthetic set's mkdtemp folder among them)
    assert temporary_writer(".synthetic-s0-n48-v8-i64.node-1-123.k2j_9abc.tmp") == ("node-1", 123)
    assert temporary_writer(".tiny.node-77.deadbeef.tmp.md") == ("node", 77)
    assert temporary_writer("base.pt") is None and temporary_writer(".x.tmp") is None


def test_checksum_record_is_sha256sum_format_and_tells_a_changed_file(tmp_path: Path) -> None:
    path = write_with_checksum(tmp_path / "sub" / "model.pt", b"weights")
    assert checksum_path(path).read_text() == f"{hashlib.sha256(b'weights').hexdigest()}  model.pt\n"
    assert checksum_problem(path) is None and sorted(p.name for p in path.parent.iterdir()) == [
        "model.pt",
        "model.pt.sha256",
    ]
    path.write_bytes(b"weight")
    assert "checksum mismatch" in checksum_problem(path)
    checksum_path(path).unlink()
    assert checksum_problem(path) is None and "no checksum" in checksum_problem(path, required=True)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "table.md"
    path.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomically(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_a_folder_is_published_whole_once_and_removed_in_one_step(tmp_path: Path) -> None:
    root = tmp_path / "set"
    assert publish_directory(root, lambda tmp: (tmp / "a.txt").write_text("a"))
    assert (root / "a.txt").read_text() == "a" and oct(root.stat().st_mode & 0o777) == "0o755"
    assert not publish_directory(root, lambda tmp: (tmp / "b.txt").write_text("b"))  # there already
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"] and not (root / "b.txt").exists()
    assert remove_directory(root) and not remove_directory(root) and not any(tmp_path.iterdir())


def test_remove_stale_deletes_only_a_dead_writer_s_temporaries_on_this_host(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no process has it
    gone = [
        tmp_path / f".base.pt.{host()}-{dead}.0a1b2c3d.tmp",
        tmp_path / f".s.{host()}-{dead}.k2j_9abc.tmp",
    ]
    kept = [
        tmp_path / f".base.pt.{host()}-{os.getpid()}.0a1b2c3d.tmp",  # a live writer's
        tmp_path / f".base.pt.{host()}x-{dead}.0a1b2c3d.tmp",  # another node's
        tmp_path / "base.pt",
    ]
    gone[1].mkdir()
    for path in [gone[0], *kept]:
        path.write_text("x")
    assert sorted(remove_stale(tmp_path)) == sorted(gone)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
