"""VLibrary: a durable local store of trained M2IV vectors.

Layout of a library directory::

    index.sqlite (+ -wal, -shm)   the index (SQLite, WAL mode)
    vectors/<32 hex>.safetensors  one immutable file per entry (written by M2IV.save)
    tmp/<32 hex>/                 staging area of adds in progress (a held flock marks it live)
    quarantine/                   corrupt or unexpected files moved aside by verify(repair=True)

Durability protocol of :meth:`VLibrary.add`:

1. the vectors are saved into a private staging directory ``tmp/<id>/`` (``M2IV.save``: temp
   file, fsync, rename) and read back: sha256 and size are computed and the file is checked to
   load;
2. ``BEGIN IMMEDIATE`` takes SQLite's write lock; the next version number for the name is read;
3. the staged file is renamed to ``vectors/<id>.safetensors`` and the directory is fsynced;
4. the index row (and its tags) is inserted and the transaction committed (``synchronous=FULL``).

A crash before 3 leaves a staging directory that no live process holds (reported as
``stale_temp``); a crash between 3 and 4 leaves a file that no row names (``orphaned``): the
transaction never committed, so the index still shows the old state. Because an add holds the
write lock from before the rename until the commit, ``verify`` confirms orphans under the same
lock and never mistakes an add in progress for a leftover. :meth:`VLibrary.remove` commits the
deletion first and unlinks the file afterwards, so a crash there also leaves only an orphan.

Nothing is ever unpickled: files are safetensors, the index stores JSON and float32 blobs. File
names in the index are generated (``vectors/<32 hex>.safetensors``) and validated on every read;
anything else (absolute paths, ``..``, symbolic links) is refused with :class:`UnsafePathError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._atomic import fsync_dir
from ..errors import IncompatibleVectorsError, VectorsFormatError, VectorsMismatchError
from ..vectors import M2IV
from .errors import EntryNotFoundError, LibraryError, LibraryIntegrityError, UnsafePathError
from .spec import ModelSpec, incompatibility

try:  # POSIX advisory locks mark staging directories that belong to a live process
    import fcntl
except ImportError:  # pragma: no cover - Windows: staging leftovers are judged by age only
    fcntl = None

__all__ = ["VLibrary", "Entry", "SearchResult", "VerifyReport", "SCHEMA_VERSION",
           "parse_ref", "default_library_path"]

SCHEMA_VERSION = 1
INDEX_NAME = "index.sqlite"
VECTORS_DIR = "vectors"
TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"
_FILE_RE = re.compile(r"^vectors/([0-9a-f]{32})\.safetensors$")
_STORED_RE = re.compile(r"^[0-9a-f]{32}\.safetensors$")
_STAGE_RE = re.compile(r"^[0-9a-f]{32}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_TAG_MAX = 64
#: a staging directory younger than this is never judged stale (covers mkdir -> flock)
STAGE_GRACE_S = 5.0
#: without fcntl, a staging directory older than this is judged stale
STAGE_STALE_NO_LOCK_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL,
    version         INTEGER NOT NULL CHECK (version >= 1),
    file            TEXT NOT NULL UNIQUE,
    sha256          TEXT NOT NULL,
    size            INTEGER NOT NULL,
    model_type      TEXT,
    model_types     TEXT NOT NULL DEFAULT '[]',
    model_name      TEXT,
    hidden_size     INTEGER,
    num_layers      INTEGER,
    num_heads       INTEGER,
    head_dim        INTEGER,
    layers          TEXT NOT NULL,
    n_bank          INTEGER,
    task            TEXT,
    description     TEXT NOT NULL DEFAULT '',
    shots           INTEGER,
    pool_size       INTEGER,
    metrics         TEXT NOT NULL DEFAULT '{}',
    extra           TEXT NOT NULL DEFAULT '{}',
    created_at      REAL NOT NULL,
    embedding       BLOB,
    embedding_dim   INTEGER,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS tags (
    entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    tag      TEXT NOT NULL,
    PRIMARY KEY (entry_id, tag)
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_task ON entries(task);
CREATE INDEX IF NOT EXISTS entries_model ON entries(hidden_size, num_heads, head_dim);
CREATE INDEX IF NOT EXISTS tags_tag ON tags(tag);
"""

_COLUMNS = ("id", "name", "version", "file", "sha256", "size", "model_type", "model_types",
            "model_name", "hidden_size", "num_layers", "num_heads", "head_dim", "layers",
            "n_bank", "task", "description", "shots", "pool_size", "metrics", "extra",
            "created_at", "embedding_dim")


def default_library_path() -> str:
    """``$M2IV_LIBRARY``, else ``$XDG_DATA_HOME/m2iv/library`` (``~/.local/share/...``)."""
    env = os.environ.get("M2IV_LIBRARY")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(base, "m2iv", "library")


def parse_ref(ref: str, version: int | str | None = None) -> tuple[str, int | None]:
    """``"name"`` / ``"name:3"`` / ``"name:latest"`` -> ``(name, version or None)``."""
    if not isinstance(ref, str) or not ref:
        raise LibraryError(f"an entry is named by a non-empty string, got {ref!r}")
    name, sep, ver = ref.rpartition(":")
    if not sep:
        name, ver = ref, None
    elif version is not None:
        raise LibraryError(f"{ref!r} already names a version; do not pass version= too")
    else:
        version = ver
    if version is None or version == "latest":
        return name, None
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise LibraryError(f"bad version {version!r} in {ref!r}: expected a positive integer or "
                           "'latest'") from None
    if v < 1:
        raise LibraryError(f"bad version {v} for {name!r}: versions start at 1")
    return name, v


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise LibraryError(f"invalid entry name {name!r}: use 1-128 characters from letters, "
                           "digits and . _ + - (starting with a letter or digit)")
    return name


def _check_tags(tags: Iterable[str] | str | None) -> tuple[str, ...]:
    if tags is None:
        return ()
    if isinstance(tags, str):
        tags = [tags]
    out = []
    for t in tags:
        if not isinstance(t, str) or not t.strip() or len(t) > _TAG_MAX or "," in t or \
                t != t.strip() or any(ord(c) < 32 for c in t):
            raise LibraryError(f"invalid tag {t!r}: tags are 1-{_TAG_MAX} printable characters, "
                               "no commas, no leading/trailing spaces")
        if t not in out:
            out.append(t)
    return tuple(sorted(out))


def _opt_int(value, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise LibraryError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _json(value, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise LibraryError(f"{what} must be JSON-serialisable without NaN/inf: {err}") from None


def as_embedding(embedding) -> np.ndarray:
    """A task embedding as a 1-D little-endian float32 array (finite, not all zero)."""
    if isinstance(embedding, torch.Tensor):
        embedding = embedding.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(embedding, dtype=np.float32)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1 or arr.size == 0:
        raise LibraryError(f"a task embedding is a 1-D vector, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise LibraryError("the task embedding holds NaN or inf")
    if not np.any(arr):
        raise LibraryError("the task embedding is all zeros (cosine similarity is undefined)")
    return arr.astype("<f4", copy=False)


def _commit(conn: sqlite3.Connection) -> None:
    """COMMIT the open transaction (a separate function so tests can simulate a crash here)."""
    conn.execute("COMMIT")


def _begin_write(conn: sqlite3.Connection, root: str, timeout: float) -> None:
    """``BEGIN IMMEDIATE`` (take the write lock now), with a clear error when another process
    holds it for longer than the busy timeout."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise LibraryError(f"{root}: another process has held the library's write lock for "
                               f"more than {timeout:g} s ({err}); try again, or open the "
                               "library with a larger timeout=") from None
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _hash_file(path: str) -> tuple[str, int]:
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


def _sniff(path: str) -> None:
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


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Entry:
    """One stored vector set (an index row). ``ref`` is ``"name:version"``."""

    id: int
    name: str
    version: int
    file: str
    sha256: str
    size: int
    model_type: str | None
    model_types: tuple[str, ...]
    model_name: str | None
    hidden_size: int | None
    num_layers: int | None
    num_heads: int | None
    head_dim: int | None
    layers: tuple[int, ...]
    n_bank: int | None
    task: str | None
    description: str
    tags: tuple[str, ...]
    shots: int | None
    pool_size: int | None
    metrics: dict
    extra: dict
    created_at: float
    embedding_dim: int | None
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def __repr__(self) -> str:
        model = self.model_type or "?"
        shape = f"L={len(self.layers)}/{self.num_layers or '?'} H={self.num_heads} " \
                f"Dh={self.head_dim} D={self.hidden_size}"
        bank = f", bank={self.n_bank}" if self.n_bank else ""
        return (f"Entry({self.ref}, model={model}, {shape}{bank}, task={self.task!r}, "
                f"tags={list(self.tags)}, sha256={self.sha256[:12]}..)")

    @property
    def created(self) -> str:
        """Creation time, ISO 8601 in UTC."""
        return _dt.datetime.fromtimestamp(self.created_at, _dt.timezone.utc).isoformat(
            timespec="seconds")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model_type=self.model_type, hidden_size=self.hidden_size,
                         num_heads=self.num_heads, head_dim=self.head_dim,
                         num_layers=self.num_layers, model_name=self.model_name,
                         model_types=frozenset(self.model_types), layers=self.layers)

    def to_dict(self, embedding: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _COLUMNS}
        d.update(ref=self.ref, created=self.created, tags=list(self.tags),
                 layers=list(self.layers), model_types=list(self.model_types))
        if embedding:
            d["embedding"] = None if self.embedding is None else self.embedding.tolist()
        return d


@dataclass(frozen=True)
class SearchResult:
    entry: Entry
    score: float  # cosine similarity in [-1, 1]

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.entry.ref, "score": self.score, "entry": self.entry.to_dict()}


@dataclass
class VerifyReport:
    """What :meth:`VLibrary.verify` found (and, with ``repair=True``, did).

    Problems: ``missing`` (a row whose file is gone), ``corrupt`` (size or sha256 differ from
    the index), ``unsafe`` (a row whose file name is not a generated library name, or a
    symbolic link), ``orphaned`` (a stored file no row names: an add that crashed before its
    commit, or a remove that crashed before its unlink), ``stale_temp`` (staging leftovers of a
    dead process), ``unexpected`` (foreign files in ``vectors/``), ``index_errors`` (SQLite's
    integrity check). ``in_progress`` lists staging directories of live adds (not problems).
    """

    root: str
    checked: int = 0
    ok: int = 0
    missing: list[dict] = field(default_factory=list)
    corrupt: list[dict] = field(default_factory=list)
    unsafe: list[dict] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    stale_temp: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    index_errors: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    repair: bool = False

    @property
    def problems(self) -> int:
        return (len(self.missing) + len(self.corrupt) + len(self.unsafe) + len(self.orphaned)
                + len(self.stale_temp) + len(self.unexpected) + len(self.index_errors))

    @property
    def clean(self) -> bool:
        """No problem found."""
        return self.problems == 0

    @property
    def healthy(self) -> bool:
        """Clean, or every problem found was repaired."""
        return self.clean or (self.repair and not self.unrepaired)

    def to_dict(self) -> dict[str, Any]:
        keys = ("root", "checked", "ok", "missing", "corrupt", "unsafe", "orphaned",
                "stale_temp", "unexpected", "index_errors", "in_progress", "repaired",
                "unrepaired", "repair")
        d = {k: getattr(self, k) for k in keys}
        d.update(problems=self.problems, clean=self.clean, healthy=self.healthy)
        return d

    def __str__(self) -> str:
        lines = [f"{self.root}: {self.checked} entries checked, {self.ok} ok, "
                 f"{self.problems} problem(s)"]
        for what in ("missing", "corrupt", "unsafe"):
            for item in getattr(self, what):
                lines.append(f"  {what}: {item['ref']} ({item['file']})"
                             + (f": {item['reason']}" if item.get("reason") else ""))
        for what in ("orphaned", "stale_temp", "unexpected", "index_errors", "in_progress"):
            for item in getattr(self, what):
                lines.append(f"  {what}: {item}")
        for item in self.repaired:
            lines.append(f"  repaired: {item}")
        for item in self.unrepaired:
            lines.append(f"  NOT repaired: {item}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the library


class VLibrary:
    """A directory of safetensors vector files plus a SQLite index.

    Args:
        path: the library directory (created with ``create=True``, the default).
        create: create the library if it does not exist. A non-empty directory that is not a
            library is never taken over.
        timeout: seconds to wait for another process's write lock (SQLite busy timeout).

    Safe for several processes at once (each opens its own ``VLibrary``); one instance may be
    shared by threads (calls are serialised).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True,
                 timeout: float = 60.0):
        path = default_library_path() if path is None else os.fspath(path)
        self.root = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
        self.timeout = float(timeout)
        self._index = os.path.join(self.root, INDEX_NAME)
        self._vectors = os.path.join(self.root, VECTORS_DIR)
        self._tmp = os.path.join(self.root, TMP_DIR)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._pid = None
        if not os.path.exists(self._index):
            if not create:
                raise LibraryError(f"no VLibrary at {self.root} (no {INDEX_NAME}); pass "
                                   "create=True to make one")
            if os.path.isdir(self.root):
                foreign = sorted(set(os.listdir(self.root))
                                 - {VECTORS_DIR, TMP_DIR, QUARANTINE_DIR, INDEX_NAME,
                                    INDEX_NAME + "-wal", INDEX_NAME + "-shm",
                                    INDEX_NAME + "-journal"})
                if foreign:
                    raise LibraryError(f"{self.root} is not empty and is not a VLibrary (no "
                                       f"{INDEX_NAME}; it holds {foreign[:5]}): refusing to use it")
            elif os.path.exists(self.root):
                raise LibraryError(f"{self.root} exists and is not a directory")
        os.makedirs(self._vectors, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self._conn()  # opens and migrates the index now, so errors surface here

    # ------------------------------------------------------------------ connection

    def _conn(self) -> sqlite3.Connection:
        if self._db is not None and self._pid == os.getpid():
            return self._db
        # first use, or a fork: a connection must never cross a fork
        conn = sqlite3.connect(self._index, timeout=self.timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            deadline = time.monotonic() + self.timeout
            while True:  # the switch to WAL needs a moment alone with a brand-new file
                try:
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    break
                except sqlite3.OperationalError as err:
                    if "locked" not in str(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            self.journal_mode = mode
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            have = conn.execute("PRAGMA user_version").fetchone()[0]
            if have < SCHEMA_VERSION:  # new (or older) index: create/migrate under the lock
                _begin_write(conn, self.root, self.timeout)
                try:
                    have = conn.execute("PRAGMA user_version").fetchone()[0]
                    if have < SCHEMA_VERSION:
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    _commit(conn)
                except BaseException:
                    _rollback(conn)
                    raise
            if have > SCHEMA_VERSION:
                raise LibraryError(f"{self.root} was written by a newer m2iv (index schema "
                                   f"{have}; this one reads up to {SCHEMA_VERSION})")
        except sqlite3.OperationalError as err:
            conn.close()
            if "locked" in str(err) or "busy" in str(err):
                raise LibraryError(f"{self.root}: the index stayed locked by another process "
                                   f"for more than {self.timeout:g} s ({err})") from None
            raise LibraryError(f"{self._index}: not a usable SQLite index ({err})") from None
        except sqlite3.DatabaseError as err:
            conn.close()
            raise LibraryError(f"{self._index}: not a usable SQLite index ({err})") from None
        except BaseException:
            conn.close()
            raise
        self._db, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None

    def __enter__(self) -> VLibrary:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VLibrary({self.root!r})"

    @contextlib.contextmanager
    def _write(self):
        """A write transaction (``BEGIN IMMEDIATE``: the write lock is taken at once)."""
        with self._lock:
            conn = self._conn()
            _begin_write(conn, self.root, self.timeout)
            try:
                yield conn
                _commit(conn)
            except BaseException:
                _rollback(conn)
                raise

    @contextlib.contextmanager
    def _read(self):
        """A read transaction: one consistent snapshot."""
        with self._lock:
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                _rollback(conn)

    # ------------------------------------------------------------------ paths

    def _safe_path(self, rel: str, ref: str = "?") -> str:
        """The absolute path of a stored file named in the index, refusing anything that is not
        a generated name inside ``vectors/`` (or that is a link)."""
        if not isinstance(rel, str) or not _FILE_RE.match(rel):
            raise UnsafePathError(f"{ref}: the index names the file {rel!r}, which is not a "
                                  "library file name (vectors/<32 hex>.safetensors): refused")
        path = os.path.join(self._vectors, rel.split("/", 1)[1])
        if os.path.dirname(os.path.realpath(path)) != os.path.realpath(self._vectors):
            raise UnsafePathError(f"{ref}: {rel} resolves outside {self._vectors}: refused")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path  # callers report a missing file themselves
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{ref}: {rel} is not a regular file (a link or device?): "
                                  "refused")
        return path

    # ------------------------------------------------------------------ rows

    def _entries(self, conn, where: str = "", args: Sequence = (), *,
                 embeddings: bool = False) -> list[Entry]:
        cols = ", ".join(f"e.{c}" for c in _COLUMNS) + (", e.embedding" if embeddings else "")
        rows = conn.execute(f"SELECT {cols} FROM entries e {where} ORDER BY e.name, e.version",
                            tuple(args)).fetchall()
        if not rows:
            return []
        tags: dict[int, list[str]] = {}
        ids = [r[0] for r in rows]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = f"SELECT entry_id, tag FROM tags WHERE entry_id IN ({','.join('?' * len(chunk))})"
            for eid, tag in conn.execute(q, chunk):
                tags.setdefault(eid, []).append(tag)
        out = []
        for r in rows:
            d = dict(zip(_COLUMNS, r[:len(_COLUMNS)]))
            emb = None
            if embeddings and r[len(_COLUMNS)] is not None:
                emb = np.frombuffer(r[len(_COLUMNS)], dtype="<f4").astype(np.float32)
            d.update(model_types=tuple(json.loads(d["model_types"])),
                     layers=tuple(json.loads(d["layers"])), metrics=json.loads(d["metrics"]),
                     extra=json.loads(d["extra"]), tags=tuple(sorted(tags.get(d["id"], ()))),
                     description=d["description"] or "")
            out.append(Entry(**d, embedding=emb))
        return out

    def _find(self, conn, name: str, version: int | None, *, embeddings: bool = True) -> Entry:
        if version is None:
            found = self._entries(conn, "WHERE e.name = ? AND e.version = "
                                  "(SELECT MAX(version) FROM entries WHERE name = ?)",
                                  (name, name), embeddings=embeddings)
        else:
            found = self._entries(conn, "WHERE e.name = ? AND e.version = ?", (name, version),
                                  embeddings=embeddings)
        if not found:
            versions = [v for (v,) in conn.execute(
                "SELECT version FROM entries WHERE name = ? ORDER BY version", (name,))]
            if versions:
                raise EntryNotFoundError(f"{name!r} has no version {version} (versions: "
                                         f"{versions})")
            raise EntryNotFoundError(f"no entry named {name!r} in {self.root}")
        return found[0]

    # ------------------------------------------------------------------ reading

    def entry(self, name: str, version: int | str | None = None) -> Entry:
        """The index entry for ``name`` (``"name:3"`` works too); the latest version by default.

        Raises:
            EntryNotFoundError: no such name or version.
        """
        name, version = parse_ref(name, version)
        with self._read() as conn:
            return self._find(conn, name, version)

    def __contains__(self, ref: str) -> bool:
        try:
            self.entry(ref)
        except (EntryNotFoundError, LibraryError):
            return False
        return True

    def __len__(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def path_of(self, name: str, version: int | str | None = None) -> str:
        """The absolute path of an entry's file (validated to lie inside the library)."""
        e = self.entry(name, version)
        return self._safe_path(e.file, e.ref)

    def _load(self, e: Entry, device=None, dtype=None) -> M2IV:
        path = self._safe_path(e.file, e.ref)
        try:
            sha, size = _hash_file(path)
        except FileNotFoundError:
            if e.ref not in self:
                raise EntryNotFoundError(f"{e.ref} was removed meanwhile") from None
            raise LibraryIntegrityError(f"{e.ref}: its file {e.file} is missing; run "
                                        "`m2iv library verify`") from None
        if size != e.size or sha != e.sha256:
            raise LibraryIntegrityError(
                f"{e.ref}: {e.file} is corrupt: sha256 {sha[:16]}... ({size} bytes) differs "
                f"from the {e.sha256[:16]}... ({e.size} bytes) recorded when it was added; run "
                "`m2iv library verify`")
        try:
            v = M2IV.load(path, device=device, dtype=dtype)
        except VectorsFormatError as err:
            raise LibraryIntegrityError(f"{e.ref}: {err}") from None
        # the index is authoritative for the descriptive fields (update() changes them there)
        v.meta.update(task=e.task, description=e.description, shots=e.shots)
        if e.pool_size is not None:
            v.meta["pool_size"] = e.pool_size
        v.meta["library"] = {"name": e.name, "version": e.version, "sha256": e.sha256}
        return v

    def _check_target(self, e: Entry, target, allow_incompatible: bool) -> None:
        if target is None or allow_incompatible:
            return
        spec = ModelSpec.of(target)
        why = incompatibility(e.model_spec(), spec, (e.ref, "the model" if spec.is_model
                                                     else "the vectors"))
        if why is not None:
            cls = VectorsMismatchError if spec.is_model else IncompatibleVectorsError
            what = "this model" if spec.is_model else "these vectors"
            raise cls(f"{e.ref} does not fit {what}: {why}. Pass allow_incompatible=True to "
                      "get it anyway")

    def get(self, name: str, version: int | str | None = None, *, model=None,
            allow_incompatible: bool = False, device=None, dtype=None) -> M2IV:
        """Load an entry's vectors (latest version by default), checking the file's sha256.

        With ``model`` (a model, M2IV or spec), vectors that do not fit it are refused with
        :class:`VectorsMismatchError` unless ``allow_incompatible=True``.

        Raises:
            EntryNotFoundError, LibraryIntegrityError (missing/corrupt file), UnsafePathError,
            VectorsMismatchError.
        """
        e = self.entry(name, version)
        self._check_target(e, model, allow_incompatible)
        v = self._load(e, device=device, dtype=dtype)
        if model is not None and not allow_incompatible and isinstance(model, torch.nn.Module):
            try:
                v.check_model(model)
            except ModuleNotFoundError as err:  # families not available: index check only
                if "families" not in str(err):
                    raise
            except VectorsMismatchError as err:
                raise VectorsMismatchError(f"{e.ref}: {err}") from None
        return v

    def list(self, *, name: str | None = None, model_type: str | None = None,
             hidden_size: int | None = None, num_layers: int | None = None,
             compatible_with=None, tags: Iterable[str] | str | None = None,
             task: str | None = None, latest_only: bool = False,
             embeddings: bool = False) -> list[Entry]:
        """Entries matching every filter given, ordered by name then version.

        ``tags``: entries carrying all of them. ``compatible_with``: a model (entries whose
        vectors fit it), an M2IV or entry (entries that could be combined with it).
        ``latest_only``: the newest matching version of each name.
        """
        where, args = [], []
        if name is not None:
            where.append("e.name = ?")
            args.append(name)
        if model_type is not None:
            where.append("(e.model_type = ? OR EXISTS (SELECT 1 FROM json_each(e.model_types) "
                         "WHERE value = ?))")
            args += [model_type, model_type]
        if hidden_size is not None:
            where.append("e.hidden_size = ?")
            args.append(int(hidden_size))
        if num_layers is not None:
            where.append("e.num_layers = ?")
            args.append(int(num_layers))
        if task is not None:
            where.append("e.task = ?")
            args.append(task)
        for t in _check_tags(tags):
            where.append("EXISTS (SELECT 1 FROM tags t WHERE t.entry_id = e.id AND t.tag = ?)")
            args.append(t)
        sql = ("WHERE " + " AND ".join(where)) if where else ""
        with self._read() as conn:
            found = self._entries(conn, sql, args, embeddings=embeddings)
        if compatible_with is not None:
            spec = ModelSpec.of(compatible_with)
            found = [e for e in found if incompatibility(e.model_spec(), spec) is None]
        if latest_only:
            latest: dict[str, Entry] = {}
            for e in found:
                latest[e.name] = e  # ordered by version
            found = sorted(latest.values(), key=lambda e: e.name)
        return found

    def search(self, embedding, k: int = 5, *, compatible_with=None,
               allow_incompatible: bool = False, tags: Iterable[str] | str | None = None,
               task: str | None = None, model_type: str | None = None,
               latest_only: bool = True) -> list[SearchResult]:
        """The ``k`` entries whose task embeddings are most cosine-similar to ``embedding``.

        Only entries compatible with ``compatible_with`` (the model the query embedding was
        computed with, an M2IV, or an entry) are considered: it is required unless
        ``allow_incompatible=True`` (then every entry with an embedding of the same size is
        ranked). ``latest_only`` ranks the newest version (with an embedding) of each name.
        """
        if compatible_with is None and not allow_incompatible:
            raise LibraryError("search needs compatible_with= (the model the query embedding "
                               "came from, or vectors/entry it must combine with); pass "
                               "allow_incompatible=True to rank entries of every model")
        if not isinstance(k, int) or k < 1:
            raise LibraryError(f"k must be a positive integer, got {k!r}")
        q = as_embedding(embedding)
        found = self.list(compatible_with=None if allow_incompatible else compatible_with,
                          tags=tags, task=task, model_type=model_type, embeddings=True)
        found = [e for e in found if e.embedding is not None and e.embedding.size == q.size]
        if latest_only:
            latest: dict[str, Entry] = {}
            for e in found:
                latest[e.name] = e
            found = list(latest.values())
        if not found:
            return []
        mat = np.stack([e.embedding for e in found]).astype(np.float64)
        qd = q.astype(np.float64)
        norms = np.linalg.norm(mat, axis=1) * np.linalg.norm(qd)
        scores = (mat @ qd) / np.where(norms > 0, norms, 1.0)
        order = sorted(range(len(found)), key=lambda i: (-scores[i], -found[i].created_at,
                                                         found[i].name))
        return [SearchResult(found[i], float(scores[i])) for i in order[:k]]

    def search_examples(self, model, examples, k: int = 5, *, tokenizer=None, processor=None,
                        layer="middle", **search_kw) -> list[SearchResult]:
        """Embed a few examples with ``model`` (:func:`m2iv.task_embedding.embed_task`) and
        :meth:`search` among the entries that fit ``model``."""
        from ..task_embedding import embed_task

        q = embed_task(model, examples, tokenizer=tokenizer, processor=processor, layer=layer)
        search_kw.setdefault("compatible_with", model)
        return self.search(q, k, **search_kw)

    # ------------------------------------------------------------------ writing

    def _stage(self, v: M2IV):
        """Save ``v`` into a fresh staging directory held by a flock; returns its details."""
        uid = uuid.uuid4().hex
        d = os.path.join(self._tmp, uid)
        os.mkdir(d)
        lock_fd = None
        try:
            lock_fd = os.open(os.path.join(d, "lock"), os.O_CREAT | os.O_RDWR, 0o644)
            if fcntl is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            path = os.path.join(d, "vectors.safetensors")
            v.save(path)  # temp file, fsync, rename, fsync dir
            sha, size = _hash_file(path)
            M2IV.load(path)  # what we store must load back
        except BaseException:
            self._unstage(d, lock_fd)
            raise
        return uid, d, path, sha, size, lock_fd

    def _unstage(self, d: str, lock_fd) -> None:
        shutil.rmtree(d, ignore_errors=True)
        if lock_fd is not None:
            os.close(lock_fd)

    def add(self, vectors: M2IV, name: str, *, tags: Iterable[str] | str | None = None,
            task: str | None = None, description: str | None = None, shots: int | None = None,
            pool_size: int | None = None, metrics: Mapping[str, Any] | None = None,
            embedding=None, model=None, model_name: str | None = None,
            extra: Mapping[str, Any] | None = None) -> Entry:
        """Store ``vectors`` as the next version of ``name`` and return its entry.

        Args:
            vectors: an :class:`M2IV` (a bank is stored as a bank).
            name: 1-128 characters from letters, digits, ``. _ + -``.
            tags, task, description, shots, pool_size: descriptive fields; ``task``, ``shots``,
                ``description`` and ``pool_size`` default to the vectors' ``meta``.
            metrics: training metrics (JSON object).
            embedding: the task embedding (see :func:`m2iv.task_embedding.embed_task`).
            model: the model the vectors were trained for: checked (``check_model``) and used
                to fill in the model fields (name/path, type) the vectors' meta lacks.
            model_name: the model's name or path (default: the model's ``name_or_path`` or
                ``meta['model_name']``).
            extra: any other JSON object kept with the entry.

        Raises:
            LibraryError (bad arguments), VectorsMismatchError (vectors do not fit ``model``).
        """
        if not isinstance(vectors, M2IV):
            raise LibraryError(f"add() stores an M2IV, got {type(vectors).__name__}")
        name = _check_name(name)
        tag_list = _check_tags(tags)
        shots = _opt_int(vectors.meta.get("shots") if shots is None else shots, "shots")
        pool_size = _opt_int(vectors.meta.get("pool_size") if pool_size is None else pool_size,
                             "pool_size")
        if metrics is not None and not isinstance(metrics, Mapping):
            raise LibraryError("metrics must be a mapping (a JSON object)")
        metrics_json = _json(dict(metrics or {}), "metrics")
        if extra is not None and not isinstance(extra, Mapping):
            raise LibraryError("extra must be a mapping (a JSON object)")
        extra_json = _json(dict(extra or {}), "extra")
        emb = None if embedding is None else as_embedding(embedding)
        task = vectors.meta.get("task") if task is None else task
        description = vectors.meta.get("description") or "" if description is None else description
        if task is not None and not isinstance(task, str):
            raise LibraryError(f"task must be a string, got {task!r}")
        if not isinstance(description, str):
            raise LibraryError(f"description must be a string, got {description!r}")

        meta = dict(vectors.meta)
        meta.pop("library", None)
        spec = ModelSpec.from_vectors(vectors)
        types = set(spec.types())
        if model is not None:
            mspec = ModelSpec.of(model)
            if isinstance(model, torch.nn.Module):
                try:
                    vectors.check_model(model)
                except ModuleNotFoundError as err:
                    if "families" not in str(err):
                        raise
                    why = incompatibility(spec, dataclasses.replace(mspec, layers=None))
                    if why:
                        raise VectorsMismatchError(f"the vectors do not fit the model: {why}") \
                            from None
            if meta.get("model_type") is None:
                meta["model_type"] = mspec.model_type
            if meta.get("num_layers") is None and mspec.num_layers is not None:
                meta["num_layers"] = mspec.num_layers
            model_name = model_name or mspec.model_name
            types |= mspec.types()
        model_name = model_name or meta.get("model_name")
        if model_name is not None:
            meta["model_name"] = str(model_name)
        meta.update(task=task, description=description, shots=shots)
        if pool_size is not None:
            meta["pool_size"] = pool_size
        try:
            to_store = M2IV(vectors.mha, vectors.mha_gates, vectors.mlp, vectors.mlp_gates,
                            vectors.layers, meta, check_finite=True)
        except VectorsFormatError as err:
            raise VectorsFormatError(f"cannot add {name!r}: {err}") from None
        types.discard(None)
        if meta.get("model_type"):
            types.add(meta["model_type"])

        with self._lock:
            uid, stage_dir, staged, sha, size, lock_fd = self._stage(to_store)
            try:
                rel = f"{VECTORS_DIR}/{uid}.safetensors"
                final = os.path.join(self._vectors, f"{uid}.safetensors")
                conn = self._conn()
                _begin_write(conn, self.root, self.timeout)
                moved = False
                try:
                    row = conn.execute("SELECT last FROM versions WHERE name = ?",
                                       (name,)).fetchone()
                    version = (row[0] if row else 0) + 1
                    os.replace(staged, final)
                    moved = True
                    fsync_dir(self._vectors)
                    cur = conn.execute(
                        "INSERT INTO entries (name, version, file, sha256, size, model_type, "
                        "model_types, model_name, hidden_size, num_layers, num_heads, head_dim, "
                        "layers, n_bank, task, description, shots, pool_size, metrics, extra, "
                        "created_at, embedding, embedding_dim) VALUES "
                        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (name, version, rel, sha, size, meta.get("model_type"),
                         json.dumps(sorted(types)), meta.get("model_name"),
                         to_store.hidden_size, meta.get("num_layers"), to_store.num_heads,
                         to_store.head_dim, json.dumps(list(to_store.layers)), to_store.n_bank,
                         task, description, shots, pool_size, metrics_json, extra_json,
                         time.time(), None if emb is None else emb.tobytes(),
                         None if emb is None else int(emb.size)))
                    eid = cur.lastrowid
                    conn.executemany("INSERT INTO tags (entry_id, tag) VALUES (?, ?)",
                                     [(eid, t) for t in tag_list])
                    conn.execute("INSERT INTO versions (name, last) VALUES (?, ?) ON CONFLICT"
                                 "(name) DO UPDATE SET last = excluded.last", (name, version))
                    _commit(conn)
                except BaseException:
                    _rollback(conn)
                    if moved:  # undo the rename; if we die first, verify finds an orphan
                        with contextlib.suppress(OSError):
                            os.unlink(final)
                        fsync_dir(self._vectors)
                    raise
            finally:
                self._unstage(stage_dir, lock_fd)
            return self.entry(name, version)

    def add_file(self, path: str | os.PathLike, name: str, **kw) -> Entry:
        """Add the vectors of an M2IV safetensors file (see :meth:`add` for the keywords).

        Pickles, zip archives (``torch.save``), GGUF, foreign safetensors, truncated and
        corrupt files are refused with :class:`VectorsFormatError`; nothing is unpickled.
        """
        path = os.fspath(path)
        _sniff(path)
        return self.add(M2IV.load(path), name, **kw)

    def update(self, name: str, version: int | str | None = None, *,
               tags: Iterable[str] | str | None = None, add_tags: Iterable[str] | str | None = None,
               remove_tags: Iterable[str] | str | None = None, task: str | None = None,
               description: str | None = None, metrics: Mapping[str, Any] | None = None,
               embedding=None, clear_embedding: bool = False) -> Entry:
        """Change an entry's descriptive fields (the stored file is immutable; the index is
        authoritative and :meth:`get` applies task/description to the loaded ``meta``)."""
        name, version = parse_ref(name, version)
        sets, args = [], []
        if task is not None:
            sets.append("task = ?")
            args.append(task)
        if description is not None:
            sets.append("description = ?")
            args.append(description)
        if metrics is not None:
            sets.append("metrics = ?")
            args.append(_json(dict(metrics), "metrics"))
        if embedding is not None:
            emb = as_embedding(embedding)
            sets.append("embedding = ?, embedding_dim = ?")
            args += [emb.tobytes(), int(emb.size)]
        elif clear_embedding:
            sets.append("embedding = NULL, embedding_dim = NULL")
        with self._write() as conn:
            e = self._find(conn, name, version, embeddings=False)
            if sets:
                conn.execute(f"UPDATE entries SET {', '.join(sets)} WHERE id = ?",
                             (*args, e.id))
            new_tags = set(e.tags) if tags is None else set(_check_tags(tags))
            new_tags |= set(_check_tags(add_tags))
            new_tags -= set(_check_tags(remove_tags))
            if new_tags != set(e.tags):
                conn.execute("DELETE FROM tags WHERE entry_id = ?", (e.id,))
                conn.executemany("INSERT INTO tags (entry_id, tag) VALUES (?, ?)",
                                 [(e.id, t) for t in sorted(new_tags)])
        return self.entry(name, e.version)

    def remove(self, name: str, version: int | str | None = None, *,
               all_versions: bool = False) -> list[Entry]:
        """Remove one version (``"name:3"`` or ``version=3``) or, with ``all_versions=True``,
        every version of ``name``. Returns the removed entries. Version numbers are never
        reused. The row goes first (committed), the file after: a crash in between leaves an
        orphaned file that ``verify`` reports and repairs.
        """
        name, version = parse_ref(name, version)
        if version is None and not all_versions:
            raise LibraryError(f"remove needs a version ({name}:N) or all_versions=True")
        with self._write() as conn:
            if version is None:
                gone = self._entries(conn, "WHERE e.name = ?", (name,))
                if not gone:
                    raise EntryNotFoundError(f"no entry named {name!r} in {self.root}")
            else:
                gone = [self._find(conn, name, version, embeddings=False)]
            conn.executemany("DELETE FROM entries WHERE id = ?", [(e.id,) for e in gone])
        for e in gone:
            try:
                path = self._safe_path(e.file, e.ref)
            except UnsafePathError:
                continue  # never touch a path the index should not have held
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        fsync_dir(self._vectors)
        return gone

    # ------------------------------------------------------------------ combining

    def _resolve(self, refs: Iterable[str], model, allow_incompatible: bool) -> list[Entry]:
        entries = [self.entry(r) for r in refs]
        if not entries:
            raise LibraryError("no entries given")
        for e in entries:
            if e.n_bank is not None:
                raise IncompatibleVectorsError(f"{e.ref} is a bank of {e.n_bank}; compose and "
                                               "stack take single vector sets")
            self._check_target(e, model, allow_incompatible)
        first = entries[0]
        for e in entries[1:]:
            why = incompatibility(e.model_spec(), first.model_spec(), (e.ref, first.ref))
            if why is not None:
                raise IncompatibleVectorsError(f"cannot combine {first.ref} with {e.ref}: {why}")
        return entries

    def compose(self, weights: Mapping[str, float] | Sequence[tuple[str, float]], *,
                model=None, allow_incompatible: bool = False, device=None,
                dtype=None) -> M2IV:
        """``sum_i w_i * v_i`` over entries (``{"task": 1.0, "safety:2": 0.5}``).

        The effective steering ``gate * vector`` of each entry is summed
        (:meth:`M2IV.weighted_sum`), so steering with the result equals steering with every
        entry at strength ``w_i``. ``meta['components']`` records each entry's ref, sha256 and
        weight.

        Raises:
            IncompatibleVectorsError: entries that cannot be combined (shapes, layers, model).
            VectorsMismatchError: with ``model``, an entry that does not fit it (unless
                ``allow_incompatible=True``).
        """
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        if not items:
            raise LibraryError("compose needs at least one {name: weight}")
        for ref, w in items:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise LibraryError(f"weight of {ref!r} must be a finite number, got {w!r}")
        entries = self._resolve([r for r, _ in items], model, allow_incompatible)
        vs = [self._load(e, device=device, dtype=dtype) for e in entries]
        try:
            out = M2IV.weighted_sum([(v, float(w)) for v, (_, w) in zip(vs, items)])
        except IncompatibleVectorsError as err:
            raise IncompatibleVectorsError(f"cannot compose {[e.ref for e in entries]}: {err}") \
                from None
        out.meta.pop("library", None)  # the sum is not a stored entry
        out.meta["components"] = [{"ref": e.ref, "name": e.name, "version": e.version,
                                   "sha256": e.sha256, "task": e.task, "weight": float(w)}
                                  for e, (_, w) in zip(entries, items)]
        out.meta["description"] = "compose: " + " + ".join(
            f"{float(w):g}*{e.ref}" for e, (_, w) in zip(entries, items))
        if model is not None and isinstance(model, torch.nn.Module) and not allow_incompatible:
            with contextlib.suppress(ModuleNotFoundError):
                out.check_model(model)
        return out

    def stack(self, names: Sequence[str], *, model=None, allow_incompatible: bool = False,
              device=None, dtype=None) -> M2IV:
        """A bank of the entries, row ``i`` = ``names[i]``, for the patcher's per-sequence
        index (``handle.select(index)``). ``meta['bank'][i]['library_ref']`` names each row."""
        names = list(names)
        entries = self._resolve(names, model, allow_incompatible)
        vs = [self._load(e, device=device, dtype=dtype) for e in entries]
        try:
            bank = M2IV.stack(vs)
        except IncompatibleVectorsError as err:
            raise IncompatibleVectorsError(f"cannot stack {[e.ref for e in entries]}: {err}") \
                from None
        bank.meta.pop("library", None)
        rows = bank.meta.get("bank") or [{} for _ in entries]
        for row, e in zip(rows, entries):
            row["library_ref"] = e.ref
            row["sha256"] = e.sha256
        bank.meta["bank"] = rows
        return bank

    # ------------------------------------------------------------------ interop

    def import_gguf(self, path: str | os.PathLike, name: str, *, model=None,
                    num_heads: int | None = None, head_dim: int | None = None,
                    num_layers: int | None = None, model_type: str | None = None,
                    **add_kw) -> Entry:
        """Add a llama.cpp / repeng control vector (GGUF) as MLP-branch vectors with gate 1.

        See :func:`m2iv.library.gguf_io.load_control_vector` for the mapping. ``model`` (or
        ``num_heads``/``head_dim``, optionally ``num_layers``/``model_type``) gives the shapes
        of the all-zero MHA part.
        """
        from .gguf_io import load_control_vector

        v = load_control_vector(path, model=model, num_heads=num_heads, head_dim=head_dim,
                                num_layers=num_layers, model_type=model_type)
        extra = dict(add_kw.pop("extra", None) or {})
        extra.setdefault("imported_from", {"format": "gguf-controlvector",
                                           "file": os.path.basename(os.fspath(path)),
                                           "model_hint": v.meta.get("gguf_model_hint")})
        return self.add(v, name, model=model, extra=extra, **add_kw)

    def export_gguf(self, name: str, path: str | os.PathLike, *, version=None, model=None,
                    **kw):
        """Write an entry as a llama.cpp / repeng control vector; see
        :func:`m2iv.library.gguf_io.save_control_vector` (returns its report)."""
        from .gguf_io import save_control_vector

        e = self.entry(name, version)
        v = self.get(e.name, e.version, model=model, allow_incompatible=kw.pop(
            "allow_incompatible", False))
        return save_control_vector(v, path, model=model, **kw)

    # ------------------------------------------------------------------ verify

    def _stage_state(self, d: str) -> str:
        """``"live"``, ``"stale"`` or ``"young"`` for an entry of ``tmp/``."""
        try:
            age = time.time() - os.lstat(d).st_mtime
        except FileNotFoundError:
            return "gone"
        if age < STAGE_GRACE_S:
            return "young"
        if not os.path.isdir(d) or os.path.islink(d) or not _STAGE_RE.match(os.path.basename(d)):
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

    def verify(self, repair: bool = False) -> VerifyReport:
        """Recompute every stored file's sha256 and look for leftovers.

        Reports missing, corrupt and unsafe rows, orphaned and unexpected files, stale staging
        directories and SQLite integrity errors (see :class:`VerifyReport`). With
        ``repair=True``: stale staging directories and orphaned files are deleted (they are
        uncommitted adds or finished removes); unexpected files are moved to ``quarantine/``;
        rows whose file is missing, corrupt or unsafe are dropped from the index (a corrupt
        file is moved to ``quarantine/`` first; restore it from a backup before repairing if
        you have one). Safe to run while other processes add entries.
        """
        rep = VerifyReport(root=self.root, repair=repair)
        with self._read() as conn:
            for (msg,) in conn.execute("PRAGMA integrity_check"):
                if msg != "ok":
                    rep.index_errors.append(msg)
            for (msg,) in conn.execute("PRAGMA foreign_key_check"):
                rep.index_errors.append(f"foreign key: {msg}")
            entries = self._entries(conn)
        rep.checked = len(entries)
        bad_rows: dict[int, tuple[str, Entry, str]] = {}
        for e in entries:
            try:
                path = self._safe_path(e.file, e.ref)
            except UnsafePathError as err:
                bad_rows[e.id] = ("unsafe", e, str(err))
                continue
            try:
                sha, size = _hash_file(path)
            except FileNotFoundError:
                bad_rows[e.id] = ("missing", e, "")
                continue
            if size != e.size:
                bad_rows[e.id] = ("corrupt", e, f"size {size} != {e.size} (truncated?)")
            elif sha != e.sha256:
                bad_rows[e.id] = ("corrupt", e, f"sha256 {sha[:16]}... != {e.sha256[:16]}...")
        named = {e.file for e in entries}
        suspects = []
        for fn in sorted(os.listdir(self._vectors)):
            rel = f"{VECTORS_DIR}/{fn}"
            if rel in named:
                continue
            suspects.append(fn)

        # confirm under the write lock: no add is between its rename and its commit now,
        # no remove between its commit and its unlink has un-done rows we think are missing
        with self._write() as conn:
            still = {row[0]: row for row in conn.execute("SELECT id, file FROM entries")}
            files_now = {f for (_, f) in still.values()}
            for eid, (kind, e, reason) in sorted(bad_rows.items()):
                if eid not in still:
                    continue  # removed meanwhile
                item = {"ref": e.ref, "file": e.file, "reason": reason}
                getattr(rep, kind).append(item)
                if not repair:
                    continue
                if kind == "corrupt":
                    try:
                        moved = self._quarantine(self._safe_path(e.file, e.ref))
                        rep.repaired.append(f"moved corrupt {e.file} ({e.ref}) to {moved}")
                    except (OSError, UnsafePathError) as err:
                        rep.unrepaired.append(f"could not quarantine {e.file}: {err}")
                        continue
                elif kind == "unsafe" and isinstance(e.file, str) and _FILE_RE.match(e.file):
                    # a link (or device...) planted under a valid name: move the link itself
                    # aside, never what it points to
                    p = os.path.join(self._vectors, e.file.split("/", 1)[1])
                    if os.path.lexists(p):
                        try:
                            moved = self._quarantine(p)
                            rep.repaired.append(f"moved {e.file} ({e.ref}, not a regular file) "
                                                f"to {moved}")
                        except OSError as err:
                            rep.unrepaired.append(f"could not quarantine {e.file}: {err}")
                            continue
                conn.execute("DELETE FROM entries WHERE id = ?", (eid,))
                rep.repaired.append(f"dropped index row {e.ref} ({kind} file {e.file})")
            for fn in suspects:
                rel = f"{VECTORS_DIR}/{fn}"
                path = os.path.join(self._vectors, fn)
                if rel in files_now or not os.path.lexists(path):
                    continue  # committed or removed meanwhile
                if _STORED_RE.match(fn) and os.path.isfile(path) and not os.path.islink(path):
                    rep.orphaned.append(rel)
                    if repair:
                        try:
                            os.unlink(path)
                            rep.repaired.append(f"deleted orphaned {rel}")
                        except OSError as err:
                            rep.unrepaired.append(f"could not delete {rel}: {err}")
                else:
                    rep.unexpected.append(rel)
                    if repair:
                        try:
                            moved = self._quarantine(path)
                            rep.repaired.append(f"moved unexpected {rel} to {moved}")
                        except OSError as err:
                            rep.unrepaired.append(f"could not move {rel}: {err}")
            if repair:
                fsync_dir(self._vectors)
        rep.ok = rep.checked - len(rep.missing) - len(rep.corrupt) - len(rep.unsafe)

        for fn in sorted(os.listdir(self._tmp)):
            d = os.path.join(self._tmp, fn)
            state = self._stage_state(d)
            rel = f"{TMP_DIR}/{fn}"
            if state in ("live", "young"):
                rep.in_progress.append(rel)
            elif state == "stale":
                rep.stale_temp.append(rel)
                if repair:
                    try:
                        if os.path.isdir(d) and not os.path.islink(d):
                            shutil.rmtree(d)
                        else:
                            os.unlink(d)
                        rep.repaired.append(f"deleted stale staging {rel}")
                    except OSError as err:
                        rep.unrepaired.append(f"could not delete {rel}: {err}")
        if rep.index_errors and repair:
            rep.unrepaired.append("SQLite integrity errors cannot be repaired in place: copy "
                                  "the entries out (export) and rebuild the library")
        return rep

    def _quarantine(self, path: str) -> str:
        qdir = os.path.join(self.root, QUARANTINE_DIR)
        os.makedirs(qdir, exist_ok=True)
        base = os.path.basename(path)
        dest = os.path.join(qdir, f"{int(time.time())}-{uuid.uuid4().hex[:8]}-{base}")
        os.replace(path, dest)
        fsync_dir(qdir)
        return os.path.relpath(dest, self.root)

