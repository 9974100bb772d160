"""m2iv: multimodal in-context vectors (M2IV) for vision-language models.

    import m2iv
    vectors = m2iv.M2IV.load("task.safetensors")
    handle = m2iv.patch_model(model, vectors)      # every forward / generate() is steered
    ...
    m2iv.unpatch_model(model)                      # or: with m2iv.steer(model, vectors): ...
"""
from ._version import __version__
from .errors import (IncompatibleVectorsError, M2IVError, UnsupportedModelError,
                     VectorsFormatError, VectorsMismatchError)
from .library import VLibrary
from .patch import PatchHandle, patch_model, steer, unpatch_model
from .vectors import M2IV

__all__ = ["M2IV", "patch_model", "unpatch_model", "steer", "PatchHandle", "VLibrary",
           "M2IVError", "VectorsMismatchError", "IncompatibleVectorsError", "VectorsFormatError",
           "UnsupportedModelError", "__version__"]
