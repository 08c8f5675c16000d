"""Atomic file writing: the old file survives every failure, no temporary file is left behind."""

from __future__ import annotations

import os
import stat

import pytest

from lightning_phases import _io
from lightning_phases._io import atomic_path, atomic_write, write_text_atomic


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_writes_the_new_content(tmp_path):
    path = tmp_path / "sub" / "out.csv"
    write_text_atomic(path, "a,b\n1,2\n")
    assert path.read_text() == "a,b\n1,2\n" and not _leftovers(path.parent)
    with atomic_write(path, "wb") as fh:
        fh.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_a_writer_failing_midway_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "out.csv"
    old = "".join(f"{i},{i * i}\n" for i in range(603))
    path.write_text(old)
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(path) as fh:
        for i in range(361):
            fh.write(f"{i}\n")
        raise RuntimeError("disk full")
    assert path.read_text() == old and not _leftovers(tmp_path)


def test_a_failed_replace_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(_io.os, "replace", refuse)
    with pytest.raises(OSError, match="Read-only"), atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"old" and not _leftovers(tmp_path)


def test_a_directory_below_a_regular_file_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        write_text_atomic(blocker / "logs" / "out.csv", "new")
    assert blocker.read_text() == "x"


def test_permissions_are_those_of_a_normal_write(tmp_path):
    fresh, reference = tmp_path / "fresh.txt", tmp_path / "reference.txt"
    write_text_atomic(fresh, "x")
    reference.write_text("x")
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    os.chmod(fresh, 0o640)
    write_text_atomic(fresh, "y")  # an existing file keeps its mode
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_text() == "y"


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode"), atomic_write("x", "a"):
        pass
