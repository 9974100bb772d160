"""Per-instance rebinding: the one way m2iv changes a model, reversibly.

A patched module gets an instance attribute ``forward`` (or, under an accelerate
``device_map`` hook, ``_old_forward``, so the hook still moves inputs first) bound to a new
function; classes are never touched, so other models are unaffected. Uninstalling restores the
exact previous attribute (normally: deletes the instance attribute), so the unpatched model is
bit-identical to the original. :data:`OWNER` records which live patch rebound each module (to
find and replace an earlier patch of the same model).
"""
from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Rebind", "OWNER"]

_MISSING = object()
#: every module currently rebound by a patch -> that patch (a PatchHandle)
OWNER: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def _forward_attr(module: torch.nn.Module) -> str:
    """accelerate's device hooks keep the real forward in ``_old_forward``: patch that one so the
    hook still moves inputs to the module's device first."""
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


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


class Rebind:
    """One reversible per-instance forward replacement: ``make(original)`` returns the new
    forward (an unbound function of ``(module, *args, **kwargs)``)."""

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
