"""Errors raised by :class:`m2iv.VLibrary` (all derive from :class:`m2iv.errors.M2IVError`)."""
from __future__ import annotations

from ..errors import M2IVError, VectorsFormatError

__all__ = ["LibraryError", "EntryNotFoundError", "LibraryIntegrityError", "LibraryIndexError",
           "UnsafePathError", "ControlVectorFormatError"]


class LibraryError(M2IVError):
    """The library itself cannot do what was asked (not a library, bad name, bad argument...)."""


class EntryNotFoundError(LibraryError, KeyError):
    """No entry with that name (and version)."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "entry not found"


class LibraryIntegrityError(LibraryError, VectorsFormatError):
    """A stored file is missing, corrupt (sha256 mismatch) or not where the index says.

    ``VLibrary.verify()`` lists every such problem; ``verify(repair=True)`` fixes the index.
    """


class LibraryIndexError(LibraryError):
    """The SQLite index is corrupt, truncated or missing while stored files exist.

    Every stored file carries its entry's record, so :meth:`VLibrary.rebuild_index`
    (``m2iv library verify --rebuild-index``) rebuilds the index from the files."""


class UnsafePathError(LibraryIntegrityError):
    """A file name from the index or from metadata would leave the library directory
    (absolute path, ``..``, a symbolic link, an unexpected name): refused."""


class ControlVectorFormatError(VectorsFormatError):
    """A GGUF file is not a valid llama.cpp / repeng control vector."""
