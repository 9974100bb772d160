"""The library's files: generated names, path safety, staging of adds (a held flock marks a
live one), hashing, sniffing foreign files and quarantine. Nothing is ever unpickled."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import time
import uuid

from .._atomic import fsync_dir
from ..errors import VectorsFormatError
from ..vectors import M2IV
from .errors import LibraryError, LibraryIndexError, UnsafePathError
from .index import rebuild_hint

try:  # POSIX advisory locks mark staging directories that belong to a live process
    import fcntl
except ImportError:  # pragma: no cover - Windows: staging leftovers are judged by age only
    fcntl = None

__all__ = ["VECTORS_DIR", "TMP_DIR", "QUARANTINE_DIR", "prepare_root", "hash_file", "sniff",
           "safe_path", "stage", "unstage", "stage_state", "quarantine"]

VECTORS_DIR = "vectors"
TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"
FILE_RE = re.compile(r"^vectors/([0-9a-f]{32})\.safetensors$")
STORED_RE = re.compile(r"^[0-9a-f]{32}\.safetensors$")
STAGE_RE = re.compile(r"^[0-9a-f]{32}$")
#: a staging directory younger than this is never judged stale (covers mkdir -> flock)
STAGE_GRACE_S = 5.0
#: without fcntl, a staging directory older than this is judged stale
STAGE_STALE_NO_LOCK_S = 3600.0


def prepare_root(root: str, index_name: str, create: bool) -> None:
    """Check that ``root`` is a library (has ``index_name``) or, with ``create``, a place for a
    new one (missing or empty: a foreign directory is never taken over); make its folders."""
    if not os.path.exists(os.path.join(root, index_name)):
        vectors_dir = os.path.join(root, VECTORS_DIR)
        stored = [f for f in os.listdir(vectors_dir) if STORED_RE.match(f)] \
            if os.path.isdir(vectors_dir) else []
        if stored:  # a lost index: a fresh empty one would make every file an "orphan"
            raise LibraryIndexError(f"{root} holds {len(stored)} stored vector file(s) but no "
                                    f"index ({index_name}); {rebuild_hint(root)}")
        if not create:
            raise LibraryError(f"no VLibrary at {root} (no {index_name}): check the path; "
                               "adding vectors makes one (m2iv library add, or VLibrary(path) "
                               "with create=True)")
        if os.path.isdir(root):
            ours = {VECTORS_DIR, TMP_DIR, QUARANTINE_DIR, index_name, index_name + "-wal",
                    index_name + "-shm", index_name + "-journal"}
            foreign = sorted(set(os.listdir(root)) - ours)
            if foreign:
                raise LibraryError(f"{root} is not empty and is not a VLibrary (no {index_name};"
                                   f" it holds {foreign[:5]}): refusing to use it")
        elif os.path.exists(root):
            raise LibraryError(f"{root} exists and is not a directory")
    os.makedirs(os.path.join(root, VECTORS_DIR), exist_ok=True)
    os.makedirs(os.path.join(root, TMP_DIR), exist_ok=True)


def hash_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sniff(path: str) -> None:
    """Clear errors for files that are obviously not M2IV safetensors (never unpickled)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(0, os.SEEK_END)
            size = f.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {path!r}") from None
    if size == 0:
        raise VectorsFormatError(f"{path}: empty file")
    if head.startswith(b"PK\x03\x04"):
        raise VectorsFormatError(f"{path}: a zip archive (torch.save output?); VLibrary never "
                                 "unpickles. Build an M2IV from the tensors and M2IV.save() it")
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        raise VectorsFormatError(f"{path}: a Python pickle; VLibrary never unpickles. Build an "
                                 "M2IV from the tensors and M2IV.save() it")
    if head.startswith(b"GGUF"):
        raise VectorsFormatError(f"{path}: a GGUF file; control vectors are brought in with "
                                 "VLibrary.import_gguf / `m2iv library import`")
    if size < 8:
        raise VectorsFormatError(f"{path}: truncated ({size} bytes): not a safetensors file")
    n = int.from_bytes(head[:8], "little")
    if n == 0 or 8 + n > size:
        raise VectorsFormatError(f"{path}: not a safetensors file, or truncated (header claims "
                                 f"{n} bytes, the file has {size - 8} after the length)")


def safe_path(vectors_dir: str, rel: str, ref: str = "?") -> str:
    """The absolute path of a stored file named in the index, refusing anything that is not
    a generated name inside ``vectors/`` (or that is a link)."""
    if not isinstance(rel, str) or not FILE_RE.match(rel):
        raise UnsafePathError(f"{ref}: the index names the file {rel!r}, which is not a "
                              "library file name (vectors/<32 hex>.safetensors): refused")
    path = os.path.join(vectors_dir, rel.split("/", 1)[1])
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(vectors_dir):
        raise UnsafePathError(f"{ref}: {rel} resolves outside {vectors_dir}: refused")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path  # callers report a missing file themselves
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{ref}: {rel} is not a regular file (a link or device?): "
                              "refused")
    return path


def stage(tmp_dir: str, v: M2IV):
    """Save ``v`` into a fresh staging directory ``tmp/<id>/`` held by a flock, hash it and
    check that it loads back. Returns ``(id, directory, file, sha256, size, lock_fd)``."""
    uid = uuid.uuid4().hex
    d = os.path.join(tmp_dir, uid)
    os.mkdir(d)
    lock_fd = None
    try:
        lock_fd = os.open(os.path.join(d, "lock"), os.O_CREAT | os.O_RDWR, 0o644)
        if fcntl is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        path = os.path.join(d, "vectors.safetensors")
        v.save(path)  # temp file, fsync, rename, fsync dir
        sha, size = hash_file(path)
        M2IV.load(path)  # what we store must load back
    except BaseException:
        unstage(d, lock_fd)
        raise
    return uid, d, path, sha, size, lock_fd

def unstage(d: str, lock_fd) -> None:
    """Delete a staging directory and release its lock."""
    shutil.rmtree(d, ignore_errors=True)
    if lock_fd is not None:
        os.close(lock_fd)


def stage_state(d: str) -> str:
    """``"live"``, ``"stale"`` or ``"young"`` for an entry of ``tmp/``."""
    try:
        age = time.time() - os.lstat(d).st_mtime
    except FileNotFoundError:
        return "gone"
    if age < STAGE_GRACE_S:
        return "young"
    if not os.path.isdir(d) or os.path.islink(d) or not STAGE_RE.match(os.path.basename(d)):
        return "stale"
    lock = os.path.join(d, "lock")
    if fcntl is None:
        return "stale" if age > STAGE_STALE_NO_LOCK_S else "live"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return "stale"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return "live"
        raise
    finally:
        os.close(fd)  # releases our lock if we got it
    return "stale"


def quarantine(root: str, path: str) -> str:
    """Move ``path`` into ``quarantine/`` (never deleted); returns its new relative path."""
    qdir = os.path.join(root, QUARANTINE_DIR)
    os.makedirs(qdir, exist_ok=True)
    base = os.path.basename(path)
    dest = os.path.join(qdir, f"{int(time.time())}-{uuid.uuid4().hex[:8]}-{base}")
    os.replace(path, dest)
    fsync_dir(qdir)
    return os.path.relpath(dest, root)
