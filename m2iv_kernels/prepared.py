"""The unchecked entry for callers that validated once: m2iv's patched decoder layers.

The public ops (:mod:`.ops`) check every argument and resolve the backend on every call, as a
library call must. A patched layer calls the same op with the same shapes, dtypes, devices and
backend on every decode step, all known when its vectors are handed over. For such a caller this
module is the one internal entry:

* :class:`Bank`: steering vectors in the kernels' layout on one device, ``vectors [N, H, Dh]``
  (``H = 1``: ``[N, 1, D]`` for the residual ops) and fp32 ``gates [N, H]`` (a patch folds its
  strength into them). Built once per ``set_vectors`` / ``set_strength``; :meth:`Bank.update`
  writes new values into the same tensors, so a compiled graph (or a CUDA graph) that reads them
  sees the change without being recompiled.
* :func:`rows`: the per-token mask and bank index of one forward, flat, as the kernels read
  them; built once per forward and shared by every layer.
* :class:`Entry`: one backend, resolved when the entry is made (never inside a compiled graph
  or a CUDA-graph capture), on one device. :meth:`Entry.add`, :meth:`Entry.add_rmsnorm` and
  :meth:`Entry.head` call its launcher directly: no validation, no dispatch, no autograd.

What the caller promises, checked nowhere here: activations ``[..., C]`` with a row view
(leading dimensions that collapse into one row stride, unit column stride) in a dtype the
backend takes; a residual of x's shape and dtype; banks, weights, mask and index on x's device;
banks of width ``C``; a mask of ``x.shape[:-1]`` elements and an index of ``x.shape[0]`` rows
(values in range) where given; finite eps; and no autograd: with ``torch.is_grad_enabled()``
a caller uses the public ops, which record the backward.

Under ``torch.compile`` the calls reach the graph as the reference's aten ops
(:mod:`.reference`, the executable spec), which Inductor fuses with the neighbouring residual
add and norm, or, with ``M2IV_COMPILED_OPS=kernels``, as the opaque registered ops
(``torch.ops.m2iv_kernels.*``). The default is the faster one on the CPU: opaque / aten 1.08
and 1.05 at compiled decode batch 1 / 8 (README, "Aten ops or opaque kernels under
torch.compile"; ``benchmarks/results/patched-cpu-tiny-2026-12-03-compiled-ops.json``).
"""
from __future__ import annotations

import math
import os

import torch

from . import reference
from ._checks import Rows
from .backends import launchers, resolve, uses_launchers
from . import custom_ops

__all__ = ["Bank", "Entry", "rows", "NO_ROWS", "COMPILED_ENV"]

#: every token steered, no bank index (``rows_per_seq`` and ``n_bank`` are then unused)
NO_ROWS = Rows(None, None, 1, 1)
#: how the steering reaches a compiled graph: "aten" (default) or "kernels"
COMPILED_ENV = "M2IV_COMPILED_OPS"


class Bank:
    """Steering vectors ``[N, H, Dh]`` and fp32 gates ``[N, H]`` on one device."""

    __slots__ = ("vectors", "gates")

    def __init__(self, vectors: torch.Tensor, gates: torch.Tensor):
        self.vectors, self.gates = vectors, gates

    @classmethod
    def residual(cls, vector: torch.Tensor, gate: torch.Tensor,
                 device: torch.device | None = None) -> Bank:
        """From ``[D]`` / ``[]`` or a bank ``[N, D]`` / ``[N]``."""
        return cls.heads(vector[..., None, :], gate[..., None], device)

    @classmethod
    def heads(cls, vectors: torch.Tensor, gates: torch.Tensor,
              device: torch.device | None = None) -> Bank:
        """From ``[H, Dh]`` / ``[H]`` or a bank ``[N, H, Dh]`` / ``[N, H]``: copies that the bank
        owns (:meth:`update` writes into them)."""
        vectors = vectors if vectors.dim() == 3 else vectors[None]
        gates = gates if gates.dim() == 2 else gates[None]
        device = device or vectors.device
        return cls(vectors.detach().to(device, copy=True).contiguous(),
                   gates.detach().to(device, torch.float32, copy=True).contiguous())

    def update(self, other: Bank) -> None:
        """Take ``other``'s values: in place where the layout is the same (tensors that a
        compiled graph reads stay the same tensors), else its tensors."""
        for name in ("vectors", "gates"):
            mine, new = getattr(self, name), getattr(other, name)
            if (mine.shape == new.shape and mine.dtype == new.dtype
                    and mine.device == new.device):
                with torch.no_grad():
                    mine.copy_(new)
            else:
                setattr(self, name, new)

    @property
    def n_bank(self) -> int:
        return self.vectors.shape[0]


def rows(mask: torch.Tensor | None, index: torch.Tensor | None, x: torch.Tensor,
         n_bank: int = 1) -> Rows:
    """The row metadata of ``x [B, ..., C]``: ``mask`` of ``x.shape[:-1]`` elements (bool or
    float; contiguous), ``index [B]`` int64 (contiguous) into a bank of ``n_bank``, or None."""
    if mask is None and index is None:
        return NO_ROWS
    m = None if mask is None else mask.view(-1)
    if index is None:
        return Rows(m, None, 1, n_bank)
    return Rows(m, index, max(math.prod(x.shape[1:-1]), 1), n_bank)


def _reference_bank(bank: Bank, r: Rows, residual: bool):
    """The bank in the reference's calling convention: (vectors, gates, index)."""
    v, g = bank.vectors, bank.gates
    if residual:
        v, g = v[:, 0], g[:, 0]
    return (v, g, r.index) if r.index is not None else (v[0], g[0], None)


def _mask(r: Rows, x: torch.Tensor) -> torch.Tensor | None:
    return None if r.mask is None else r.mask.view(x.shape[:-1])


class Entry:
    """One backend on one device: the prepared calls of a patched layer.

    ``backend`` is resolved now (``auto`` measures, once per machine, where it must), so
    nothing is decided inside a compiled graph or a CUDA-graph capture.
    """

    def __init__(self, backend: str, device: torch.device):
        self.device = torch.device(device)
        self.backend = resolve(backend, self.device)
        self._launch = launchers(self.backend) if uses_launchers(self.backend) else None
        compiled = os.environ.get(COMPILED_ENV) or "aten"
        if compiled not in ("aten", "kernels"):
            raise ValueError(f"{COMPILED_ENV}={compiled!r}: choose 'aten' or 'kernels'")
        self._compiled_kernels = compiled == "kernels" and self._launch is not None

    def __repr__(self) -> str:
        return f"Entry({self.backend!r}, {str(self.device)!r})"

    def _traced(self) -> bool:
        """Whether this call runs the reference's ops: no kernels (the ``torch`` backend), or
        a trace that should see decomposable aten ops."""
        return self._launch is None or not self._compiled_kernels

    def add(self, residual: torch.Tensor, x: torch.Tensor, bank: Bank, r: Rows = NO_ROWS
            ) -> torch.Tensor:
        """``residual + x + mask * gates * vectors[index]``."""
        if self._launch is not None and not torch.compiler.is_compiling():
            return self._launch.steer_fwd(x, residual, bank.vectors, bank.gates, r)
        if self._traced():
            v, g, i = _reference_bank(bank, r, residual=True)
            return reference.steer_add(residual, x, v, g, mask=_mask(r, x), index=i)
        return custom_ops.steer_fwd(self.backend, x, residual, bank.vectors, bank.gates, r)

    def add_rmsnorm(self, residual: torch.Tensor, x: torch.Tensor, bank: Bank,
                    weight: torch.Tensor, eps: float, weight_offset: float, r: Rows = NO_ROWS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normed, new_residual)`` of :func:`m2iv_kernels.steer_add_rmsnorm`."""
        if self._launch is not None and not torch.compiler.is_compiling():
            normed, new_res, _ = self._launch.rmsnorm_fwd(residual, x, bank.vectors,
                                                          bank.gates, weight, eps,
                                                          weight_offset, r)
            return normed, new_res
        if self._traced():
            v, g, i = _reference_bank(bank, r, residual=True)
            return reference.steer_add_rmsnorm(residual, x, v, g, weight, eps,
                                               weight_offset=weight_offset, mask=_mask(r, x),
                                               index=i)
        normed, new_res, _ = custom_ops.rmsnorm_fwd(self.backend, residual, x, bank.vectors,
                                                    bank.gates, weight, eps, weight_offset, r)
        return normed, new_res

    def head(self, x: torch.Tensor, bank: Bank, r: Rows = NO_ROWS, inplace: bool = False
             ) -> torch.Tensor:
        """``x + mask * (gates[..., None] * vectors)[index].flatten()``; into ``x`` itself
        with ``inplace`` where that is free (eager, contiguous ``x``)."""
        if self._launch is not None and not torch.compiler.is_compiling():
            out = x if inplace and x.is_contiguous() else None
            return self._launch.steer_fwd(x, None, bank.vectors, bank.gates, r, out)
        if self._traced():
            v, g, i = _reference_bank(bank, r, residual=False)
            return reference.head_steer(x, v, g, mask=_mask(r, x), index=i)
        return custom_ops.steer_fwd(self.backend, x, None, bank.vectors, bank.gates, r)
