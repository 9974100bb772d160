"""The exceptions raised by ``m2iv``.

Every error derives from :class:`M2IVError`; the value errors also derive from ``ValueError`` so
that code catching ``ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = ["M2IVError", "VectorsMismatchError", "IncompatibleVectorsError", "VectorsFormatError",
           "UnsupportedModelError"]


class M2IVError(Exception):
    """Base class of every error raised by ``m2iv``."""


class VectorsMismatchError(M2IVError, ValueError):
    """Vectors do not fit a model (layer count, heads, head_dim or hidden size differ)."""


class IncompatibleVectorsError(M2IVError, ValueError):
    """Two vector sets cannot be combined (different layers, shapes or model)."""


class VectorsFormatError(M2IVError, ValueError):
    """A vectors object or file is malformed: bad shapes, dtype, metadata, NaN/inf, corruption."""


class UnsupportedModelError(M2IVError, ValueError):
    """The model's architecture is not in the family table (``m2iv/families.py``)."""
