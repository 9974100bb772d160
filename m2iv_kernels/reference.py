"""Plain PyTorch definitions of the ops: the semantics every backend must reproduce.

Everything is computed in fp32 and rounded once to the activation dtype, as the fused kernels
do. Autograd through these functions is the reference for the kernels' backward passes.
"""
from __future__ import annotations

import torch

__all__ = ["head_steer", "steer_add", "steer_add_rmsnorm", "steering_term"]


def steering_term(x: torch.Tensor, vectors: torch.Tensor, gates: torch.Tensor,
                  mask: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``mask * gates * vectors`` laid out to broadcast against ``x [..., C]``.

    ``vectors [H, Dh]`` / ``gates [H]``, or banks ``[N, H, Dh]`` / ``[N, H]`` picked per
    sequence by ``index [B]``.
    """
    steer = (gates.float()[..., None] * vectors.float()).flatten(-2)  # [C] or [N, C]
    if index is not None:
        steer = steer[index.long()].reshape(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
    if mask is not None:
        steer = steer * mask.float()[..., None]
    return steer


def head_steer(x: torch.Tensor, vectors: torch.Tensor, gates: torch.Tensor, *,
               mask: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., H*Dh] + mask * (gates[:, None] * vectors).reshape(H*Dh)``."""
    return (x.float() + steering_term(x, vectors, gates, mask, index)).to(x.dtype)


def steer_add(residual: torch.Tensor, x: torch.Tensor, vector: torch.Tensor, gate: torch.Tensor,
              *, mask: torch.Tensor | None = None,
              index: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + x + mask * gate * vector``; ``vector [D]`` / ``gate []`` or banks."""
    term = steering_term(x, vector[..., None, :], gate[..., None], mask, index)
    return (residual.float() + x.float() + term).to(x.dtype)


def steer_add_rmsnorm(residual: torch.Tensor, x: torch.Tensor, vector: torch.Tensor,
                      gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                      weight_offset: float = 0.0, mask: torch.Tensor | None = None,
                      index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)``: ``steer_add`` then RMSNorm of the rounded sum, in fp32.

    The norm reads ``new_residual`` after rounding to the activation dtype, as a Hugging Face
    layer does (residual add in the model dtype, norm upcast to fp32).
    """
    new_residual = steer_add(residual, x, vector, gate, mask=mask, index=index)
    y = new_residual.float()
    rstd = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    normed = y * rstd * (weight_offset + weight.float())
    return normed.to(x.dtype), new_residual
