"""The public ops: validation, backend choice, and one autograd path for every kernel backend.

Internally every op works on a bank ``vectors [N, H, Dh]`` with ``gates [N, H]``; the residual
ops are the case ``H = 1, Dh = D``. Forward saves no activation except ``new_residual`` and the
per-row ``rstd`` of the RMSNorm op, so steering adds no activation memory to training.

Every call validates everything (``_checks.py``). A caller that validated once and calls the
same op on every decode step (m2iv's patched layers) uses :mod:`m2iv_kernels.prepared` instead.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import reference
from ._checks import (KERNEL_DTYPES, as_rows, check_finite_gates, check_same, check_steering,
                      check_writable, has_row_view, n_bank, row_meta)
from .backends import resolve, uses_launchers
from . import custom_ops as kernel

__all__ = ["head_steer", "steer_add", "steer_add_rmsnorm"]


def _vector_grads(ctx, g_sum: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d vectors, d gates from the per-bank fp32 sums ``g_sum [N, C]`` of mask * grad."""
    vectors, gates = ctx.saved_tensors[:2]
    g_sum = g_sum.view(vectors.shape)
    dv = (gates.float()[..., None] * g_sum).to(vectors.dtype) if ctx.needs_vec else None
    dg = (vectors.float() * g_sum).sum(-1).to(gates.dtype) if ctx.needs_gate else None
    return dv, dg


def _rows_or_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when it has a row view (the kernels read it in place), else a copy."""
    return t if t is None or has_row_view(t) else t.contiguous()


def _steer_forward(x, residual, vectors, gates, mask, index, inplace: bool, backend: str):
    """Launch the steer kernel; returns ``(out, row metadata)``. In place, the result goes into
    ``residual`` when there is one (steer_add), else into ``x`` (head_steer)."""
    meta = row_meta(x, mask, index, n_bank(vectors))
    target = (residual if residual is not None else x) if inplace else None
    # write straight into the target where it has a row view (and Dynamo need not prove it)
    direct = target is not None and not torch.compiler.is_compiling() and has_row_view(target)
    out = kernel.steer_fwd(backend, _rows_or_copy(x), _rows_or_copy(residual), vectors, gates,
                           meta, out=target if direct else None)
    return (target.copy_(out) if target is not None and not direct else out), meta


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must record the op (inference skips ``autograd.Function``'s cost)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Steer(torch.autograd.Function):
    """``out = [residual +] x + mask * gates * vectors`` (head steer, or steer-add)."""

    @staticmethod
    def forward(ctx, x, residual, vectors, gates, mask, index, inplace: bool, backend: str):
        out, meta = _steer_forward(x, residual, vectors, gates, mask, index, inplace, backend)
        if inplace:
            ctx.mark_dirty(residual if residual is not None else x)
        ctx.save_for_backward(vectors, gates)
        ctx.meta, ctx.backend = meta, backend
        ctx.needs_vec, ctx.needs_gate = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        return out

    @staticmethod
    def backward(ctx, grad):
        dv = dg = None
        if ctx.needs_vec or ctx.needs_gate:
            g_sum = kernel.steer_colsum(ctx.backend, as_rows(grad), ctx.meta)
            dv, dg = _vector_grads(ctx, g_sum)
        grad_res = grad if ctx.needs_input_grad[1] else None
        return grad, grad_res, dv, dg, None, None, None, None


def _steer(x, residual, vectors, gates, mask, index, inplace: bool, backend: str):
    if _needs_grad(x, residual, vectors, gates):
        return _Steer.apply(x, residual, vectors, gates, mask, index, inplace, backend)
    return _steer_forward(x, residual, vectors, gates, mask, index, inplace, backend)[0]


def _rmsnorm_forward(residual, x, vectors, gates, weight, eps, offset, mask, index, inplace,
                     backend):
    meta = row_meta(x, mask, index, n_bank(vectors))
    # in place where the residual's rows are contiguous, else computed and copied back
    direct = inplace and not torch.compiler.is_compiling() and residual.is_contiguous()
    normed, new_res, rstd = kernel.rmsnorm_fwd(
        backend, _rows_or_copy(residual), _rows_or_copy(x), vectors, gates, weight.contiguous(),
        eps, offset, meta, out=residual if direct else None)
    if inplace and not direct:
        new_res = residual.copy_(new_res)
    return normed, new_res, rstd, meta


class _SteerRMSNorm(torch.autograd.Function):
    """``(rmsnorm(residual + x + mask * gate * v) * (offset + weight), new_residual)``."""

    @staticmethod
    def forward(ctx, residual, x, vectors, gates, weight, eps: float, offset: float, mask, index,
                inplace: bool, backend: str):
        normed, new_res, rstd, meta = _rmsnorm_forward(residual, x, vectors, gates, weight, eps,
                                                       offset, mask, index, inplace, backend)
        if inplace:
            ctx.mark_dirty(residual)
        ctx.save_for_backward(vectors, gates, weight, new_res, rstd)
        ctx.meta, ctx.backend, ctx.offset = meta, backend, offset
        ctx.needs_vec, ctx.needs_gate = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        ctx.set_materialize_grads(False)
        return normed, new_res

    @staticmethod
    def backward(ctx, grad_normed, grad_residual):
        vectors, gates, weight, new_res, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[4]
        if grad_normed is None:  # only new_residual was used downstream
            if grad_residual is None:
                return (None,) * 11
            grad_normed = torch.zeros_like(grad_residual)
        dy, dw, g_sum = kernel.rmsnorm_bwd(ctx.backend, _rows_or_copy(grad_normed),
                                           _rows_or_copy(grad_residual), new_res, rstd, weight,
                                           ctx.offset, need_dw, ctx.meta)
        dv, dg = _vector_grads(ctx, g_sum)
        dw = dw.to(weight.dtype) if dw is not None else None
        return dy, dy, dv, dg, dw, None, None, None, None, None, None


def _kernel_backend(backend: str, x: torch.Tensor) -> str | None:
    """The resolved kernel backend, or None for the reference (``"torch"``). ``auto`` takes
    the reference for dtypes the kernels do not handle (fp64: gradcheck, numerics)."""
    if backend == "auto" and x.dtype not in KERNEL_DTYPES:
        return None
    name = resolve(backend, x.device)
    if not uses_launchers(name):
        return None
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the {name} kernels take float32, float16 or bfloat16 activations, "
                        f"got {x.dtype}; use backend='torch' for {x.dtype} ('auto' picks it "
                        "by itself)")
    return name


def _as_gate(gate, x: torch.Tensor):
    """A Python number as a 0-d float32 tensor on ``x``'s device (tensors pass through)."""
    if isinstance(gate, numbers.Real) and not isinstance(gate, (bool, torch.Tensor)):
        return torch.tensor(float(gate), dtype=torch.float32, device=x.device)
    return gate


def _gates_ok(gates: torch.Tensor, name: str | None) -> None:
    """NaN/inf gates are refused where it costs no device sync: on the CPU, in C++ for the
    extension (which reads every gate anyway), here for the other backends."""
    if gates.device.type == "cpu" and name != "ext":
        check_finite_gates(gates)


def head_steer(x: torch.Tensor, vectors: torch.Tensor, gates: torch.Tensor, *,
               mask: torch.Tensor | None = None, index: torch.Tensor | None = None,
               inplace: bool = False, backend: str = "auto") -> torch.Tensor:
    """Add a gated vector to every attention head on the o_proj input, in one pass.

    Args:
        x: ``[..., H*Dh]`` concatenated head outputs (fp32/fp16/bf16; fp64 on the reference).
        vectors: ``[H, Dh]``, or a bank ``[N, H, Dh]`` with ``index``.
        gates: ``[H]``, or ``[N, H]`` for a bank; finite (NaN/inf is refused where the gates
            are on the CPU; on a GPU that check would cost a device sync per call).
        mask: per-token 0/1 (bool or numeric), broadcastable to ``x.shape[:-1]``.
        index: int ``[B]``, ``B = x.shape[0]``: the bank row for each sequence.
        inplace: write into ``x`` (returned) instead of a new tensor; refused when elements
            of ``x`` share memory (an ``expand()``-ed or overlapping view).
        backend: ``"auto" | "triton" | "ext" | "torch"``.

    Returns:
        ``x + mask * (gates[:, None] * vectors).reshape(H*Dh)`` in ``x.dtype``, fp32 inside.
    """
    check_steering(x, vectors, gates, mask, index, vector_dims=2)
    if inplace:
        check_writable("x", x, vectors, gates, mask, index)
    name = _kernel_backend(backend, x)
    _gates_ok(gates, name)
    if name is None:
        out = reference.head_steer(x, vectors, gates, mask=mask, index=index)
        return x.copy_(out) if inplace else out
    if vectors.dim() == 2:
        vectors, gates = vectors.unsqueeze(0), gates.unsqueeze(0)
    return _steer(x, None, vectors.contiguous(), gates.contiguous(), mask, index, inplace, name)


def steer_add(residual: torch.Tensor, x: torch.Tensor, vector: torch.Tensor,
              gate: torch.Tensor | float, *, mask: torch.Tensor | None = None,
              index: torch.Tensor | None = None, inplace: bool = False,
              backend: str = "auto") -> torch.Tensor:
    """The decoder layer's residual add, carrying a steering vector, in one pass.

    Args:
        residual, x: ``[..., D]``, same shape and dtype.
        vector: ``[D]``, or a bank ``[N, D]`` with ``index``.
        gate: ``[]`` (or a Python number), or ``[N]`` for a bank.
        mask, index, backend: as in :func:`head_steer`.
        inplace: write the new residual into ``residual`` (returned).

    Returns:
        ``residual + x + mask * gate * vector`` in ``x.dtype``, summed in fp32.
    """
    gate = _as_gate(gate, x)
    check_steering(x, vector, gate, mask, index, vector_dims=1, vec_name="vector",
                   gate_name="gate")
    check_same("residual", residual, x)
    if inplace:
        check_writable("residual", residual, x, vector, gate, mask, index)
    name = _kernel_backend(backend, x)
    _gates_ok(gate, name)
    if name is None:
        out = reference.steer_add(residual, x, vector, gate, mask=mask, index=index)
        return residual.copy_(out) if inplace else out
    return _steer(x, residual, vector.contiguous(), gate.contiguous(), mask, index, inplace,
                  name)


def steer_add_rmsnorm(residual: torch.Tensor, x: torch.Tensor, vector: torch.Tensor,
                      gate: torch.Tensor | float, weight: torch.Tensor, eps: float = 1e-6, *,
                      weight_offset: float = 0.0, mask: torch.Tensor | None = None,
                      index: torch.Tensor | None = None, inplace: bool = False,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`steer_add` and the following RMSNorm from a single read of the activations.

    Args:
        residual, x, vector, gate, mask, index, backend: as in :func:`steer_add`.
        weight: ``[D]`` RMSNorm weight.
        eps: added to the mean square; finite and ``>= 0``.
        weight_offset: ``1.0`` for Gemma's ``(1 + weight)`` norm.
        inplace: write the new residual into ``residual`` (returned as the second output).

    Returns:
        ``(normed, new_residual)``, both ``[..., D]`` in ``x.dtype``; ``normed =
        new_residual * rsqrt(mean(new_residual**2) + eps) * (weight_offset + weight)`` in fp32.
    """
    gate = _as_gate(gate, x)
    check_steering(x, vector, gate, mask, index, vector_dims=1, vec_name="vector",
                   gate_name="gate")
    check_same("residual", residual, x)
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},); got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (it keeps the RMSNorm's "
                         f"denominator away from 0; models use 1e-5 or 1e-6); got {eps!r}")
    if inplace:
        check_writable("residual", residual, x, vector, gate, weight, mask, index)
    name = _kernel_backend(backend, x)
    _gates_ok(gate, name)
    if name is None:
        normed, new = reference.steer_add_rmsnorm(residual, x, vector, gate, weight, eps,
                                                  weight_offset=weight_offset, mask=mask,
                                                  index=index)
        return (normed, residual.copy_(new)) if inplace else (normed, new)
    vector, gate = vector.contiguous(), gate.contiguous()
    if _needs_grad(residual, x, vector, gate, weight):
        return _SteerRMSNorm.apply(residual, x, vector, gate, weight, float(eps),
                                   float(weight_offset), mask, index, inplace, name)
    normed, new_res = _rmsnorm_forward(residual, x, vector, gate, weight, float(eps),
                                       float(weight_offset), mask, index, inplace, name)[:2]
    return normed, new_res
