"""The SQLite index of a library: schema, connection (WAL, ``synchronous=FULL``, migration),
transactions and reading rows into :class:`~m2iv.library.records.Entry` records."""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Sequence

import numpy as np

from . import records
from .errors import EntryNotFoundError, LibraryError, LibraryIndexError

__all__ = ["SCHEMA_VERSION", "INDEX_NAME", "INDEX_FILES", "COLUMNS", "connect", "sqlite_errors",
           "rebuild_hint", "commit", "begin_write", "rollback", "entries", "find", "where",
           "next_version", "insert", "update", "set_tags", "delete"]

SCHEMA_VERSION = 1
INDEX_NAME = "index.sqlite"
#: the index and SQLite's companion files (moved aside together by a rebuild)
INDEX_FILES = (INDEX_NAME, INDEX_NAME + "-wal", INDEX_NAME + "-shm", INDEX_NAME + "-journal")

SCHEMA = """
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

COLUMNS = ("id", "name", "version", "file", "sha256", "size", "model_type", "model_types",
           "model_name", "hidden_size", "num_layers", "num_heads", "head_dim", "layers",
           "n_bank", "task", "description", "shots", "pool_size", "metrics", "extra",
           "created_at", "embedding_dim")


def connect(index: str, root: str, timeout: float) -> sqlite3.Connection:
    """Open (creating or migrating under the write lock) the index at ``index``; errors name
    ``root``. Returns a connection in autocommit mode (transactions are explicit)."""
    with sqlite_errors(index, root, timeout, opening=True):
        conn = sqlite3.connect(index, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
        return _setup(conn, index, root, timeout)


def _setup(conn: sqlite3.Connection, index: str, root: str, timeout: float):
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        deadline = time.monotonic() + timeout
        while True:  # the switch to WAL needs a moment alone with a brand-new file
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        have = conn.execute("PRAGMA user_version").fetchone()[0]
        if have < SCHEMA_VERSION:  # new (or older) index: create/migrate under the lock
            begin_write(conn)
            try:
                have = conn.execute("PRAGMA user_version").fetchone()[0]
                if have < SCHEMA_VERSION:
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                commit(conn)
            except BaseException:
                rollback(conn)
                raise
        if have > SCHEMA_VERSION:
            raise LibraryError(f"{root} was written by a newer m2iv (index schema "
                               f"{have}; this one reads up to {SCHEMA_VERSION})")
    except BaseException:
        conn.close()
        raise
    return conn


def rebuild_hint(root: str) -> str:
    return (f"rebuild it from the stored files (each holds its entry's record): `m2iv library "
            f"verify --rebuild-index --root {root}` (Python: VLibrary.rebuild_index(root))")


@contextlib.contextmanager
def sqlite_errors(index: str, root: str, timeout: float, opening: bool = False):
    """Turn SQLite's exceptions into the library's: a lock held too long, and a corrupt index
    (naming the command that rebuilds it). Other operational errors (disk full, I/O error,
    read-only file) pass unchanged, except while ``opening``."""
    try:
        yield
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise LibraryError(f"{root}: another process has held the library's write lock for "
                               f"more than {timeout:g} s ({err}); try again, or open the "
                               "library with a larger timeout=") from None
        if not opening:
            raise
        raise LibraryError(f"{index}: not a usable SQLite index ({err})") from None
    except sqlite3.DatabaseError as err:  # malformed pages, not a database, truncated
        raise LibraryIndexError(f"{index}: not a usable SQLite index: it is corrupt or "
                                f"truncated ({err}); {rebuild_hint(root)}") from None


def commit(conn: sqlite3.Connection) -> None:
    """COMMIT the open transaction (a separate function so tests can simulate a crash here)."""
    conn.execute("COMMIT")


def begin_write(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``: take the write lock now (waiting up to the busy timeout; inside
    :func:`sqlite_errors` a lock held longer is a clear error)."""
    conn.execute("BEGIN IMMEDIATE")


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def entries(conn: sqlite3.Connection, where: str = "", args: Sequence = (), *,
            embeddings: bool = False) -> list[records.Entry]:
    """The entries (with their tags) selected by ``where``, ordered by name and version."""
    cols = ", ".join(f"e.{c}" for c in COLUMNS) + (", e.embedding" if embeddings else "")
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
        d = dict(zip(COLUMNS, r[:len(COLUMNS)]))
        emb = None
        if embeddings and r[len(COLUMNS)] is not None:
            emb = np.frombuffer(r[len(COLUMNS)], dtype="<f4").astype(np.float32)
        d.update(model_types=tuple(json.loads(d["model_types"])),
                 layers=tuple(json.loads(d["layers"])), metrics=json.loads(d["metrics"]),
                 extra=json.loads(d["extra"]), tags=tuple(sorted(tags.get(d["id"], ()))),
                 description=d["description"] or "")
        out.append(records.Entry(**d, embedding=emb))
    return out


def find(conn: sqlite3.Connection, name: str, version: int | None, root: str, *,
         embeddings: bool = True) -> records.Entry:
    """Entry ``name:version`` (the latest version for ``None``); errors name ``root``."""
    if version is None:
        found = entries(conn, "WHERE e.name = ? AND e.version = "
                        "(SELECT MAX(version) FROM entries WHERE name = ?)",
                        (name, name), embeddings=embeddings)
    else:
        found = entries(conn, "WHERE e.name = ? AND e.version = ?", (name, version),
                        embeddings=embeddings)
    if not found:
        versions = [v for (v,) in conn.execute(
            "SELECT version FROM entries WHERE name = ? ORDER BY version", (name,))]
        if versions:
            raise EntryNotFoundError(f"{name!r} has no version {version} (versions: "
                                     f"{versions})")
        raise EntryNotFoundError(f"no entry named {name!r} in {root}")
    return found[0]


def where(*, name: str | None = None, model_type: str | None = None,
          hidden_size: int | None = None, num_layers: int | None = None,
          task: str | None = None, tags: Sequence[str] = ()) -> tuple[str, list]:
    """A ``WHERE`` clause (for :func:`entries`) matching every filter given; ``model_type``
    matches any type an entry answers to, ``tags`` every tag."""
    clauses, args = [], []
    for column, value in (("name", name), ("hidden_size", hidden_size),
                          ("num_layers", num_layers), ("task", task)):
        if value is not None:
            clauses.append(f"e.{column} = ?")
            args.append(int(value) if column in ("hidden_size", "num_layers") else value)
    if model_type is not None:
        clauses.append("(e.model_type = ? OR EXISTS (SELECT 1 FROM json_each(e.model_types) "
                       "WHERE value = ?))")
        args += [model_type, model_type]
    for t in tags:
        clauses.append("EXISTS (SELECT 1 FROM tags t WHERE t.entry_id = e.id AND t.tag = ?)")
        args.append(t)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def next_version(conn: sqlite3.Connection, name: str) -> int:
    """The version the next add of ``name`` gets (numbers are never reused)."""
    row = conn.execute("SELECT last FROM versions WHERE name = ?", (name,)).fetchone()
    return (row[0] if row else 0) + 1


def insert(conn: sqlite3.Connection, row: dict, tags: Sequence[str]) -> int:
    """Insert an entry row (every column of the schema but ``id``) and its tags; keep the
    name's last version at least this one. Returns the row id."""
    cols = [c for c in COLUMNS if c != "id"] + ["embedding"]
    cur = conn.execute(f"INSERT INTO entries ({', '.join(cols)}) VALUES "
                       f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
    set_tags(conn, cur.lastrowid, tags)
    conn.execute("INSERT INTO versions (name, last) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                 "SET last = MAX(last, excluded.last)", (row["name"], row["version"]))
    return cur.lastrowid


def update(conn: sqlite3.Connection, entry_id: int, changes: dict) -> None:
    """Set the given columns of one entry."""
    if changes:
        sets = ", ".join(f"{c} = ?" for c in changes)
        conn.execute(f"UPDATE entries SET {sets} WHERE id = ?", (*changes.values(), entry_id))


def set_tags(conn: sqlite3.Connection, entry_id: int, tags) -> None:
    """Replace an entry's tags."""
    conn.execute("DELETE FROM tags WHERE entry_id = ?", (entry_id,))
    conn.executemany("INSERT INTO tags (entry_id, tag) VALUES (?, ?)",
                     [(entry_id, t) for t in sorted(tags)])


def delete(conn: sqlite3.Connection, entry_ids: Sequence[int]) -> None:
    """Delete entries (their tags go with them)."""
    conn.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in entry_ids])
