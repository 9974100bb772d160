"""VLibrary: a durable local store of trained M2IV vectors, with GGUF control-vector interop
(:mod:`.gguf_io`). The API is :class:`~.store.VLibrary`; the SQLite index is :mod:`.index`, the
files :mod:`.files`, ``verify`` :mod:`.verify`, what vectors fit :mod:`m2iv.families.fit`.

    from m2iv.library import VLibrary          # also `from m2iv import VLibrary`
    lib = VLibrary("~/m2iv-lib")
    lib.add(vectors, "vqa", tags=["vqa"], embedding=embed_task(model, demos))
    hits = lib.search(embed_task(model, my_examples), k=3, compatible_with=model)
    v = lib.compose({hits[0].entry.ref: 1.0, "safety": 0.5}, model=model)

Layout of a library directory::

    index.sqlite (+ -wal, -shm)   the index (SQLite, WAL mode)
    vectors/<32 hex>.safetensors  one immutable file per entry (written by M2IV.save)
    tmp/<32 hex>/                 staging area of adds in progress (a held flock marks it live)
    quarantine/                   corrupt or unexpected files moved aside by verify(repair=True),
                                  old indexes moved aside by rebuild_index

Durability protocol of :meth:`VLibrary.add`:

1. the vectors are saved into a private staging directory ``tmp/<id>/`` (``M2IV.save``: temp
   file, fsync, rename) and read back: sha256 and size are computed and the file is checked to
   load;
2. ``BEGIN IMMEDIATE`` takes SQLite's write lock; the next version number for the name is read;
3. the staged file is renamed to ``vectors/<id>.safetensors`` and the directory is fsynced;
4. the index row (and its tags) is inserted and the transaction committed (``synchronous=FULL``).

The version is read in step 2 before staging too, because the staged file carries its entry's
whole index row (``meta['library']``; if another process took that version meanwhile, the add
stages again); with the files' checksums this lets :meth:`VLibrary.rebuild_index` (``m2iv
library verify --rebuild-index``) rebuild a corrupt, truncated or lost index from the files
alone (:mod:`.rebuild`). A corrupt index is reported as :class:`LibraryIndexError` naming that
command, never as a raw ``sqlite3`` error.

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
from .errors import (ControlVectorFormatError, EntryNotFoundError, LibraryError,
                     LibraryIndexError, LibraryIntegrityError, UnsafePathError)
from ..families.fit import ModelSpec, incompatibility
from .records import (Entry, RebuildReport, SearchResult, VerifyReport, default_library_path,
                      parse_ref)
from .store import VLibrary

__all__ = ["VLibrary", "Entry", "SearchResult", "VerifyReport", "RebuildReport", "ModelSpec",
           "incompatibility", "default_library_path", "parse_ref", "LibraryError",
           "EntryNotFoundError", "LibraryIntegrityError", "LibraryIndexError", "UnsafePathError",
           "ControlVectorFormatError"]
