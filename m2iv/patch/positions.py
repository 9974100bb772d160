"""Which tokens are steered: ``m(t)`` of DESIGN.md section 1 (``positions=``).

* ``"all"`` (default): every token; no mask is built (the fast path).
* ``"text"``: every token whose id is not an image/video token of the model (the ids from the
  config, see :mod:`m2iv.families`). Needs ``input_ids`` at the patched module's forward, so
  patch the top-level LVLM. With the KV cache each decode step's tokens are looked up the same
  way, which is exactly what a no-cache forward over the whole sequence does.
* a boolean tensor ``[B, P]`` (or ``[P]`` / ``[1, P]`` for every sequence): ``mask[b, t]``
  for absolute position ``t < P`` (counted from the first cached token: the past length is read
  from the cache). The mask must cover the prompt: a forward whose first token lies inside the
  mask must end inside it (``past + T <= P``), however the prompt is fed (one forward or
  chunks), else it is refused, so a mask made for a shorter prompt never steers the rest
  silently. Tokens after the mask (``t >= P``) come as decode steps with the KV cache
  (generated tokens) and are steered. A mask longer than the prompt also covers the tokens
  generated next; a no-cache forward over prompt and generated tokens needs a mask as long as
  it (``handle.set_positions``).
* a callable ``f(input_ids [B, t_end]) -> bool [B, t_end]``: called on all ids seen so far
  (the prompt and, during ``generate()``, the generated tokens: the patch keeps them), and the
  last ``T`` columns steer the current ``T`` tokens. This equals a no-cache forward over the
  same sequence whenever ``f``'s value at ``t`` depends on ids ``<= t`` only (any causal rule).
  Beam search reorders the cache but not this buffer: use greedy/sampling with callables.

The mask is computed once per forward of the patched (top-level) module and handed to every
steered layer as a contiguous bool tensor on that layer's device (the kernels read bool masks
as they are).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["Positions", "check_positions"]

_MISSING = object()


def check_positions(positions: Any) -> tuple[str, Any]:
    """``(kind, value)`` for a ``positions=`` argument; a clear error for anything else."""
    if isinstance(positions, str):
        if positions not in ("all", "text"):
            raise ValueError(f"positions must be 'all', 'text', a boolean mask [B, T] or a "
                             f"callable(input_ids) -> mask; got {positions!r}")
        return positions, positions
    if isinstance(positions, torch.Tensor):
        m = positions
        if m.dtype.is_floating_point or m.dtype.is_complex:
            raise TypeError(f"a positions mask must be bool (or 0/1 ints); got {m.dtype}")
        if m.dim() == 1:
            m = m[None]
        if m.dim() != 2 or m.shape[1] == 0:
            raise ValueError(f"a positions mask must be [T] or [B, T] with T >= 1; got shape "
                             f"{tuple(positions.shape)}")
        if m.dtype != torch.bool and bool(((m != 0) & (m != 1)).any()):
            raise ValueError(f"an integer positions mask must hold 0 and 1 only; got values "
                             f"{sorted(set(m.unique().tolist()))[:8]}")
        return "mask", m.to(device="cpu", dtype=torch.bool)
    if callable(positions):
        return "callable", positions
    raise TypeError(f"positions must be 'all', 'text', a boolean tensor or a callable; got "
                    f"{type(positions).__name__}")


def _in_backward() -> bool:
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get is not None and get() != -1


class Positions:
    """The ``positions=`` rule of one patch and the mask of the forward in progress."""

    def __init__(self, positions: Any, image_token_ids: tuple[int, ...], where: str):
        self.kind, self.value = check_positions(positions)
        self.image_token_ids, self.where = image_token_ids, where
        self._depth = 0
        self._mask: torch.Tensor | None = None
        self._last_mask: torch.Tensor | None = None
        self._mask_dev: dict[torch.device, torch.Tensor | None] = {}
        self._ids: torch.Tensor | None = None  # ids seen so far (callables under generate())

    def reset(self) -> None:
        self._mask = self._last_mask = self._ids = None
        self._mask_dev = {}

    def run(self, sig: inspect.Signature | None, call, args: tuple, kwargs: dict):
        """Run the patched module's forward ``call`` with this forward's mask in force."""
        if self.kind == "all":
            return call(*args, **kwargs)
        mask = self._compute(sig, args, kwargs)
        saved = (self._mask, self._mask_dev)
        self._mask, self._mask_dev = mask, {}
        self._depth += 1
        try:
            return call(*args, **kwargs)
        finally:
            self._depth -= 1
            self._last_mask = mask
            self._mask, self._mask_dev = saved if self._depth else (None, {})

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The bool ``[B, T]`` mask for hidden states ``x`` on ``x``'s device (None: all)."""
        if self.kind == "all":
            return None
        if self._depth > 0:
            mask = self._mask
        elif _in_backward() and self._last_mask is not None:
            mask = self._last_mask  # gradient-checkpointing replay of the last forward
        else:
            raise RuntimeError(
                f"positions={self.kind!r} is computed in the forward of the patched module "
                f"({self.where}), but a steered layer ran outside it; call that module (or "
                "patch the module you call)")
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise RuntimeError(f"positions mask of shape {tuple(mask.shape)} does not match the "
                               f"hidden states {tuple(x.shape[:2])} of a steered layer")
        dev = self._mask_dev.get(x.device, _MISSING)
        if dev is _MISSING:  # once per forward and device: no steered layer converts it again
            dev = self._mask_dev[x.device] = mask.to(x.device).contiguous()
        return dev

    def _compute(self, sig: inspect.Signature | None, args, kwargs) -> torch.Tensor | None:
        bound = dict(kwargs)
        if sig is not None:
            try:
                ba = sig.bind_partial(*args, **kwargs)
                bound = dict(ba.arguments)
                for p in sig.parameters.values():
                    if p.kind == p.VAR_KEYWORD:
                        bound.update(bound.pop(p.name, {}) or {})
            except TypeError:
                pass
        ids = bound.get("input_ids")
        embeds = bound.get("inputs_embeds")
        cache = next((bound[k] for k in ("cache", "past_key_values") if bound.get(k) is not None),
                     None)
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        ref = ids if isinstance(ids, torch.Tensor) else embeds
        if not isinstance(ref, torch.Tensor):
            raise ValueError(f"positions={self.kind!r} needs input_ids or inputs_embeds in the "
                             "call")
        batch, seq = ref.shape[0], ref.shape[1]
        if self.kind == "text":
            if not isinstance(ids, torch.Tensor):
                raise ValueError("positions='text' needs input_ids (to find the image tokens); "
                                 "this call passed inputs_embeds only. Patch the top-level model "
                                 "and call it with input_ids")
            if not self.image_token_ids:
                return None
            mask = ~torch.isin(ids, torch.tensor(self.image_token_ids, device=ids.device))
        elif self.kind == "mask":
            pos = self.value
            if pos.shape[0] not in (1, batch):
                raise ValueError(f"positions mask has {pos.shape[0]} rows but the batch has "
                                 f"{batch} sequences")
            covered = pos.shape[1]
            if past < covered < past + seq:
                raise ValueError(
                    f"the positions mask covers {covered} tokens but this forward feeds tokens "
                    f"{past}..{past + seq - 1}: a mask must cover the whole prompt (tokens past "
                    "its end are steered only as decode steps with the KV cache). Pass a mask "
                    f"of at least {past + seq} columns, True where to steer "
                    "(handle.set_positions(mask) changes it on a live patch)")
            mask = torch.ones(batch, seq, dtype=torch.bool)
            lo, hi = past, min(past + seq, covered)
            if hi > lo:
                mask[:, : hi - lo] = pos[:, lo:hi]
            mask = mask.to(ref.device)
        else:
            mask = self._from_callable(ids, past, batch, seq, ref.device)
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return None  # every token steered: the unmasked fast path (eager: a sync)
        return mask

    def _from_callable(self, ids, past: int, batch: int, seq: int, device) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise ValueError("a callable positions= needs input_ids in the call")
        if past == 0 or self._ids is None:
            if past != 0:
                raise RuntimeError("positions callable: the cache holds tokens this patch "
                                   "never saw, so the full sequence cannot be rebuilt")
            full = ids
        else:
            if self._ids.shape != (batch, past):
                raise RuntimeError(
                    f"positions callable: {past} cached tokens but the patch saw "
                    f"{tuple(self._ids.shape)}; the cache was reordered or reused")
            full = torch.cat([self._ids, ids.to(self._ids.device)], 1)
        self._ids = full
        out = self.value(full)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(full.shape):
            raise ValueError(f"the positions callable must return a tensor of shape "
                             f"{tuple(full.shape)} (one flag per input id); got "
                             f"{tuple(getattr(out, 'shape', ()))}")
        return out[:, -seq:].to(device=device, dtype=torch.bool)
