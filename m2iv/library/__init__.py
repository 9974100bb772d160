"""VLibrary: a durable local store of trained M2IV vectors (see :mod:`m2iv.library.store`),
with GGUF control-vector interop (:mod:`m2iv.library.gguf_io`).

    from m2iv.library import VLibrary          # also `from m2iv import VLibrary`
    lib = VLibrary("~/m2iv-lib")
    lib.add(vectors, "vqa", tags=["vqa"], embedding=embed_task(model, demos))
    hits = lib.search(embed_task(model, my_examples), k=3, compatible_with=model)
    v = lib.compose({hits[0].entry.ref: 1.0, "safety": 0.5}, model=model)
"""
from .errors import (ControlVectorFormatError, EntryNotFoundError, LibraryError,
                     LibraryIntegrityError, UnsafePathError)
from .spec import ModelSpec, incompatibility
from .store import (Entry, SearchResult, VerifyReport, VLibrary, default_library_path,
                    parse_ref)

__all__ = ["VLibrary", "Entry", "SearchResult", "VerifyReport", "ModelSpec", "incompatibility",
           "default_library_path", "parse_ref", "LibraryError", "EntryNotFoundError",
           "LibraryIntegrityError", "UnsafePathError", "ControlVectorFormatError"]
