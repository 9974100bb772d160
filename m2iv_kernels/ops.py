"""The public ops: validation, backend choice, and one autograd path for every kernel backend.

Internally every op works on a bank ``vectors [N, H, Dh]`` with ``gates [N, H]``; the residual
ops are the case ``H = 1, Dh = D``. Forward saves no activation except ``new_residual`` and the
per-row ``rstd`` of the RMSNorm op, so steering adds no activation memory to training.
"""
from __future__ import annotations

import torch

from . import reference
from ._checks import KERNEL_DTYPES, as_rows, check_same, check_steering, row_meta
from .backends import resolve, uses_launchers
from . import custom_ops as kernel

__all__ = ["head_steer", "steer_add", "steer_add_rmsnorm"]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _vector_grads(ctx, g_sum: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d vectors, d gates from the per-bank fp32 sums ``g_sum [N, C]`` of mask * grad."""
    vectors, gates = ctx.saved_tensors[:2]
    g_sum = g_sum.view(vectors.shape)
    dv = (gates.float()[..., None] * g_sum).to(vectors.dtype) if ctx.needs_vec else None
    dg = (vectors.float() * g_sum).sum(-1).to(gates.dtype) if ctx.needs_gate else None
    return dv, dg


def _steer_forward(x, residual, vectors, gates, mask, index, inplace: bool, backend: str):
    """Launch the steer kernel; returns ``(out, row metadata)``."""
    meta = row_meta(x, mask, index, vectors.shape[0])
    vec, gat = vectors.contiguous(), gates.contiguous()
    x2 = as_rows(x)
    res2 = as_rows(residual) if residual is not None else None
    # Dynamo cannot trace storage pointers: a trace takes the functional op + copy_ path
    if inplace and not torch.compiler.is_compiling() and _same_storage(x2, x):
        kernel.steer_fwd(backend, x2, res2, vec, gat, meta, out=x2)
        return x, meta
    out2 = kernel.steer_fwd(backend, x2, res2, vec, gat, meta)
    return (x.copy_(out2.view(x.shape)) if inplace else out2.view(x.shape)), meta


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must record the op (inference skips ``autograd.Function``'s cost)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Steer(torch.autograd.Function):
    """``out = [residual +] x + mask * gates * vectors`` (head steer, or steer-add)."""

    @staticmethod
    def forward(ctx, x, residual, vectors, gates, mask, index, inplace: bool, backend: str):
        out, meta = _steer_forward(x, residual, vectors, gates, mask, index, inplace, backend)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(vectors.contiguous(), gates.contiguous())
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


def _rmsnorm_forward(residual, x, vectors, gates, weight, eps, offset, mask, index, backend):
    meta = row_meta(x, mask, index, vectors.shape[0])
    normed, new_res, rstd = kernel.rmsnorm_fwd(
        backend, as_rows(residual), as_rows(x), vectors.contiguous(), gates.contiguous(),
        weight.contiguous(), eps, offset, meta)
    return normed, new_res, rstd, meta


class _SteerRMSNorm(torch.autograd.Function):
    """``(rmsnorm(residual + x + mask * gate * v) * (offset + weight), new_residual)``."""

    @staticmethod
    def forward(ctx, residual, x, vectors, gates, weight, eps: float, offset: float, mask, index,
                backend: str):
        normed, new_res, rstd, meta = _rmsnorm_forward(residual, x, vectors, gates, weight, eps,
                                                       offset, mask, index, backend)
        ctx.save_for_backward(vectors.contiguous(), gates.contiguous(), weight, new_res, rstd)
        ctx.meta, ctx.backend, ctx.offset = meta, backend, offset
        ctx.needs_vec, ctx.needs_gate = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        ctx.set_materialize_grads(False)
        return normed.view(x.shape), new_res.view(x.shape)

    @staticmethod
    def backward(ctx, grad_normed, grad_residual):
        vectors, gates, weight, new_res, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[4]
        if grad_normed is None:  # only new_residual was used downstream
            if grad_residual is None:
                return (None,) * 10
            grad_normed = torch.zeros_like(grad_residual)
        gr = as_rows(grad_residual) if grad_residual is not None else None
        dy, dw, g_sum = kernel.rmsnorm_bwd(ctx.backend, as_rows(grad_normed), gr, new_res,
                                           rstd, weight, ctx.offset, need_dw, ctx.meta)
        dv, dg = _vector_grads(ctx, g_sum)
        dy = dy.view(grad_normed.shape)
        dw = dw.to(weight.dtype) if dw is not None else None
        return dy, dy, dv, dg, dw, None, None, None, None, None


def _kernel_backend(backend: str, x: torch.Tensor) -> str | None:
    """The resolved kernel backend, or None for the reference (``"torch"``)."""
    name = resolve(backend, x.device)
    if not uses_launchers(name):
        return None
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the {name} kernels take float32, float16 or bfloat16 activations, "
                        f"got {x.dtype}; use backend='torch' for {x.dtype}")
    return name


def head_steer(x: torch.Tensor, vectors: torch.Tensor, gates: torch.Tensor, *,
               mask: torch.Tensor | None = None, index: torch.Tensor | None = None,
               inplace: bool = False, backend: str = "auto") -> torch.Tensor:
    """Add a gated vector to every attention head on the o_proj input, in one pass.

    Args:
        x: ``[..., H*Dh]`` concatenated head outputs (fp32/fp16/bf16).
        vectors: ``[H, Dh]``, or a bank ``[N, H, Dh]`` with ``index``.
        gates: ``[H]``, or ``[N, H]`` for a bank.
        mask: per-token 0/1 (bool or numeric), broadcastable to ``x.shape[:-1]``.
        index: int ``[B]``, ``B = x.shape[0]``: the bank row for each sequence.
        inplace: write into ``x`` (returned) instead of a new tensor.
        backend: ``"auto" | "triton" | "ext" | "torch"``.

    Returns:
        ``x + mask * (gates[:, None] * vectors).reshape(H*Dh)`` in ``x.dtype``, fp32 inside.
    """
    check_steering(x, vectors, gates, mask, index, vector_dims=2)
    name = _kernel_backend(backend, x)
    if name is None:
        out = reference.head_steer(x, vectors, gates, mask=mask, index=index)
        return x.copy_(out) if inplace else out
    if vectors.dim() == 2:
        vectors, gates = vectors.unsqueeze(0), gates.unsqueeze(0)
    return _steer(x, None, vectors, gates, mask, index, inplace, name)


def steer_add(residual: torch.Tensor, x: torch.Tensor, vector: torch.Tensor, gate: torch.Tensor,
              *, mask: torch.Tensor | None = None, index: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """The decoder layer's residual add, carrying a steering vector, in one pass.

    Args:
        residual, x: ``[..., D]``, same shape and dtype.
        vector: ``[D]``, or a bank ``[N, D]`` with ``index``.
        gate: ``[]``, or ``[N]`` for a bank.
        mask, index, backend: as in :func:`head_steer`.

    Returns:
        ``residual + x + mask * gate * vector`` in ``x.dtype``, summed in fp32.
    """
    check_steering(x, vector, gate, mask, index, vector_dims=1, vec_name="vector",
                   gate_name="gate")
    check_same("residual", residual, x)
    name = _kernel_backend(backend, x)
    if name is None:
        return reference.steer_add(residual, x, vector, gate, mask=mask, index=index)
    vectors, gates = _as_bank(vector, gate)
    return _steer(x, residual, vectors, gates, mask, index, False, name)


def steer_add_rmsnorm(residual: torch.Tensor, x: torch.Tensor, vector: torch.Tensor,
                      gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                      weight_offset: float = 0.0, mask: torch.Tensor | None = None,
                      index: torch.Tensor | None = None,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`steer_add` and the following RMSNorm from a single read of the activations.

    Args:
        residual, x, vector, gate, mask, index, backend: as in :func:`steer_add`.
        weight: ``[D]`` RMSNorm weight.
        eps: added to the mean square.
        weight_offset: ``1.0`` for Gemma's ``(1 + weight)`` norm.

    Returns:
        ``(normed, new_residual)``, both ``[..., D]`` in ``x.dtype``; ``normed =
        new_residual * rsqrt(mean(new_residual**2) + eps) * (weight_offset + weight)`` in fp32.
    """
    check_steering(x, vector, gate, mask, index, vector_dims=1, vec_name="vector",
                   gate_name="gate")
    check_same("residual", residual, x)
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},); got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    name = _kernel_backend(backend, x)
    if name is None:
        return reference.steer_add_rmsnorm(residual, x, vector, gate, weight, eps,
                                           weight_offset=weight_offset, mask=mask, index=index)
    vectors, gates = _as_bank(vector, gate)
    if _needs_grad(residual, x, vectors, gates, weight):
        return _SteerRMSNorm.apply(residual, x, vectors, gates, weight, float(eps),
                                   float(weight_offset), mask, index, name)
    normed, new_res = _rmsnorm_forward(residual, x, vectors, gates, weight, float(eps),
                                       float(weight_offset), mask, index, name)[:2]
    return normed.view(x.shape), new_res.view(x.shape)


def _as_bank(vector: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[D]``/``[]`` or ``[N, D]``/``[N]`` as the head layout ``[N, 1, D]``/``[N, 1]``."""
    return vector.view(-1, 1, vector.shape[-1]), gate.view(-1, 1)
