"""The steering state of one patched decoder layer, prepared on the layer's device.

``fold`` mode: the MHA term as one D-vector ``c = o_proj.weight @ concat_h(alpha[h] * a[h])``
(``[D]``, or ``[N, D]`` for a bank), exact by linearity where the attention output lands in the
residual stream unchanged (DESIGN.md section 1). ``head`` mode: ``a`` with gates ``alpha`` for
``head_steer`` on the o_proj input (the attention's residual add then carries zeros). Both carry
``b`` with gates ``beta`` for the MLP branch; the strength multiplies every gate.

Inference reads :attr:`LayerState.banks`, prepared once in the kernels' layout
(:class:`m2iv_kernels.prepared.Bank`, fp32 products, strength folded into the gates) and
rewritten in place by :meth:`LayerState.refresh` when the strength, the vectors' values, or
o_proj's weight (values, storage, dtype or device) changed, so a compiled graph reading them
needs no recompiling. While the vectors require grad and autograd is on (training),
:meth:`LayerState.tensors` computes the same quantities in every forward, the fold in o_proj's
dtype, so gradients reach ``a`` and ``alpha``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2iv_kernels.prepared import NO_ROWS, Bank, Entry

from ..families import LayerSpec
from ..vectors import M2IV
from .styles import Inject, rms_norm_fact

__all__ = ["LayerState", "MODES"]

#: how the MHA vectors are applied: folded through o_proj, or in head space
MODES = ("fold", "head")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LayerState:
    """The steering tensors of one layer for one vectors object; ``slot`` is the layer's row
    in the vectors. ``backend``: the patch's (resolved per device by the entry)."""

    def __init__(self, spec: LayerSpec, slot: int, mode: str, vectors: M2IV, strength: float,
                 backend: str):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.spec, self.slot, self.mode, self.vectors = spec, slot, mode, vectors
        self.backend = backend
        self.device = spec.device
        self.weight = spec.o_proj_weight if mode == "fold" else None
        self.entry = Entry(backend, self.device)
        # (weight_offset, eps) per norm role where steer_add_rmsnorm stands in for the norm
        self.facts = {role: rms_norm_fact(norm) if norm is not None else None
                      for role, norm in spec.parts.norms.items()}
        self.strength = float(strength)
        self.banks, self._unit = self._banks(self.strength, self.device)
        self._key = self._weight_key()
        self.inject = Inject(self, NO_ROWS)  # every token, no bank: one object for every call
        # the next patched layer whose input RMSNorm this layer's output add computes (set by
        # the patch), and what it handed over: (output, its norm, the output's version)
        self.next_input: LayerState | None = None
        self.pre: tuple | None = None

    # ------------------------------------------------------------------ inference

    def _weight_key(self) -> tuple:
        """What the fold read of o_proj's weight: in-place edits bump its version, ``model.to()``
        and ``.half()`` swap its storage."""
        w = self.weight
        return () if w is None else (w._version, w.data_ptr(), w.dtype)

    def stale(self) -> bool:
        """Whether o_proj's weight changed since the fold was computed."""
        return self.weight is not None and self._weight_key() != self._key

    def refresh(self, device: torch.device | None = None) -> None:
        """Recompute the banks for a new device, new values of the vectors or a changed o_proj
        weight: in place where their layout stays (a compiled graph keeps reading them)."""
        if device is not None and device != self.device:
            self.device, self.entry = device, Entry(self.backend, device)
        banks, self._unit = self._banks(self.strength, self.device)
        for name, bank in banks.items():
            self.banks[name].update(bank)
        self._key = self._weight_key()

    def set_strength(self, strength: float) -> None:
        """Rescale every gate, in place (no fold is recomputed)."""
        self.strength = float(strength)
        with torch.no_grad():
            for name, bank in self.banks.items():
                bank.gates.copy_(self._unit[name] * self.strength)

    def adopt(self, other: LayerState) -> None:
        """Take the vectors and banks of ``other`` (same layer and mode) in place."""
        self.vectors, self.strength, self._unit = other.vectors, other.strength, other._unit
        self.device, self.entry = other.device, other.entry
        for name, bank in other.banks.items():
            self.banks[name].update(bank)
        self._key = other._key

    def public_tensors(self) -> dict[str, torch.Tensor]:
        """The banks as the public ops take them (views): for an autograd forward with vectors
        that need no gradient."""
        pick = (lambda t: t) if self.vectors.is_bank else (lambda t: t[0])
        out = {}
        for name, (v, g) in (("attn", ("c", "c_gate")), ("mlp", ("b", "beta")),
                             ("heads", ("a", "alpha"))):
            bank = self.banks.get(name)
            if bank is not None:
                vec, gate = (bank.vectors, bank.gates) if name == "heads" else \
                    (bank.vectors[:, 0], bank.gates[:, 0])
                out[v], out[g] = pick(vec), pick(gate)
        return out

    def _banks(self, s: float, device: torch.device
               ) -> tuple[dict[str, Bank], dict[str, torch.Tensor]]:
        """``(banks at strength s, their gates at strength 1)``."""
        # plain tensors even under inference_mode, so a later autograd forward may use them
        with torch.inference_mode(False), torch.no_grad():
            t = self._compute(1.0, device, grad=False)
            banks = {"attn": Bank.residual(t["c"], t["c_gate"], device),
                     "mlp": Bank.residual(t["b"], t["beta"], device)}
            if self.mode == "head":
                banks["heads"] = Bank.heads(t["a"], t["alpha"], device)
            unit = {name: bank.gates for name, bank in banks.items()}
            for bank in banks.values():
                bank.gates = bank.gates * s
        return banks, unit

    # ------------------------------------------------------------------ training

    def tensors(self, strength: float, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors for one autograd forward at ``strength`` on ``device``: computed now,
        in the graph, so gradients reach the vectors."""
        return self._compute(strength, device, grad=True)

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
                c = F.linear(heads, w.detach().float().to(device))
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
