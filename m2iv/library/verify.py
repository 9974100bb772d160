"""``VLibrary.verify``: recompute every stored file's hash, find leftovers of crashed adds and
removes, and (with ``repair=True``) clean up, safely while other processes write."""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from .._atomic import fsync_dir
from . import files, index
from .errors import UnsafePathError
from .records import Entry, VerifyReport

if TYPE_CHECKING:
    from .store import VLibrary

__all__ = ["verify"]


def verify(lib: VLibrary, repair: bool = False) -> VerifyReport:
    """Recompute every stored file's sha256 and look for leftovers.

    Reports missing, corrupt and unsafe rows, orphaned and unexpected files, stale staging
    directories and SQLite integrity errors (see :class:`VerifyReport`). With
    ``repair=True``: stale staging directories and orphaned files are deleted (they are
    uncommitted adds or finished removes); unexpected files are moved to ``quarantine/``;
    rows whose file is missing, corrupt or unsafe are dropped from the index (a corrupt
    file is moved to ``quarantine/`` first; restore it from a backup before repairing if
    you have one). Safe to run while other processes add entries.
    """
    rep = VerifyReport(root=lib.root, repair=repair)
    with lib._read() as conn:
        for (msg,) in conn.execute("PRAGMA integrity_check"):
            if msg != "ok":
                rep.index_errors.append(msg)
        for (msg,) in conn.execute("PRAGMA foreign_key_check"):
            rep.index_errors.append(f"foreign key: {msg}")
        entries = index.entries(conn)
    rep.checked = len(entries)
    bad_rows: dict[int, tuple[str, Entry, str]] = {}
    for e in entries:
        try:
            path = lib._safe_path(e.file, e.ref)
        except UnsafePathError as err:
            bad_rows[e.id] = ("unsafe", e, str(err))
            continue
        try:
            sha, size = files.hash_file(path)
        except FileNotFoundError:
            bad_rows[e.id] = ("missing", e, "")
            continue
        if size != e.size:
            bad_rows[e.id] = ("corrupt", e, f"size {size} != {e.size} (truncated?)")
        elif sha != e.sha256:
            bad_rows[e.id] = ("corrupt", e, f"sha256 {sha[:16]}... != {e.sha256[:16]}...")
    named = {e.file for e in entries}
    suspects = []
    for fn in sorted(os.listdir(lib._vectors)):
        rel = f"{files.VECTORS_DIR}/{fn}"
        if rel in named:
            continue
        suspects.append(fn)

    # confirm under the write lock: no add is between its rename and its commit now,
    # no remove between its commit and its unlink has un-done rows we think are missing
    with lib._write() as conn:
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
                    moved = files.quarantine(lib.root, lib._safe_path(e.file, e.ref))
                    rep.repaired.append(f"moved corrupt {e.file} ({e.ref}) to {moved}")
                except (OSError, UnsafePathError) as err:
                    rep.unrepaired.append(f"could not quarantine {e.file}: {err}")
                    continue
            elif kind == "unsafe" and isinstance(e.file, str) and files.FILE_RE.match(e.file):
                # a link (or device...) planted under a valid name: move the link itself
                # aside, never what it points to
                p = os.path.join(lib._vectors, e.file.split("/", 1)[1])
                if os.path.lexists(p):
                    try:
                        moved = files.quarantine(lib.root, p)
                        rep.repaired.append(f"moved {e.file} ({e.ref}, not a regular file) "
                                            f"to {moved}")
                    except OSError as err:
                        rep.unrepaired.append(f"could not quarantine {e.file}: {err}")
                        continue
            conn.execute("DELETE FROM entries WHERE id = ?", (eid,))
            rep.repaired.append(f"dropped index row {e.ref} ({kind} file {e.file})")
        for fn in suspects:
            rel = f"{files.VECTORS_DIR}/{fn}"
            path = os.path.join(lib._vectors, fn)
            if rel in files_now or not os.path.lexists(path):
                continue  # committed or removed meanwhile
            if files.STORED_RE.match(fn) and os.path.isfile(path) and not os.path.islink(path):
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
                        moved = files.quarantine(lib.root, path)
                        rep.repaired.append(f"moved unexpected {rel} to {moved}")
                    except OSError as err:
                        rep.unrepaired.append(f"could not move {rel}: {err}")
        if repair:
            fsync_dir(lib._vectors)
    rep.ok = rep.checked - len(rep.missing) - len(rep.corrupt) - len(rep.unsafe)

    for fn in sorted(os.listdir(lib._tmp)):
        d = os.path.join(lib._tmp, fn)
        state = files.stage_state(d)
        rel = f"{files.TMP_DIR}/{fn}"
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
