"""VLibrary: the library's API (read, search, add, update, remove, combine, interop). The
index lives in :mod:`.index`, the files in :mod:`.files`, ``verify`` in :mod:`.verify`; the
layout and the durability protocol are described in :mod:`m2iv.library`.

(Over 500 lines on purpose: one public class, and every method is a short composition of the
index, the files and the fit rule under one lock discipline, which reads best in one place.)"""
from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._atomic import fsync_dir
from ..errors import IncompatibleVectorsError, VectorsFormatError, VectorsMismatchError
from ..vectors import M2IV
from . import files, index
from .errors import EntryNotFoundError, LibraryError, LibraryIntegrityError, UnsafePathError
from .records import (Entry, RebuildReport, SearchResult, VerifyReport, as_embedding,
                      check_tags, default_library_path, file_record, new_entry, parse_ref,
                      to_json)
from ..families.fit import ModelSpec, incompatibility

__all__ = ["VLibrary"]

#: how many times an add re-stages when other processes keep taking its version number
_ADD_ATTEMPTS = 100


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
        self._index = os.path.join(self.root, index.INDEX_NAME)
        self._vectors = os.path.join(self.root, files.VECTORS_DIR)
        self._tmp = os.path.join(self.root, files.TMP_DIR)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._pid = None
        files.prepare_root(self.root, index.INDEX_NAME, create)
        self._conn()  # opens and migrates the index now, so errors surface here

    # ------------------------------------------------------------------ connection

    def _conn(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # a connection never crosses a fork
            self._db, self._pid = index.connect(self._index, self.root, self.timeout), os.getpid()
        return self._db

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

    def _sql(self):
        """SQLite's errors as the library's (a corrupt index names the rebuild command)."""
        return index.sqlite_errors(self._index, self.root, self.timeout)

    @contextlib.contextmanager
    def _write(self):
        """A write transaction (``BEGIN IMMEDIATE``: the write lock is taken at once)."""
        with self._lock, self._sql():
            conn = self._conn()
            index.begin_write(conn)
            try:
                yield conn
                index.commit(conn)
            except BaseException:
                index.rollback(conn)
                raise

    @contextlib.contextmanager
    def _read(self):
        """A read transaction: one consistent snapshot."""
        with self._lock, self._sql():
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                index.rollback(conn)

    # ------------------------------------------------------------------ paths

    def _safe_path(self, rel: str, ref: str = "?") -> str:
        return files.safe_path(self._vectors, rel, ref)

    # ------------------------------------------------------------------ reading

    def entry(self, name: str, version: int | str | None = None) -> Entry:
        """The index entry for ``name`` (``"name:3"`` works too); the latest version by default.

        Raises:
            EntryNotFoundError: no such name or version.
        """
        name, version = parse_ref(name, version)
        with self._read() as conn:
            return index.find(conn, name, version, self.root)

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
            sha, size = files.hash_file(path)
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
        try:  # the file's sha256 was just checked: no second (checksum) pass
            v = M2IV.load(path, device=device, dtype=dtype, verify=False)
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
        sql, args = index.where(name=name, model_type=model_type, hidden_size=hidden_size,
                                num_layers=num_layers, task=task, tags=check_tags(tags))
        with self._read() as conn:
            found = index.entries(conn, sql, args, embeddings=embeddings)
        if compatible_with is not None:
            spec = ModelSpec.of(compatible_with)
            found = [e for e in found if incompatibility(e.model_spec(), spec) is None]
        return _latest(found) if latest_only else found

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
            found = _latest(found)
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
        to_store, row, tag_list = new_entry(
            vectors, name, tags=tags, task=task, description=description, shots=shots,
            pool_size=pool_size, metrics=metrics, embedding=embedding, model=model,
            model_name=model_name, extra=extra)
        with self._lock:
            for _ in range(_ADD_ATTEMPTS):
                with self._read() as conn:
                    version = index.next_version(conn, name)
                row = dict(row, version=version, created_at=time.time())
                # the file carries its own index row: rebuild_index needs nothing else
                to_store.meta["library"] = file_record(row, tag_list)
                if self._commit_add(to_store, row, tag_list):
                    return self.entry(name, version)
        raise LibraryError(f"could not add {name!r}: other processes kept taking its next "
                           f"version ({_ADD_ATTEMPTS} attempts); try again")

    def _commit_add(self, to_store: M2IV, row: dict, tag_list: tuple[str, ...]) -> bool:
        """Steps 1-4 of the durability protocol (:mod:`m2iv.library`); False (nothing stored)
        if another process took ``row['version']`` since it was read."""
        uid, stage_dir, staged, sha, size, lock_fd = files.stage(self._tmp, to_store)
        try:
            rel = f"{files.VECTORS_DIR}/{uid}.safetensors"
            final = os.path.join(self._vectors, f"{uid}.safetensors")
            with self._sql():
                conn = self._conn()
                index.begin_write(conn)
                moved = False
                try:
                    if index.next_version(conn, row["name"]) != row["version"]:
                        index.rollback(conn)
                        return False
                    os.replace(staged, final)
                    moved = True
                    fsync_dir(self._vectors)
                    index.insert(conn, dict(row, file=rel, sha256=sha, size=size), tag_list)
                    index.commit(conn)
                except BaseException:
                    index.rollback(conn)
                    if moved:  # undo the rename; if we die first, verify finds an orphan
                        with contextlib.suppress(OSError):
                            os.unlink(final)
                        fsync_dir(self._vectors)
                    raise
        finally:
            files.unstage(stage_dir, lock_fd)
        return True

    def add_file(self, path: str | os.PathLike, name: str, **kw) -> Entry:
        """Add the vectors of an M2IV safetensors file (see :meth:`add` for the keywords).

        Pickles, zip archives (``torch.save``), GGUF, foreign safetensors, truncated and
        corrupt files are refused with :class:`VectorsFormatError`; nothing is unpickled.
        """
        path = os.fspath(path)
        files.sniff(path)
        return self.add(M2IV.load(path), name, **kw)

    def update(self, name: str, version: int | str | None = None, *,
               tags: Iterable[str] | str | None = None, add_tags: Iterable[str] | str | None = None,
               remove_tags: Iterable[str] | str | None = None, task: str | None = None,
               description: str | None = None, metrics: Mapping[str, Any] | None = None,
               embedding=None, clear_embedding: bool = False) -> Entry:
        """Change an entry's descriptive fields (the stored file is immutable; the index is
        authoritative and :meth:`get` applies task/description to the loaded ``meta``)."""
        name, version = parse_ref(name, version)
        changes: dict[str, Any] = {}
        if task is not None:
            changes["task"] = task
        if description is not None:
            changes["description"] = description
        if metrics is not None:
            changes["metrics"] = to_json(dict(metrics), "metrics")
        if embedding is not None:
            emb = as_embedding(embedding)
            changes.update(embedding=emb.tobytes(), embedding_dim=int(emb.size))
        elif clear_embedding:
            changes.update(embedding=None, embedding_dim=None)
        with self._write() as conn:
            e = index.find(conn, name, version, self.root, embeddings=False)
            index.update(conn, e.id, changes)
            new_tags = set(e.tags) if tags is None else set(check_tags(tags))
            new_tags |= set(check_tags(add_tags))
            new_tags -= set(check_tags(remove_tags))
            if new_tags != set(e.tags):
                index.set_tags(conn, e.id, new_tags)
        return self.entry(name, e.version)

    def remove(self, name: str, version: int | str | None = None, *,
               all_versions: bool = False) -> list[Entry]:
        """Remove one version (``"name:3"`` or ``version=3``) or, with ``all_versions=True``,
        every version of ``name``. Returns the removed entries. Version numbers are never
        reused. The row goes first (committed), the file after: a crash in between leaves an
        orphaned file that ``verify`` reports and repairs.
        """
        name, version = parse_ref(name, version)
        with self._write() as conn:
            if version is None and not all_versions:
                have = [e.version for e in index.entries(conn, "WHERE e.name = ?", (name,))]
                if not have:
                    raise EntryNotFoundError(f"no entry named {name!r} in {self.root}: "
                                             "nothing removed")
                raise LibraryError(f"remove needs a version ({name}:N; {name!r} has versions "
                                   f"{have}) or all_versions=True for all of them")
            if version is None:
                gone = index.entries(conn, "WHERE e.name = ?", (name,))
                if not gone:
                    raise EntryNotFoundError(f"no entry named {name!r} in {self.root}: "
                                             "nothing removed")
            else:
                gone = [index.find(conn, name, version, self.root, embeddings=False)]
            index.delete(conn, [e.id for e in gone])
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

    def verify(self, repair: bool = False) -> VerifyReport:
        """Recompute every stored file's sha256 and look for leftovers; see
        :func:`m2iv.library.verify.verify` (``repair=True`` cleans up)."""
        from .verify import verify

        return verify(self, repair)

    @staticmethod
    def rebuild_index(path: str | os.PathLike | None = None, *, force: bool = False,
                      timeout: float = 60.0) -> RebuildReport:
        """Rebuild the index of the library at ``path`` from its stored files (a corrupt,
        truncated or deleted index); see :func:`m2iv.library.rebuild.rebuild_index`. A
        healthy index is rebuilt only with ``force=True``. Run it while no other process uses
        the library."""
        from .rebuild import rebuild_index

        path = default_library_path() if path is None else os.fspath(path)
        return rebuild_index(os.path.realpath(os.path.abspath(os.path.expanduser(path))),
                             force=force, timeout=timeout)


def _latest(entries: list[Entry]) -> list[Entry]:
    """The newest version of each name (``entries`` ordered by name, then version)."""
    latest: dict[str, Entry] = {}
    for e in entries:
        latest[e.name] = e
    return list(latest.values())
