"""``torch.library`` registration of the kernel launchers, so ``torch.compile`` can trace them.

Each launcher of a kernel backend becomes one functional op ``m2iv_kernels::<name>`` with a
fake (meta) implementation. Eager calls skip the dispatcher and call the launcher directly.
Why: at decode shapes (T=1, D=4096) a ``custom_op`` call costs ~8 us of host time more than a
direct call, and an ``autograd.Function`` ~3.7 us (``python -m benchmarks.kernels`` measures
both on every run), while a fused kernel at T=1 runs in a few microseconds on a GPU, so the
dispatcher would double the cost of every steered layer. It is used only while
``torch.compile`` traces, where its cost disappears into the compiled graph. The autograd
logic (``ops.py``) is the same on both paths.
"""
from __future__ import annotations

import torch

from ._checks import Rows
from .backends import kernels

__all__ = ["call"]


@torch.library.custom_op("m2iv_kernels::steer_fwd", mutates_args=())
def _steer_fwd(x: torch.Tensor, residual: torch.Tensor | None, vectors: torch.Tensor,
               gates: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None,
               rows_per_seq: int, backend: str) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    kernels(backend).steer_fwd(x, residual, out, vectors, gates,
                               Rows(mask, index, rows_per_seq, vectors.shape[0]))
    return out


@_steer_fwd.register_fake
def _(x, residual, vectors, gates, mask, index, rows_per_seq, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("m2iv_kernels::steer_colsum", mutates_args=())
def _steer_colsum(grad: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None,
                  rows_per_seq: int, n_bank: int, backend: str) -> torch.Tensor:
    return kernels(backend).steer_colsum(grad, Rows(mask, index, rows_per_seq, n_bank))


@_steer_colsum.register_fake
def _(grad, mask, index, rows_per_seq, n_bank, backend):
    return grad.new_empty(n_bank, grad.shape[-1], dtype=torch.float32)


@torch.library.custom_op("m2iv_kernels::rmsnorm_fwd", mutates_args=())
def _rmsnorm_fwd(residual: torch.Tensor, x: torch.Tensor, vectors: torch.Tensor,
                 gates: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                 mask: torch.Tensor | None, index: torch.Tensor | None, rows_per_seq: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels(backend).rmsnorm_fwd(residual, x, vectors, gates, weight, eps,
                                        weight_offset,
                                        Rows(mask, index, rows_per_seq, vectors.shape[0]))


@_rmsnorm_fwd.register_fake
def _(residual, x, vectors, gates, weight, eps, weight_offset, mask, index, rows_per_seq,
      backend):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out, torch.empty_like(out), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("m2iv_kernels::rmsnorm_bwd", mutates_args=())
def _rmsnorm_bwd(grad_normed: torch.Tensor, grad_residual: torch.Tensor | None,
                 new_residual: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                 weight_offset: float, mask: torch.Tensor | None, index: torch.Tensor | None,
                 rows_per_seq: int, n_bank: int, need_dw: bool, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dy, dw, g = kernels(backend).rmsnorm_bwd(grad_normed, grad_residual, new_residual, rstd,
                                             weight, weight_offset, need_dw,
                                             Rows(mask, index, rows_per_seq, n_bank))
    return dy, (dw if dw is not None else g.new_empty(0)), g


@_rmsnorm_bwd.register_fake
def _(grad_normed, grad_residual, new_residual, rstd, weight, weight_offset, mask, index,
      rows_per_seq, n_bank, need_dw, backend):
    c = new_residual.shape[-1]
    return (torch.empty_like(new_residual), new_residual.new_empty(c if need_dw else 0,
            dtype=torch.float32), new_residual.new_empty(n_bank, c, dtype=torch.float32))


def call(backend: str, name: str, *args):
    """Run launcher ``name`` of ``backend``: directly in eager, as a registered op when
    ``torch.compile`` is tracing. ``args`` follow the launcher contract, ``Rows`` last."""
    if not torch.compiler.is_compiling():
        return getattr(kernels(backend), name)(*args)
    *head, meta = args
    if name == "steer_fwd":
        x, residual, out, vectors, gates = head
        return out.copy_(_steer_fwd(x, residual, vectors, gates, meta.mask, meta.index,
                                    meta.rows_per_seq, backend))
    if name == "steer_colsum":
        return _steer_colsum(head[0], meta.mask, meta.index, meta.rows_per_seq, meta.n_bank,
                             backend)
    if name == "rmsnorm_fwd":
        return _rmsnorm_fwd(*head, meta.mask, meta.index, meta.rows_per_seq, backend)
    if name == "rmsnorm_bwd":
        *tensors, need_dw = head
        dy, dw, g = _rmsnorm_bwd(*tensors, meta.mask, meta.index, meta.rows_per_seq,
                                 meta.n_bank, need_dw, backend)
        return dy, (dw if need_dw else None), g
    raise ValueError(f"unknown launcher {name!r}")
