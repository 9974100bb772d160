"""``VLibrary.rebuild_index``: a new index from the stored files alone.

Every file an add stores carries its entry's record (``meta['library']``: name, version, tags,
metrics, extra, model types, embedding, creation time; the descriptive fields are the file's
own metadata) and a checksum, so a corrupt, truncated or deleted index loses nothing the files
hold. What only the index held is lost: edits made with :meth:`VLibrary.update` after an entry
was added (the files are immutable), which is why a healthy index is rebuilt only when forced.

The old index (and its ``-wal``/``-shm`` companions) is moved to ``quarantine/``, never deleted.
Files that no longer load (a checksum mismatch) are quarantined too: left in ``vectors/`` they
would look like orphans, which ``verify(repair=True)`` deletes. Run it while no other process
uses the library (their open connections would keep writing to the moved index).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
import warnings

from .._atomic import fsync_dir
from ..errors import M2IVWarning, VectorsFormatError
from ..vectors import M2IV
from . import files, index
from .errors import LibraryError
from .records import RebuildReport, check_name, from_file_record

__all__ = ["rebuild_index", "index_damage"]


def index_damage(path: str) -> str | None:
    """``None`` if the index at ``path`` passes SQLite's integrity check and every row reads;
    else what is wrong with it."""
    if not os.path.exists(path):
        return "missing"
    conn = None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        problems = [msg for (msg,) in conn.execute("PRAGMA integrity_check") if msg != "ok"]
        if problems:
            return "; ".join(problems[:3])
        for table in ("entries", "tags", "versions"):
            conn.execute(f"SELECT * FROM {table}").fetchall()
    except sqlite3.Error as err:
        return str(err)
    finally:
        if conn is not None:
            conn.close()
    return None


def _old_versions(path: str) -> dict[str, int]:
    """The last version number of each name, as far as the old index can still tell (so a
    version removed before the rebuild is not handed out again)."""
    if not os.path.exists(path):
        return {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return {str(n): int(v) for n, v in conn.execute("SELECT name, last FROM versions")}
        finally:
            conn.close()
    except (sqlite3.Error, TypeError, ValueError):
        return {}


def _move_aside(root: str) -> str | None:
    """Move the index files to ``quarantine/``; the index's new relative path (or None)."""
    stamp = f"{int(time.time())}-{os.getpid()}"
    qdir = os.path.join(root, files.QUARANTINE_DIR)
    moved = None
    for name in index.INDEX_FILES:
        src = os.path.join(root, name)
        if os.path.lexists(src):
            os.makedirs(qdir, exist_ok=True)
            os.replace(src, os.path.join(qdir, f"{stamp}-{name}"))
            if name == index.INDEX_NAME:
                moved = os.path.join(files.QUARANTINE_DIR, f"{stamp}-{name}")
    if moved is not None:
        fsync_dir(qdir)
        fsync_dir(root)
    return moved


def _read_stored(root: str, rep: RebuildReport) -> list[tuple[str, M2IV, str, int, float]]:
    """Every stored file that loads: ``(relative name, vectors, sha256, size, mtime)``; the
    others are quarantined."""
    vectors_dir = os.path.join(root, files.VECTORS_DIR)
    found = []
    for fn in sorted(os.listdir(vectors_dir)):
        path = os.path.join(vectors_dir, fn)
        if not files.STORED_RE.match(fn) or os.path.islink(path) or not os.path.isfile(path):
            continue  # not a library file: verify reports it and moves it aside
        rel = f"{files.VECTORS_DIR}/{fn}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", M2IVWarning)  # older files: no checksum
                v = M2IV.load(path)
        except (VectorsFormatError, OSError) as err:
            moved = files.quarantine(root, path)
            rep.quarantined.append({"file": rel, "moved": moved, "reason": str(err)})
            continue
        sha, size = files.hash_file(path)
        found.append((rel, v, sha, size, os.path.getmtime(path)))
    return found


def _fallback_name(v: M2IV) -> str:
    task = v.meta.get("task")
    try:
        return check_name(task)
    except LibraryError:
        return "recovered"


def _plan(stored, rep: RebuildReport) -> list[tuple]:
    """``(file, sha256, size, version, created_at, row, tags)`` per stored file: records first
    (newest first, so the newest claim of a name and version keeps it), then the rest."""
    taken: dict[str, set[int]] = {}
    planned, later = [], []

    def place(rel, v, sha, size, name, version, record):
        try:
            row, tags = from_file_record(v, name, record)
        except (LibraryError, VectorsFormatError) as err:
            raise LibraryError(f"{rel}: its metadata cannot make an index row ({err}); move "
                               "the file out of the library and rebuild again") from None
        taken.setdefault(name, set()).add(version)
        planned.append((rel, sha, size, version, float(record.get("created_at") or 0), row,
                        tags))

    def created(s) -> float:
        rec = s[1].meta.get("library")
        return float(rec.get("created_at") or 0) if isinstance(rec, dict) else s[4]

    for rel, v, sha, size, mtime in sorted(stored, key=created, reverse=True):
        record = v.meta.get("library")
        if isinstance(record, dict):
            name, version = record.get("name"), record.get("version")
            try:
                check_name(name)
                if not (isinstance(version, int) and version >= 1):
                    raise LibraryError("bad version")
            except LibraryError:
                later.append((rel, v, sha, size, None, record, f"{name}:{version}"))
                continue
            if version in taken.get(name, set()):
                later.append((rel, v, sha, size, name, record, f"{name}:{version}"))
                continue
            place(rel, v, sha, size, name, version, record)
            rep.restored.append(f"{name}:{version}")
            continue
        later.append((rel, v, sha, size, None, {"created_at": mtime}, None))
    for rel, v, sha, size, name, record, claimed in reversed(later):  # oldest first
        name = name or _fallback_name(v)
        version = max(taken.get(name, {0})) + 1
        if claimed is None:
            place(rel, v, sha, size, name, version, dict(record, tags=["recovered"]))
            rep.recovered.append({"file": rel, "ref": f"{name}:{version}"})
        else:
            place(rel, v, sha, size, name, version, record)
            rep.renumbered.append({"file": rel, "claimed": claimed, "ref": f"{name}:{version}"})
    rep.restored.sort()
    return planned


def rebuild_index(root: str, *, force: bool = False, timeout: float = 60.0) -> RebuildReport:
    """Rebuild ``root``'s index from its stored files (module docstring).

    Files with a record get back their name, version, tags, metrics, extra and embedding;
    files stored before records existed are entered under their task's name (else
    ``recovered``) with the next free version and the tag ``recovered``. When two files claim
    the same name and version, the newer keeps it and the older gets the next free one.
    The new index is built beside the old one and renamed over it only when complete.

    Raises:
        LibraryError: ``root`` has no ``vectors/`` directory, or its index is healthy and
            ``force`` is False.
    """
    idx = os.path.join(root, index.INDEX_NAME)
    if not os.path.isdir(os.path.join(root, files.VECTORS_DIR)):
        raise LibraryError(f"{root} is not a VLibrary (no {files.VECTORS_DIR}/ directory): "
                           "there are no stored files to rebuild an index from")
    damage = index_damage(idx)
    if damage is None and not force:
        raise LibraryError(f"{idx} is healthy (SQLite's integrity check passes and every row "
                           "reads); rebuilding it would only drop the edits made with update() "
                           "since the entries were added. Pass force=True to rebuild anyway")
    rep = RebuildReport(root=root, damage=damage)
    planned = _plan(_read_stored(root, rep), rep)

    tmp_dir = os.path.join(root, files.TMP_DIR)
    os.makedirs(tmp_dir, exist_ok=True)
    new = os.path.join(tmp_dir, f"rebuild-{uuid.uuid4().hex}.sqlite")  # verify reaps leftovers
    try:
        conn = index.connect(new, root, timeout)
        try:
            with index.sqlite_errors(new, root, timeout):
                index.begin_write(conn)
                for rel, sha, size, version, created_at, row, tags in planned:
                    index.insert(conn, dict(row, version=version, file=rel, sha256=sha,
                                            size=size, created_at=created_at), tags)
                conn.executemany("INSERT INTO versions (name, last) VALUES (?, ?) ON CONFLICT"
                                 "(name) DO UPDATE SET last = MAX(last, excluded.last)",
                                 list(_old_versions(idx).items()))
                index.commit(conn)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the one file
        finally:
            index.rollback(conn)
            conn.close()
        rep.old_index = _move_aside(root)
        os.replace(new, idx)
        fsync_dir(root)
    finally:
        for leftover in (new, new + "-wal", new + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return rep
