"""The one op registry: ``torch.ops.m2iv_kernels.*``, so ``torch.compile`` can trace the
launchers of every kernel backend.

Each launcher of the contract in ``backends.py`` is one functional op with a fake (meta)
implementation; the backend is an argument, so one registration serves every backend. The ops
are defined with ``torch.library.Library`` (schema, one CompositeExplicitAutograd kernel,
``register_fake``): the autograd logic lives in ``ops.py`` and is the same eager and compiled.

Why one Python-defined registry, and why eager calls bypass it. Host cost per call of each
mechanism on the same trivial body at T=1, D=4096 on the CPU, over a direct pybind call
(median of interleaved repetitions; ``python -m benchmarks.kernels --only registry``,
``benchmarks/results/kernels-cpu-2026-12-03-registry.json``): a C++ ``TORCH_LIBRARY`` op
+1.5 us, a ``torch.library.Library`` op with a Python kernel +3.0 us, a
``torch.library.custom_op`` +13.9 us. A C++ registry can serve only the extension (the Triton
launchers are Python), so keeping it means two registries; ``custom_op`` costs ~5x what
``Library`` does for nothing these ops need. A fused kernel at T=1 runs in a few microseconds
on a GPU, so eager calls go straight to the launchers (the same functions the registered ops
call); the registry is used only while ``torch.compile`` traces, where its cost is paid once
per op in a compiled graph, or vanishes into a CUDA graph.
"""
from __future__ import annotations

import torch

from ._checks import Rows, n_bank
from .backends import launchers

__all__ = ["steer_fwd", "steer_colsum", "rmsnorm_fwd", "rmsnorm_bwd"]

_LIB = torch.library.Library("m2iv_kernels", "DEF")
_OPS = torch.ops.m2iv_kernels


def _register(schema: str, kernel, fake) -> None:
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"m2iv_kernels::{name}", fake, lib=_LIB)


def _steer_fwd(x, residual, vectors, gates, mask, index, rows_per_seq, backend):
    meta = Rows(mask, index, rows_per_seq, n_bank(vectors))
    return launchers(backend).steer_fwd(x, residual, vectors, gates, meta)


def _steer_fwd_fake(x, residual, vectors, gates, mask, index, rows_per_seq, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _steer_colsum(grad, mask, index, rows_per_seq, n_bank, backend):
    return launchers(backend).steer_colsum(grad, Rows(mask, index, rows_per_seq, n_bank))


def _steer_colsum_fake(grad, mask, index, rows_per_seq, n_bank, backend):
    return grad.new_empty(n_bank, grad.shape[-1], dtype=torch.float32)


def _rmsnorm_fwd(residual, x, vectors, gates, weight, eps, weight_offset, mask, index,
                 rows_per_seq, backend):
    meta = Rows(mask, index, rows_per_seq, n_bank(vectors))
    return launchers(backend).rmsnorm_fwd(residual, x, vectors, gates, weight, eps,
                                          weight_offset, meta)


def _rmsnorm_fwd_fake(residual, x, vectors, gates, weight, eps, weight_offset, mask, index,
                      rows_per_seq, backend):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out, torch.empty_like(out), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rmsnorm_bwd(grad_normed, grad_residual, new_residual, rstd, weight, weight_offset, mask,
                 index, rows_per_seq, n_bank, need_dw, backend):
    dy, dw, g = launchers(backend).rmsnorm_bwd(grad_normed, grad_residual, new_residual, rstd,
                                               weight, weight_offset, need_dw,
                                               Rows(mask, index, rows_per_seq, n_bank))
    return dy, (dw if dw is not None else g.new_empty(0)), g


def _rmsnorm_bwd_fake(grad_normed, grad_residual, new_residual, rstd, weight, weight_offset,
                      mask, index, rows_per_seq, n_bank, need_dw, backend):
    c = new_residual.shape[-1]
    return (torch.empty_like(new_residual), new_residual.new_empty(c if need_dw else 0,
            dtype=torch.float32), new_residual.new_empty(n_bank, c, dtype=torch.float32))


_register("steer_fwd(Tensor x, Tensor? residual, Tensor vectors, Tensor gates, Tensor? mask, "
          "Tensor? index, int rows_per_seq, str backend) -> Tensor", _steer_fwd, _steer_fwd_fake)
_register("steer_colsum(Tensor grad, Tensor? mask, Tensor? index, int rows_per_seq, "
          "int n_bank, str backend) -> Tensor", _steer_colsum, _steer_colsum_fake)
_register("rmsnorm_fwd(Tensor residual, Tensor x, Tensor vectors, Tensor gates, Tensor weight, "
          "float eps, float weight_offset, Tensor? mask, Tensor? index, int rows_per_seq, "
          "str backend) -> (Tensor, Tensor, Tensor)", _rmsnorm_fwd, _rmsnorm_fwd_fake)
_register("rmsnorm_bwd(Tensor grad_normed, Tensor? grad_residual, Tensor new_residual, "
          "Tensor rstd, Tensor weight, float weight_offset, Tensor? mask, Tensor? index, "
          "int rows_per_seq, int n_bank, bool need_dw, str backend) -> (Tensor, Tensor, Tensor)",
          _rmsnorm_bwd, _rmsnorm_bwd_fake)


# ---- The entry points ``ops.py`` calls: the launcher in eager, the registered op in a trace.

def steer_fwd(backend: str, x: torch.Tensor, residual: torch.Tensor | None,
              vectors: torch.Tensor, gates: torch.Tensor, meta: Rows,
              out: torch.Tensor | None = None) -> torch.Tensor:
    if not torch.compiler.is_compiling():
        return launchers(backend).steer_fwd(x, residual, vectors, gates, meta, out)
    y = _OPS.steer_fwd(x, residual, vectors, gates, meta.mask, meta.index, meta.rows_per_seq,
                       backend)
    return y if out is None else out.copy_(y)


def steer_colsum(backend: str, grad: torch.Tensor, meta: Rows) -> torch.Tensor:
    if not torch.compiler.is_compiling():
        return launchers(backend).steer_colsum(grad, meta)
    return _OPS.steer_colsum(grad, meta.mask, meta.index, meta.rows_per_seq, meta.n_bank,
                             backend)


def rmsnorm_fwd(backend: str, residual: torch.Tensor, x: torch.Tensor, vectors: torch.Tensor,
                gates: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                meta: Rows, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not torch.compiler.is_compiling():
        return launchers(backend).rmsnorm_fwd(residual, x, vectors, gates, weight, eps,
                                              weight_offset, meta, out)
    normed, new_res, rstd = _OPS.rmsnorm_fwd(residual, x, vectors, gates, weight, eps,
                                             weight_offset, meta.mask, meta.index,
                                             meta.rows_per_seq, backend)
    return normed, (new_res if out is None else out.copy_(new_res)), rstd


def rmsnorm_bwd(backend: str, grad_normed: torch.Tensor, grad_residual: torch.Tensor | None,
                new_residual: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                weight_offset: float, need_dw: bool, meta: Rows
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if not torch.compiler.is_compiling():
        return launchers(backend).rmsnorm_bwd(grad_normed, grad_residual, new_residual, rstd,
                                              weight, weight_offset, need_dw, meta)
    dy, dw, g = _OPS.rmsnorm_bwd(grad_normed, grad_residual, new_residual, rstd, weight,
                                 weight_offset, meta.mask, meta.index, meta.rows_per_seq,
                                 meta.n_bank, need_dw, backend)
    return dy, (dw if need_dw else None), g
