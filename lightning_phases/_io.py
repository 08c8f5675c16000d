"""Atomic file writing: a reader sees the old file or the new one, never a truncated one.

Every output file of the package (``gmm_flagged.csv``, ``phase_recommended.ckpt``, ...) is written
to a temporary file in the target's directory and moved over the target with :func:`os.replace`
(atomic on POSIX and Windows within one file system). If anything fails, the temporary file is
removed, the old file (if any) is left as it was, and the error is raised to the caller, which
decides whether to warn (the callbacks do: a failed write never ends a training run).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "write_text_atomic"]


def _mode_for(target: str) -> int:
    """The existing file's permission bits, else those of a new file under the current umask."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary path next to ``path``; moved onto ``path`` when the block ends without error.

    For writers that want a path rather than a file object (``torch.save``, ``trainer.save_checkpoint``).
    The parent directory is created if needed.

    Example:
        >>> with atomic_path("out/model.ckpt") as tmp:  # doctest: +SKIP
        ...     torch.save(state, tmp)
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, _mode_for(target))  # mkstemp creates 0600; the result gets the mode open() would give
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that replaces ``path`` only once everything is written (and flushed to disk).

    Args:
        path: The target file.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        **open_kwargs: Passed to :func:`open` (``newline=""``, ``encoding=...``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb'; got {mode!r}.")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w", encoding=encoding, newline="") as fh:
        fh.write(text)
