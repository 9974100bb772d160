"""The exceptions (and the warning class) of ``m2iv``.

Every error derives from :class:`M2IVError`; the value errors also derive from ``ValueError`` so
that code catching ``ValueError`` keeps working. The ``m2iv`` command turns any of them into one
line on stderr (:mod:`m2iv.cli.errors`).
"""
from __future__ import annotations

__all__ = ["M2IVError", "VectorsMismatchError", "IncompatibleVectorsError", "VectorsFormatError",
           "UnsupportedModelError", "MissingDependencyError", "M2IVWarning"]


class M2IVError(Exception):
    """Base class of every error raised by ``m2iv``."""


class VectorsMismatchError(M2IVError, ValueError):
    """Vectors do not fit a model (layer count, heads, head_dim, hidden size or model type)."""


class IncompatibleVectorsError(M2IVError, ValueError):
    """Two vector sets cannot be combined (different layers, shapes or model)."""


class VectorsFormatError(M2IVError, ValueError):
    """A vectors object or file is malformed: bad shapes, dtype, device, metadata, NaN/inf,
    corruption (a checksum mismatch)."""


class UnsupportedModelError(M2IVError, ValueError):
    """m2iv cannot steer the model: no text decoder layers found, or a layer whose shape or
    forward matches no layer style (``m2iv/patch/styles.py``)."""


class MissingDependencyError(M2IVError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it
    (:func:`m2iv._extras.require`)."""


class M2IVWarning(UserWarning):
    """Something worked but deserves attention (an unverifiable file, an approximation)."""
