"""``patch_model``: steer every forward pass (and ``generate()``) of a Hugging Face model with
M2IV vectors through the fused ops of ``m2iv_kernels``.

How (DESIGN.md sections 1 and 4; per-family facts in ``m2iv/families.py``):

* Per-instance rebinding only: the patched modules get an instance attribute ``forward`` (or,
  under an accelerate ``device_map`` hook, ``_old_forward``) bound to a new function; classes
  are never touched, so other models are unaffected. ``unpatch_model`` / ``handle.remove()``
  restore the exact previous attributes (normally: delete the instance attribute), so the
  unpatched model is bit-identical to the original.
* ``"llama"`` layers: the decoder-layer forward is rewritten as::

      residual = h;  h = input_layernorm(h);  a = self_attn(h, **kwargs)[0]
      normed, residual = steer_add_rmsnorm(residual, a, c_l, strength, post_attention_layernorm)
      h = steer_add(residual, mlp(normed), b_l, beta_l * strength)

  with ``c_l = o_proj.weight @ concat_h(alpha[l,h] * a[l,h])`` (``[D]``, or ``[N, D]`` for a
  bank): the MHA term folded through o_proj ("fold" mode, exact by linearity), computed in
  float32 and cached until the vectors, the strength or o_proj's weight change. While the
  vectors require grad (training) it is recomputed in every forward, in o_proj's dtype, so
  gradients reach ``a`` and ``alpha``. If o_proj is not a plain float ``nn.Linear`` (quantised,
  offloaded) the layer uses "head" mode instead: ``head_steer`` on the o_proj input.
* ``"sandwich"`` layers (Gemma 3): ``head_steer`` on the o_proj input (a norm follows o_proj)
  and ``steer_add`` as the final residual add carrying the MLP vector.
* Layers not covered by the vectors are not patched at all.

Positions (``positions=``): which tokens are steered, ``m(t)`` in DESIGN.md section 1.

* ``"all"`` (default): every token; no mask is built (the fast path).
* ``"text"``: every token whose id is not an image/video token of the model (ids from the
  config, see families.py). Needs ``input_ids`` at the patched module's forward, so patch the
  top-level LVLM. With the KV cache each decode step's tokens are looked up the same way, which
  is exactly what a no-cache forward over the whole sequence does.
* a boolean tensor ``[B, P]`` (or ``[P]`` / ``[1, P]`` for every sequence): ``mask[b, t]``
  for absolute position ``t < P`` (counted from the first cached token: the past length is read
  from the cache); positions ``t >= P``, e.g. generated tokens, are steered. The same rule
  applies with and without the cache, so decode steps match a full forward.
* a callable ``f(input_ids [B, t_end]) -> bool [B, t_end]``: called on all ids seen so far
  (the prompt and, during ``generate()``, the generated tokens: the patch keeps them), and the
  last ``T`` columns steer the current ``T`` tokens. This equals a no-cache forward over the
  same sequence whenever ``f``'s value at ``t`` depends on ids ``<= t`` only (any causal rule).
  Beam search reorders the cache but not this buffer: use greedy/sampling with callables.

Double patching: ``patch_model`` on an already patched model (through the same module or one
sharing its decoder layers) *replaces* the earlier patch: the old one is removed first (its
handle goes inactive) and the new vectors alone apply; steering is never added twice. Inside
``with steer(...)`` the earlier patch is restored on exit.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

import m2iv_kernels as mk

from .families import LayerSpec, ModelInfo, describe, layer_device
from .vectors import M2IV

__all__ = ["PatchHandle", "patch_model", "unpatch_model", "steer", "placement"]

_MISSING = object()
# every module currently rebound by a handle -> that handle (to detect double patching)
_OWNER: "weakref.WeakKeyDictionary[torch.nn.Module, PatchHandle]" = weakref.WeakKeyDictionary()
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


def _forward_attr(module: torch.nn.Module) -> str:
    """accelerate's device hooks keep the real forward in ``_old_forward``: patch that one so the
    hook still moves inputs to the module's device first."""
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


class _Rebind:
    """One reversible per-instance forward replacement."""

    def __init__(self, module: torch.nn.Module, make: Callable[[Callable], Callable]):
        self.module = module
        self.attr = _forward_attr(module)
        self.saved = module.__dict__.get(self.attr, _MISSING)
        self.original = getattr(module, self.attr)
        self.new = types.MethodType(_like(make(self.original), self.original), module)
        self.installed = False

    def install(self) -> None:
        setattr(self.module, self.attr, self.new)
        self.installed = True

    def uninstall(self) -> None:
        if not self.installed:
            return
        if self.saved is _MISSING:
            self.module.__dict__.pop(self.attr, None)
        else:
            setattr(self.module, self.attr, self.saved)
        self.installed = False


def _like(fn: Callable, original: Callable) -> Callable:
    """Give the replacement the original's name, doc and signature: transformers inspects
    ``model.forward``'s signature (e.g. generate() validates its kwargs against it)."""
    for attr in ("__name__", "__qualname__", "__doc__"):
        try:
            setattr(fn, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    try:
        sig = inspect.signature(original)  # bound: without self
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        fn.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    except (TypeError, ValueError):
        pass
    return fn


def placement(spec: LayerSpec) -> torch.device:
    """Where a layer's vectors live: the device of that layer's parameters (device_map aware)."""
    return layer_device(spec.module)


def _param_names(fn: Callable) -> list[str]:
    """Positional parameter names after ``self, hidden_states`` of a (decorated) forward."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if names and names[0] == "self":
        names = names[1:]
    return names[1:]


def _class_checkpoints(layer: torch.nn.Module) -> bool:
    """Whether the layer's *class* forward does gradient checkpointing (transformers'
    ``GradientCheckpointingLayer`` wraps ``cls.forward``; where ``__call__`` checkpoints
    instead, an instance forward runs inside it and nothing is needed)."""
    code = getattr(type(layer).forward, "__code__", None)
    return getattr(code, "co_name", "") == "forward_with_checkpointing"


def _maybe_checkpoint(layer: torch.nn.Module, impl: Callable, hidden_states, args, kwargs):
    """Gradient checkpointing as the class forward (which an instance forward bypasses) would
    do it: same conditions, same cache handling."""
    if (getattr(layer, "gradient_checkpointing", False) and layer.training
            and torch.is_grad_enabled()):
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(layer, "_can_checkpoint_with_cache", False):
            for k in _CACHE_KWARGS:
                if kwargs.get(k) is not None:
                    kwargs[k] = None
        return layer._gradient_checkpointing_func(functools.partial(impl, **kwargs),
                                                  hidden_states, *args)
    return impl(hidden_states, *args, **kwargs)


def _in_backward() -> bool:
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get is not None and get() != -1


class _LayerState:
    """The steering tensors of one patched decoder layer, cached on the layer's device."""

    def __init__(self, spec: LayerSpec, slot: int, mode: str, vectors: M2IV):
        self.spec, self.slot, self.mode = spec, slot, mode
        self.device = placement(spec)
        self.post_norm = spec.norm("post_attn_norm")
        self.post_eps = spec.norm_eps("post_attn_norm")
        self.vectors = vectors  # a state belongs to one vectors object (set_vectors: new states)
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

    def tensors(self, handle: PatchHandle, device: torch.device) -> dict[str, torch.Tensor]:
        s = handle._strength
        if handle._vec_grad and torch.is_grad_enabled():
            return self._compute(self.vectors, s, device, grad=True)
        key = self._cache_key(s, device)
        if key != self._key:
            # plain tensors even under inference_mode, so a later autograd forward may use them
            with torch.inference_mode(False), torch.no_grad():
                self._cached = self._compute(self.vectors, s, device, grad=False)
            self._key = key
        return self._cached

    def _compute(self, v: M2IV, s: float, device: torch.device,
                 grad: bool) -> dict[str, torch.Tensor]:
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
            out["c_gate"] = torch.full(beta.shape, float(s), dtype=torch.float32, device=device)
        else:
            out["a"] = a
            out["alpha"] = alpha.float() * s
            out["c"] = torch.zeros(b.shape, dtype=torch.float32, device=device)
            out["c_gate"] = torch.zeros(beta.shape, dtype=torch.float32, device=device)
        return out


class _Prewarm:
    """The handle fields ``_LayerState.tensors`` reads, for filling caches at patch time."""

    _vec_grad = False

    def __init__(self, strength: float):
        self._strength = strength


class PatchHandle:
    """The live patch of one model; returned by :func:`patch_model`.

    Methods take effect on the next forward, with no re-patching: :meth:`set_vectors`,
    :meth:`set_strength`, :meth:`select`, :meth:`set_positions`; :meth:`remove` unpatches. Also a
    context manager (``with patch_model(...) as h:`` removes the patch on exit).
    """

    def __init__(self, model: torch.nn.Module, info: ModelInfo, vectors: M2IV, *,
                 strength: float, positions: Any, backend: str, index: Any, mha_mode: str):
        self.model, self.info = model, info
        self._backend = _check_backend(backend, info)
        if mha_mode not in ("auto", "fold", "head"):
            raise ValueError(f"mha_mode must be 'auto', 'fold' or 'head'; got {mha_mode!r}")
        self._mha_mode = mha_mode
        self._strength = _check_strength(strength)
        self._pos_kind, self._positions = _check_positions(positions)
        self._vectors, self._vec_grad, self._states = self._prepare(vectors)
        self._index_value: torch.Tensor | int | None = None
        self._index_dev: dict[torch.device, torch.Tensor] = {}
        if index is not None:
            self._index_value = self._check_index(index, self._vectors)
        # positions state
        self._depth = 0
        self._mask: torch.Tensor | None = None
        self._last_mask: torch.Tensor | None = None
        self._mask_dev: dict[torch.device, torch.Tensor | None] = {}
        self._ids_buffer: torch.Tensor | None = None
        # installation state
        self._top: _Rebind | None = None
        self._layer_rebinds: list[_Rebind] = []
        self._active = False
        self._replaced_by: PatchHandle | None = None

    # ------------------------------------------------------------------ public API

    @property
    def active(self) -> bool:
        """True while this patch is installed."""
        return self._active

    @property
    def vectors(self) -> M2IV:
        return self._vectors

    @property
    def strength(self) -> float:
        return self._strength

    @property
    def positions(self) -> Any:
        return self._positions

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def index(self) -> torch.Tensor | int | None:
        return self._index_value

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers this patch steers."""
        return tuple(self._states)

    @property
    def modes(self) -> dict[int, str]:
        """Per steered layer: ``"fold"`` (MHA term folded through o_proj) or ``"head"``."""
        return {i: st.mode for i, st in self._states.items()}

    def set_vectors(self, vectors: M2IV) -> None:
        """Swap the vectors (checked against the model first; on error nothing changes).

        A bank keeps the current :meth:`select` index if it is in range; a single set drops it.
        """
        self._check_live()
        new_vectors, vec_grad, states = self._prepare(vectors)
        index = self._index_value
        if new_vectors.is_bank and index is not None:
            self._check_index(index, new_vectors)
        elif not new_vectors.is_bank:
            index = None
        same_layout = (list(states) == list(self._states) and all(
            states[i].mode == self._states[i].mode for i in states))
        if same_layout:
            self._vectors, self._vec_grad, self._states = new_vectors, vec_grad, states
            self._index_value = index
            return
        old = (self._vectors, self._vec_grad, self._states, self._index_value)
        self._uninstall_layers()
        self._vectors, self._vec_grad, self._states = new_vectors, vec_grad, states
        self._index_value = index
        self._index_dev = {}
        try:
            self._install_layers()
        except BaseException:
            self._uninstall_layers()
            self._vectors, self._vec_grad, self._states, self._index_value = old
            self._install_layers()
            raise

    def set_strength(self, strength: float) -> None:
        """Multiply every gate by ``strength`` from the next forward on; 0 switches steering
        off entirely (the patched layers run their original forward)."""
        self._check_live()
        self._strength = _check_strength(strength)

    def select(self, index: torch.Tensor | Any | int | None) -> None:
        """Pick the bank row for each sequence: an int (every sequence), or ints ``[B]``;
        ``None`` clears the selection."""
        self._check_live()
        self._index_value = None if index is None else self._check_index(index, self._vectors)
        self._index_dev = {}

    def set_positions(self, positions: Any) -> None:
        """Change which tokens are steered (see the module docstring)."""
        self._check_live()
        self._pos_kind, self._positions = _check_positions(positions)
        self._ids_buffer = None

    def remove(self) -> None:
        """Unpatch: restore every rebound forward exactly. Idempotent."""
        if self._active:
            self._uninstall()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return (f"PatchHandle({state}, {self.info.model_type}, layers={list(self.layers)}, "
                f"strength={self._strength}, positions={self._pos_kind!r}, "
                f"backend={self._backend!r})")

    # ------------------------------------------------------------------ preparation

    def _check_live(self) -> None:
        if not self._active:
            why = ("it was replaced by a later patch_model call on the same model"
                   if self._replaced_by is not None else "it was removed")
            raise RuntimeError(f"this patch is no longer active: {why}")

    def _prepare(self, vectors: M2IV) -> tuple[M2IV, bool, dict[int, _LayerState]]:
        if not isinstance(vectors, M2IV):
            raise TypeError(f"vectors must be an m2iv.M2IV; got {type(vectors).__name__}")
        vectors.check_model(self.info.model)
        states = {}
        for slot, i in enumerate(vectors.layers):
            spec = self.info.layer(i)
            states[i] = _LayerState(spec, slot, self._layer_mode(spec), vectors)
        vec_grad = any(t.requires_grad for t in vectors.tensors().values())
        if not vec_grad:  # place each layer's vectors on its device now (device_map aware)
            for st in states.values():
                st.tensors(_Prewarm(self._strength), st.device)
        return vectors, vec_grad, states

    def _layer_mode(self, spec: LayerSpec) -> str:
        if spec.style == "sandwich":
            if self._mha_mode == "fold":
                raise ValueError(f"mha_mode='fold' is impossible for layer {spec.index} of "
                                 f"{self.info.model_type}: a norm follows o_proj (sandwich "
                                 "layer), so the MHA vectors must stay in head space")
            return "head"
        if self._mha_mode == "head":
            return "head"
        if spec.o_proj_weight is None:
            if self._mha_mode == "fold":
                raise ValueError(f"mha_mode='fold' needs a plain float nn.Linear o_proj; layer "
                                 f"{spec.index} has {type(spec.o_proj).__name__}")
            return "head"
        return "fold"

    @staticmethod
    def _check_index(index: Any, vectors: M2IV) -> torch.Tensor | int:
        if not vectors.is_bank:
            raise ValueError("select() picks rows of a bank of vectors, but the patched vectors "
                             "are a single set (make a bank with M2IV.stack)")
        n = vectors.n_bank
        if isinstance(index, int) and not isinstance(index, bool):
            if not 0 <= index < n:
                raise ValueError(f"bank row {index} out of range for a bank of {n}")
            return index
        t = torch.as_tensor(index)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"index must hold integers; got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"index must be an int or a 1-D list of ints (one per sequence); "
                             f"got shape {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"index values must lie in [0, {n}) for a bank of {n}; got "
                             f"{t.tolist()}")
        return t.to(torch.long).cpu()

    # ------------------------------------------------------------------ install / uninstall

    def _install(self) -> None:
        try:
            self._top = _Rebind(self.model, self._make_top_forward)
            self._top.install()
            _OWNER[self.model] = self
            self._install_layers()
        except BaseException:
            self._uninstall()
            raise
        self._active = True
        self._replaced_by = None

    def _install_layers(self) -> None:
        for i, st in self._states.items():
            spec = st.spec
            maker = self._make_sandwich_forward if spec.style == "sandwich" else \
                self._make_llama_forward
            rb = _Rebind(spec.module, functools.partial(maker, st))
            self._layer_rebinds.append(rb)
            rb.install()
            _OWNER[spec.module] = self
            if st.mode == "head":
                rb = _Rebind(spec.o_proj, functools.partial(self._make_o_proj_forward, st))
                self._layer_rebinds.append(rb)
                rb.install()
                _OWNER[spec.o_proj] = self

    def _uninstall_layers(self) -> None:
        for rb in reversed(self._layer_rebinds):
            rb.uninstall()
            if _OWNER.get(rb.module) is self:
                del _OWNER[rb.module]
        self._layer_rebinds = []

    def _uninstall(self) -> None:
        self._uninstall_layers()
        if self._top is not None:
            self._top.uninstall()
            if _OWNER.get(self.model) is self:
                del _OWNER[self.model]
            self._top = None
        self._active = False
        self._mask = self._last_mask = self._ids_buffer = None
        self._mask_dev, self._index_dev = {}, {}

    # ------------------------------------------------------------------ forward-time helpers

    def _index_for(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self._vectors.is_bank:
            return None
        value = self._index_value
        if value is None:
            raise ValueError(f"the patched vectors are a bank of {self._vectors.n_bank}: call "
                             "handle.select(index) (an int, or one int per sequence) first")
        batch = x.shape[0]
        cached = self._index_dev.get(x.device)
        if cached is not None and cached.shape[0] == batch:
            return cached
        if isinstance(value, int):
            t = torch.full((batch,), value, dtype=torch.long, device=x.device)
        else:
            if value.shape[0] != batch:
                raise ValueError(f"select() was given {value.shape[0]} bank indices but the "
                                 f"batch has {batch} sequences")
            t = value.to(x.device)
        self._index_dev[x.device] = t
        return t

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._pos_kind == "all":
            return None
        if self._depth > 0:
            mask = self._mask
        elif _in_backward() and self._last_mask is not None:
            mask = self._last_mask  # gradient-checkpointing replay of the last forward
        else:
            raise RuntimeError(
                f"positions={self._pos_kind!r} is computed in the forward of the patched "
                f"module ({type(self.model).__name__}), but a steered layer ran outside it; call "
                "that module (or patch the module you call)")
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise RuntimeError(f"positions mask of shape {tuple(mask.shape)} does not match the "
                               f"hidden states {tuple(x.shape[:2])} of a steered layer")
        dev = self._mask_dev.get(x.device, _MISSING)
        if dev is _MISSING:
            # float32 once per forward and device: the kernels' own layout, so no steered
            # layer converts the mask again (row_meta's .to/.contiguous become no-ops)
            dev = self._mask_dev[x.device] = mask.to(x.device, torch.float32)
        return dev

    def _compute_mask(self, sig: inspect.Signature | None, args, kwargs) -> torch.Tensor | None:
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
            raise ValueError(f"positions={self._pos_kind!r} needs input_ids or inputs_embeds in "
                             "the call")
        batch, seq = ref.shape[0], ref.shape[1]
        kind, pos = self._pos_kind, self._positions
        if kind == "text":
            if not isinstance(ids, torch.Tensor):
                raise ValueError("positions='text' needs input_ids (to find the image tokens); "
                                 "this call passed inputs_embeds only. Patch the top-level model "
                                 "and call it with input_ids")
            image_ids = self.info.image_token_ids
            if not image_ids:
                return None
            mask = ~torch.isin(ids, torch.tensor(image_ids, device=ids.device))
        elif kind == "mask":
            if pos.shape[0] not in (1, batch):
                raise ValueError(f"positions mask has {pos.shape[0]} rows but the batch has "
                                 f"{batch} sequences")
            mask = torch.ones(batch, seq, dtype=torch.bool)
            lo, hi = past, min(past + seq, pos.shape[1])
            if hi > lo:
                mask[:, : hi - lo] = pos[:, lo:hi]
            mask = mask.to(ref.device)
        else:  # callable
            if not isinstance(ids, torch.Tensor):
                raise ValueError("a callable positions= needs input_ids in the call")
            if past == 0 or self._ids_buffer is None:
                if past != 0:
                    raise RuntimeError("positions callable: the cache holds tokens this patch "
                                       "never saw, so the full sequence cannot be rebuilt")
                full = ids
            else:
                if self._ids_buffer.shape != (batch, past):
                    raise RuntimeError(
                        f"positions callable: {past} cached tokens but the patch saw "
                        f"{tuple(self._ids_buffer.shape)}; the cache was reordered or reused")
                full = torch.cat([self._ids_buffer, ids.to(self._ids_buffer.device)], 1)
            self._ids_buffer = full
            out = pos(full)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(full.shape):
                raise ValueError(f"the positions callable must return a tensor of shape "
                                 f"{tuple(full.shape)} (one flag per input id); got "
                                 f"{tuple(getattr(out, 'shape', ()))}")
            mask = out[:, -seq:].to(device=ref.device, dtype=torch.bool)
        if bool(mask.all()):
            return None  # every token steered: the unmasked fast path
        return mask

    # ------------------------------------------------------------------ the rebound forwards

    def _make_top_forward(self, original: Callable) -> Callable:
        try:
            sig = inspect.signature(original)
        except (TypeError, ValueError):
            sig = None
        handle = self

        def forward(module, *args, **kwargs):
            if handle._pos_kind == "all":
                return original(*args, **kwargs)
            mask = handle._compute_mask(sig, args, kwargs)
            saved = (handle._mask, handle._mask_dev)
            handle._mask, handle._mask_dev = mask, {}
            handle._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                handle._depth -= 1
                handle._last_mask = mask
                handle._mask, handle._mask_dev = saved if handle._depth else (None, {})

        return forward

    def _make_llama_forward(self, st: _LayerState, original: Callable) -> Callable:
        handle, spec, idx = self, st.spec, st.spec.index
        lay = spec.layout
        names = _param_names(type(spec.module).forward)
        drop = lay.attn_drop_kwargs
        ckpt = _class_checkpoints(spec.module)
        offset = lay.norm_offset

        def impl(hidden_states, *args, **kwargs):
            layer = spec.module
            if args:
                kwargs.update(zip(names, args))
            for k in drop:
                kwargs.pop(k, None)
            st = handle._states[idx]  # looked up per call: set_vectors swaps the states
            t = st.tensors(handle, hidden_states.device)
            mask = handle._mask_for(hidden_states)
            index = handle._index_for(hidden_states)
            residual = hidden_states
            h = getattr(layer, lay.input_norm)(hidden_states)
            attn = getattr(layer, lay.attn)(hidden_states=h, **kwargs)[0]
            normed, residual = mk.steer_add_rmsnorm(
                residual, attn, t["c"], t["c_gate"], st.post_norm.weight, st.post_eps,
                weight_offset=offset, mask=mask, index=index, backend=handle._backend)
            out = getattr(layer, lay.mlp)(normed)
            return mk.steer_add(residual, out, t["b"], t["beta"], mask=mask, index=index,
                                backend=handle._backend)

        def forward(module, hidden_states, *args, **kwargs):
            if handle._strength == 0.0:  # off: the original forward, bit-identical
                return original(hidden_states, *args, **kwargs)
            if ckpt:
                return _maybe_checkpoint(module, impl, hidden_states, args, kwargs)
            return impl(hidden_states, *args, **kwargs)

        return forward

    def _make_sandwich_forward(self, st: _LayerState, original: Callable) -> Callable:
        handle, spec, idx = self, st.spec, st.spec.index
        lay = spec.layout
        names = _param_names(type(spec.module).forward)
        drop = lay.attn_drop_kwargs
        ckpt = _class_checkpoints(spec.module)

        def impl(hidden_states, *args, **kwargs):
            layer = spec.module
            if args:
                kwargs.update(zip(names, args))
            for k in drop:
                kwargs.pop(k, None)
            st = handle._states[idx]  # looked up per call: set_vectors swaps the states
            t = st.tensors(handle, hidden_states.device)
            mask = handle._mask_for(hidden_states)
            index = handle._index_for(hidden_states)
            residual = hidden_states
            h = getattr(layer, lay.input_norm)(hidden_states)
            h = getattr(layer, lay.attn)(hidden_states=h, **kwargs)[0]  # o_proj: head_steer
            h = getattr(layer, lay.post_attn_norm)(h)
            h = residual + h
            residual = h
            h = getattr(layer, lay.pre_ff_norm)(h)
            h = getattr(layer, lay.mlp)(h)
            h = getattr(layer, lay.post_ff_norm)(h)
            return mk.steer_add(residual, h, t["b"], t["beta"], mask=mask, index=index,
                                backend=handle._backend)

        def forward(module, hidden_states, *args, **kwargs):
            if handle._strength == 0.0:  # off: the original forward, bit-identical
                return original(hidden_states, *args, **kwargs)
            if ckpt:
                return _maybe_checkpoint(module, impl, hidden_states, args, kwargs)
            return impl(hidden_states, *args, **kwargs)

        return forward

    def _make_o_proj_forward(self, st: _LayerState, original: Callable) -> Callable:
        handle, idx = self, st.spec.index

        def forward(module, x, *args, **kwargs):
            if handle._strength != 0.0:
                t = handle._states[idx].tensors(handle, x.device)
                inplace = not torch.is_grad_enabled() and not x.requires_grad
                x = mk.head_steer(x, t["a"], t["alpha"], mask=handle._mask_for(x),
                                  index=handle._index_for(x), inplace=inplace,
                                  backend=handle._backend)
            return original(x, *args, **kwargs)

        return forward


# ---------------------------------------------------------------------- argument checks

def _check_strength(strength: Any) -> float:
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise TypeError(f"strength must be a number; got {strength!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"strength must be finite; got {s}")
    return s


def _check_positions(positions: Any) -> tuple[str, Any]:
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
        if m.dim() != 2:
            raise ValueError(f"a positions mask must be [T] or [B, T]; got shape "
                             f"{tuple(positions.shape)}")
        return "mask", m.to(device="cpu", dtype=torch.bool)
    if callable(positions):
        return "callable", positions
    raise TypeError(f"positions must be 'all', 'text', a boolean tensor or a callable; got "
                    f"{type(positions).__name__}")


def _check_backend(backend: str, info: ModelInfo) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    if backend == "auto":
        return backend
    known = mk.available_backends(torch.device("cpu"))
    if backend not in known:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of "
                         f"{', '.join(repr(b) for b in known)}")
    devices = {layer_device(layer) for layer in info.layers}
    for dev in devices:
        why = mk.available_backends(dev).get(backend)
        if why is not True:
            raise RuntimeError(f"backend {backend!r} is unavailable on {dev}: {why}")
    return backend


def _handles_touching(model: torch.nn.Module, info: ModelInfo) -> list[PatchHandle]:
    found: list[PatchHandle] = []
    candidates = [model, *info.layers]
    for layer in info.layers:
        attn = getattr(layer, info.layout.attn, None)
        o_proj = getattr(attn, info.layout.o_proj, None) if attn is not None else None
        if o_proj is not None:
            candidates.append(o_proj)
    for m in candidates:
        h = _OWNER.get(m)
        if h is not None and h._active and h not in found:
            found.append(h)
    return found


# ---------------------------------------------------------------------- public functions

def patch_model(model: torch.nn.Module, vectors: M2IV, *, strength: float = 1.0,
                positions: Any = "all", backend: str = "auto",
                index: torch.Tensor | int | None = None,
                mha_mode: str = "auto") -> PatchHandle:
    """Steer every forward of ``model`` (and ``generate()``) with ``vectors``.

    Args:
        model: an LVLM (e.g. ``LlavaForConditionalGeneration``), its language model, or a
            text-only causal LM, of a family in ``m2iv/families.py``.
        vectors: an :class:`~m2iv.M2IV` (or a bank: then ``index=``/``handle.select``). Dtype and
            device are converted per layer (each layer's vectors go to that layer's device).
        strength: multiplies every gate; 0 switches steering off.
        positions: ``"all"``, ``"text"``, a boolean mask ``[B, T]`` or a callable (module doc).
        backend: ``"auto" | "triton" | "ext" | "torch"`` for the fused ops.
        index: bank row(s), as in :meth:`PatchHandle.select`.
        mha_mode: ``"auto"`` (fold through o_proj where exact and possible, else head space),
            ``"fold"`` or ``"head"``.

    Returns:
        The :class:`PatchHandle`. A model already patched has that patch replaced (see module
        docstring); the model is left as it was if anything fails.

    Raises:
        UnsupportedModelError: an architecture not in the family table.
        VectorsMismatchError: vectors whose layers/heads/head_dim/hidden size do not fit.
    """
    info = describe(model)
    handle = PatchHandle(model, info, vectors, strength=strength, positions=positions,
                         backend=backend, index=index, mha_mode=mha_mode)
    previous = _handles_touching(model, info)
    for old in previous:
        old._uninstall()
    try:
        handle._install()
    except BaseException:
        for old in previous:
            old._install()
        raise
    for old in previous:
        old._replaced_by = handle
    return handle


def unpatch_model(model: torch.nn.Module) -> bool:
    """Remove every patch on ``model`` (or on its decoder layers); True if there was one."""
    try:
        info = describe(model)
    except Exception:  # noqa: BLE001 - an unsupported model cannot have been patched
        h = _OWNER.get(model)
        if h is not None and h._active:
            h.remove()
            return True
        return False
    handles = _handles_touching(model, info)
    for h in handles:
        h.remove()
    return bool(handles)


@contextlib.contextmanager
def steer(model: torch.nn.Module, vectors: M2IV, **kwargs: Any) -> Iterator[PatchHandle]:
    """``with steer(model, vectors, strength=..., positions=...) as handle:`` patches for the
    block and unpatches on exit, restoring any patch that was active before."""
    info = describe(model)
    previous = _handles_touching(model, info)
    handle = patch_model(model, vectors, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
        for old in previous:
            if old._replaced_by is handle and not old._active:
                old._install()
