"""Atomic file writes: a crash or error at any point leaves the old file or the new one,
never a half-written file. One implementation for vectors, checkpoints, caches and exports.
New files get the permissions the umask gives (``0o666 & ~umask``), like any other file."""
from __future__ import annotations

import contextlib
import os
import uuid
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
    # O_EXCL with mode 0o666 lets the umask decide the final permissions, as for any file the
    # user creates (mkstemp would leave every saved file readable by its owner only)
    tmp = os.path.join(directory, f".m2iv-{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
