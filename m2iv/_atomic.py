"""Atomic file writes: a crash or error at any point leaves the old file or the new one,
never a half-written file. One implementation for vectors, checkpoints, caches and exports."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_path", "atomic_write", "fsync_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and unlinks in directory ``path`` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write; on success it is fsynced and renamed
    over ``path`` (and the directory fsynced); on any exception it is removed.

    ``durable=False`` skips the fsyncs: still never a half-written file under ``path`` while
    the system runs, but a power loss may lose it (for caches that can recompute an entry)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".m2iv-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def atomic_write(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (``durable``: see :func:`atomic_path`)."""
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as f:
        f.write(data)
