"""One forward pass shared by the teacher, the student and the calibration: the logits at the
answer positions and, on request, the steered decoder layers' outputs there.

Only the answer positions' logits are materialised (``logits_to_keep`` where the model takes
it), so a 16-shot prompt of thousands of tokens costs one ``[B, A, V]`` slice, not ``[B, T, V]``.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch

from ..families import module_device, module_dtype
from ..prompts import EncodedBatch

__all__ = ["AnswerForward"]


class _Capture:
    """Forward hooks on decoder layers that keep their outputs at given positions only."""

    def __init__(self, layer_modules: Sequence[torch.nn.Module], positions: torch.Tensor):
        self.modules = list(layer_modules)
        self.positions = positions  # [B, A]
        self.out: list[torch.Tensor | None] = [None] * len(self.modules)
        self._hooks = []

    def __enter__(self):
        for i, m in enumerate(self.modules):
            self._hooks.append(m.register_forward_hook(self._make(i)))
        return self

    def _make(self, i):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            pos = self.positions.to(h.device)
            idx = pos[..., None].expand(*pos.shape, h.shape[-1])
            self.out[i] = torch.gather(h, 1, idx)  # [B, A, D]
        return hook

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def stacked(self) -> torch.Tensor:
        if any(o is None for o in self.out):
            raise RuntimeError("a decoder layer did not run: cannot capture its output")
        return torch.stack(self.out, 1)  # [B, L, A, D]


class AnswerForward:
    """``fwd(enc, capture) -> (logits [B, A, V], hidden [B, L, A, D] or None)`` for ``model``
    (whatever is patched into it runs too).

    ``amp``: bf16 autocast (``"auto"``: on CUDA for fp32 models).
    """

    def __init__(self, model, layer_modules: Sequence[torch.nn.Module], amp: str = "auto"):
        self.model = model
        self.device = module_device(model)
        self.dtype = module_dtype(model)
        self.layer_modules = list(layer_modules)
        self.use_amp = (amp == "bf16" or (amp == "auto" and self.device.type == "cuda"
                                          and self.dtype == torch.float32))
        self._logits_kw = "logits_to_keep" in inspect.signature(type(model).forward).parameters

    def _autocast(self):
        if self.use_amp and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, enc: EncodedBatch, capture: bool = False):
        enc = enc.to(self.device, self.dtype)
        pos = enc.answer_positions
        kw = {}
        if self._logits_kw:
            keep, inverse = torch.unique(pos, return_inverse=True)
            kw["logits_to_keep"] = keep
        with contextlib.ExitStack() as stack:
            cap = (stack.enter_context(_Capture(self.layer_modules, pos)) if capture
                   else None)
            with self._autocast():
                out = self.model(**enc.inputs, use_cache=False, **kw)
            logits = out.logits
            if self._logits_kw:
                if logits.shape[1] != keep.numel():
                    raise RuntimeError("the model ignored logits_to_keep")
                idx = inverse
            else:
                idx = pos
            ix = idx[..., None].expand(*idx.shape, logits.shape[-1])
            ans_logits = torch.gather(logits, 1, ix)
            hidden = cap.stacked() if cap is not None else None
        return ans_logits, hidden

    @torch.no_grad()
    def answer_square_sum(self, builder, queries) -> tuple[float, float]:
        """``(sum of squares, count)`` of the layers' outputs at the zero-shot prompts' answer
        positions: the residual stream's scale, for learning rates relative to it."""
        if not queries:
            return 0.0, 0.0
        enc = builder.encode(list(queries), None, with_answer=True)
        _, h = self(enc, capture=True)  # [B, L, A, D]
        m = enc.answer_mask.to(h.device)[:, None, :, None].float()
        return float((h.float().pow(2) * m).sum()), float(m.sum()) * h.shape[1] * h.shape[-1]

