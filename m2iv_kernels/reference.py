"""Plain PyTorch definitions of the ops: the semantics every backend must reproduce.

Everything is computed in fp32 (fp64 for fp64 inputs, so ``gradcheck`` works) and rounded once
to the activation dtype, as the fused kernels do. Autograd through these functions is the reference for the kernels' backward passes.
"""
from __future__ import annotations

import torch

__all__ = ["head_steer", "steer_add", "steer_add_rmsnorm", "steering_term"]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: fp32, or fp64 when ``t`` is fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def steering_term(x: torch.Tensor, vectors: torch.Tensor, gates: torch.Tensor,
                  mask: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
    """``mask * gates * vectors`` in the accumulation dtype, shaped to broadcast on ``x [..., C]``.

    ``vectors [H, Dh]`` / ``gates [H]``, or banks ``[N, H, Dh]`` / ``[N, H]`` picked per
    sequence by ``index [B]``.
    """
    steer = (_acc(gates)[..., None] * _acc(vectors)).flatten(-2)  # [C] or [N, C]
    if index is not None:
        steer = steer[index.long()].reshape(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
    if mask is not None:
        steer = steer * mask.to(steer.dtype)[..., None]
    return steer


def head_steer(x: torch.Tensor, vectors: torch.Tensor, gates: torch.Tensor, *,
               mask: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., H*Dh] + mask * (gates[:, None] * vectors).reshape(H*Dh)``."""
    return (_acc(x) + steering_term(x, vectors, gates, mask, index)).to(x.dtype)


def steer_add(residual: torch.Tensor, x: torch.Tensor, vector: torch.Tensor, gate: torch.Tensor,
              *, mask: torch.Tensor | None = None,
              index: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + x + mask * gate * vector``; ``vector [D]`` / ``gate []`` or banks."""
    term = steering_term(x, vector[..., None, :], gate[..., None], mask, index)
    return (_acc(residual) + _acc(x) + term).to(x.dtype)


def steer_add_rmsnorm(residual: torch.Tensor, x: torch.Tensor, vector: torch.Tensor,
                      gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                      weight_offset: float = 0.0, mask: torch.Tensor | None = None,
                      index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)``: ``steer_add`` then RMSNorm of the rounded sum, in fp32.

    The norm reads ``new_residual`` after rounding to the activation dtype, as a Hugging Face
    layer does (residual add in the model dtype, norm upcast to fp32).
    """
    new_residual = steer_add(residual, x, vector, gate, mask=mask, index=index)
    y = _acc(new_residual)
    rstd = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    normed = y * rstd * (weight_offset + _acc(weight))
    return normed.to(x.dtype), new_residual
