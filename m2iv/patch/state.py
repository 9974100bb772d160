"""The steering tensors of one patched decoder layer, prepared on the layer's device.

``fold`` mode: the MHA term as one D-vector ``c = o_proj.weight @ concat_h(alpha[h] * a[h])``
(``[D]``, or ``[N, D]`` for a bank), exact by linearity where the attention output lands in the
residual stream unchanged (DESIGN.md section 1). It is computed in float32 and cached until the
vectors, the strength or o_proj's weight change; while the vectors require grad (training) it
is recomputed in every forward, in o_proj's dtype, so gradients reach ``a`` and ``alpha``.
``head`` mode: ``a`` and ``alpha * strength`` for ``head_steer`` on the o_proj input (``c`` is
zero). Both modes carry ``b`` and ``beta * strength`` for the MLP branch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..families import LayerSpec
from ..vectors import M2IV

__all__ = ["LayerState", "MODES"]

#: how the MHA vectors are applied: folded through o_proj, or in head space
MODES = ("fold", "head")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LayerState:
    """The steering tensors of one layer for one vectors object (``set_vectors`` makes new
    states); ``slot`` is the layer's row in the vectors."""

    def __init__(self, spec: LayerSpec, slot: int, mode: str, vectors: M2IV):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.spec, self.slot, self.mode, self.vectors = spec, slot, mode, vectors
        self.device = spec.device
        self.weight = spec.o_proj_weight if mode == "fold" else None
        self._key: tuple | None = None
        self._cached: dict[str, torch.Tensor] | None = None

    def _cache_key(self, s: float, device: torch.device) -> tuple:
        """Versions of every input (in-place edits such as optimizer steps invalidate), o_proj's
        storage and dtype (``model.to()``/``.half()`` swap ``.data``), strength and device."""
        v, w = self.vectors, self.weight
        key = (v.mha._version, v.mha_gates._version, v.mlp._version, v.mlp_gates._version,
               s, device)
        if w is not None:
            key += (w._version, w.data_ptr(), w.dtype)
        return key

    def tensors(self, strength: float, device: torch.device,
                grad: bool = False) -> dict[str, torch.Tensor]:
        """The tensors for one forward at ``strength`` on ``device``; ``grad``: the vectors
        require grad and autograd is on (no cache: recomputed for the graph)."""
        if grad:
            return self._compute(strength, device, grad=True)
        key = self._cache_key(strength, device)
        if key != self._key:
            # plain tensors even under inference_mode, so a later autograd forward may use them
            with torch.inference_mode(False), torch.no_grad():
                self._cached = self._compute(strength, device, grad=False)
            self._key = key
        return self._cached

    def _compute(self, s: float, device: torch.device, grad: bool) -> dict[str, torch.Tensor]:
        v = self.vectors

        def take(t: torch.Tensor) -> torch.Tensor:
            t = t[:, self.slot] if v.is_bank else t[self.slot]
            dtype = t.dtype if t.dtype in _KERNEL_DTYPES else torch.float32
            return t.to(device=device, dtype=dtype)

        a, alpha, b, beta = (take(t) for t in v.tensors().values())
        # products in fp32 (bf16 vectors must not be rounded again here); the ops upcast too
        out = {"b": b, "beta": beta.float() * s}
        if self.mode == "fold":
            w = self.weight
            heads = (alpha.float()[..., None] * a.float()).flatten(-2)  # [H*Dh] / [N, H*Dh]
            if grad:  # in o_proj's dtype: no fp32 copy of the weight kept for backward
                c = F.linear(heads.to(w.dtype), w).float()
            else:
                c = F.linear(heads, w.detach().float())
            out["c"] = c
            # the attention branch is scaled before its residual add (Granite): so is c
            gate = float(s) * self.spec.parts.residual_scale
            out["c_gate"] = torch.full(beta.shape, gate, dtype=torch.float32, device=device)
        else:
            out["a"] = a
            out["alpha"] = alpha.float() * s
            out["c"] = torch.zeros(b.shape, dtype=torch.float32, device=device)
            out["c_gate"] = torch.zeros(beta.shape, dtype=torch.float32, device=device)
        return out
