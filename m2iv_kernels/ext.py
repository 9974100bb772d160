"""The C++/CUDA extension backend: launchers over the compiled ``csrc/`` kernels.

Importing this module loads the extension (``ext_build.py`` builds it on first use). Nothing
here raises: when the extension cannot be used, :data:`UNAVAILABLE` holds the one-line reason
and ``backends.py`` reports it. Launchers follow the contract in ``backends.py`` and are one
pybind call each: the C++ side takes the activations in their own shape, allocates the outputs
and checks every layout again (cheaply), so a wrong call fails with an error, never bad memory.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ._checks import Rows
from .ext_build import BUILD, Unavailable, load

try:
    _C = load()
    UNAVAILABLE: str | None = None
except Unavailable as _err:
    _C = None
    UNAVAILABLE = str(_err)

FINGERPRINT = "ext:" + Path(BUILD.get("dir", "unbuilt")).name


def supports(device: torch.device) -> str | None:
    """None when the loaded extension runs on ``device``, else why not."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if BUILD.get("cuda"):
            return None
        return f"the extension was built without CUDA: {BUILD.get('cuda_reason')}"
    return f"the extension has no kernels for {device.type} devices"


def steer_fwd(x: torch.Tensor, residual: torch.Tensor | None, vectors: torch.Tensor,
              gates: torch.Tensor, meta: Rows, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out = [residual +] x + mask * gates * vectors`` (out may be x or residual)."""
    return _C.steer_fwd(x, residual, vectors, gates, meta.mask, meta.index, meta.rows_per_seq,
                        out)


def steer_colsum(grad: torch.Tensor, meta: Rows) -> torch.Tensor:
    """``[N, C]`` fp32: per bank row, the sum over its rows of ``mask * grad``."""
    return _C.steer_colsum(grad, meta.mask, meta.index, meta.rows_per_seq, meta.n_bank)


def rmsnorm_fwd(residual: torch.Tensor, x: torch.Tensor, vectors: torch.Tensor,
                gates: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                meta: Rows, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(normed, new_residual, rstd)``; ``new_residual`` written into ``out`` when given."""
    return _C.rmsnorm_fwd(residual, x, vectors, gates, weight, eps, weight_offset, meta.mask,
                          meta.index, meta.rows_per_seq, out)


def rmsnorm_bwd(grad_normed: torch.Tensor, grad_residual: torch.Tensor | None,
                new_residual: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                weight_offset: float, need_dw: bool, meta: Rows
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(d new_residual, d weight [C] fp32 or None, per-bank sums [N, C] fp32)``."""
    dy, dw, g = _C.rmsnorm_bwd(grad_normed, grad_residual, new_residual, rstd, weight,
                               float(weight_offset), bool(need_dw), meta.mask, meta.index,
                               meta.rows_per_seq, meta.n_bank)
    return dy, (dw if need_dw else None), g
