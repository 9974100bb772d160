"""The rebound forwards: the one wrapper around every style's body, the head-space o_proj
forward, and the top-level forward that computes the positions mask.

The wrapper does what every style needs: binds positional arguments to the layer forward's
parameter names, drops the keyword arguments the family table says the original consumes
itself, switches to the original forward at strength 0 in eager mode (bit-identical), redoes
the class's gradient checkpointing (an instance forward bypasses it), and asks the patch for
the layer's steering of this forward (:meth:`Steering.inject`). The body (a
:class:`~m2iv.patch.styles.Style`'s) only says where the norms, branches and residual adds are.

A forward reads its patch through the small interface :class:`Steering` (implemented by
:class:`~m2iv.patch.handle.PatchHandle`). Under ``torch.compile`` nothing here reads a Python
value that ``set_strength``, ``set_vectors`` or ``select`` change: those change tensors the
graph reads (the banks, the bank index), so a compiled model follows them without recompiling;
the strength-0 shortcut is an eager-mode speed-up (compiled, strength 0 adds zeros).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Protocol

import torch

from ..families import LayerSpec
from .styles import Inject

__all__ = ["Steering", "make_layer_forward", "make_o_proj_forward", "make_top_forward"]

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


class Steering(Protocol):
    """What a rebound forward reads from its patch, per call."""

    strength: float  # 0: eager forwards run the original (read only outside compiled graphs)

    def inject(self, index: int, x: torch.Tensor) -> Inject:
        """The steering of decoder layer ``index`` in this forward (hidden states ``x``)."""


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


def make_layer_forward(steering: Steering, spec: LayerSpec,
                       drop_kwargs: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """``make(original)`` for a :class:`~m2iv.patch.rebind.Rebind` of ``spec``'s layer."""
    parts, idx = spec.parts, spec.index
    body = parts.style.body
    names = _param_names(type(spec.module).forward)
    ckpt = _class_checkpoints(spec.module)

    def impl(hidden_states, *args, **kwargs):
        if args:
            kwargs.update(zip(names, args))
        for k in drop_kwargs:
            kwargs.pop(k, None)
        return body(parts, hidden_states, kwargs, steering.inject(idx, hidden_states))

    def make(original: Callable) -> Callable:
        def forward(module, hidden_states, *args, **kwargs):
            # off: the original forward, bit-identical (eager; a graph must not bake it in)
            if not torch.compiler.is_compiling() and steering.strength == 0.0:
                return original(hidden_states, *args, **kwargs)
            if ckpt:
                return _maybe_checkpoint(module, impl, hidden_states, args, kwargs)
            return impl(hidden_states, *args, **kwargs)

        return forward

    return make


def make_o_proj_forward(steering: Steering, index: int) -> Callable[[Callable], Callable]:
    """Head mode: ``head_steer`` on the o_proj input, then the original o_proj."""

    def make(original: Callable) -> Callable:
        def forward(module, x, *args, **kwargs):
            if torch.compiler.is_compiling() or steering.strength != 0.0:
                x = steering.inject(index, x).head(x)
            return original(x, *args, **kwargs)

        return forward

    return make


def make_top_forward(run: Callable) -> Callable[[Callable], Callable]:
    """The patched top-level module: ``run(signature, original, args, kwargs)`` computes the
    positions mask around the original forward."""

    def make(original: Callable) -> Callable:
        try:
            sig = inspect.signature(original)
        except (TypeError, ValueError):
            sig = None

        def forward(module, *args, **kwargs):
            return run(sig, original, args, kwargs)

        return forward

    return make
