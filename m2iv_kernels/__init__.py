"""Fused steering ops for transformer decoder layers (Triton, C++/CUDA, PyTorch reference).

``m2iv_kernels`` does not import ``triton`` or ``transformers`` at import time.
"""
from .backends import available_backends, resolve_backend
from .ops import head_steer, steer_add, steer_add_rmsnorm

__all__ = ["head_steer", "steer_add", "steer_add_rmsnorm", "available_backends",
           "resolve_backend"]
__version__ = "0.1.0"
