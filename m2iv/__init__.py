"""m2iv: multimodal in-context vectors (M2IV) for vision-language models.

    import m2iv
    vectors = m2iv.M2IV.load("task.safetensors")
    handle = m2iv.patch_model(model, vectors)      # every forward / generate() is steered
    ...
    m2iv.unpatch_model(model)                      # or: with m2iv.steer(model, vectors): ...

The public names below are imported on first use, so ``import m2iv`` (and the ``m2iv --help``
command) does not import torch.
"""
from ._lazy import lazy_attributes
from ._version import __version__
from .errors import (IncompatibleVectorsError, M2IVError, M2IVWarning, MissingDependencyError,
                     UnsupportedModelError, VectorsFormatError, VectorsMismatchError)

# public name -> the module defining it (imported by __getattr__ on first access)
_LAZY = {"M2IV": ".vectors", "patch_model": ".patch", "unpatch_model": ".patch",
         "steer": ".patch", "PatchHandle": ".patch", "VLibrary": ".library"}

__all__ = ["M2IV", "patch_model", "unpatch_model", "steer", "PatchHandle", "VLibrary",
           "M2IVError", "VectorsMismatchError", "IncompatibleVectorsError", "VectorsFormatError",
           "UnsupportedModelError", "MissingDependencyError", "M2IVWarning", "__version__"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
