"""``patch_model``, ``unpatch_model`` and ``steer``: the public functions.

Double patching: ``patch_model`` on an already patched model (through the same module or one
sharing its decoder layers) *replaces* the earlier patch: the old one is removed first (its
handle goes inactive) and the new vectors alone apply; steering is never added twice. Inside
``with steer(...)`` the earlier patch is restored on exit.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..families import describe
from ..vectors import M2IV
from .handle import PatchHandle, handles_touching
from .rebind import OWNER

__all__ = ["patch_model", "unpatch_model", "steer"]


def patch_model(model: torch.nn.Module, vectors: M2IV, *, strength: float = 1.0,
                positions: Any = "all", backend: str = "auto",
                index: torch.Tensor | int | None = None,
                mha_mode: str = "auto", allow_incompatible: bool = False) -> PatchHandle:
    """Steer every forward of ``model`` (and ``generate()``) with ``vectors``.

    Args:
        model: an LVLM (e.g. ``LlavaForConditionalGeneration``), its language model, or a
            text-only causal LM whose decoder layers have a style m2iv knows
            (``m2iv.patch.styles``; found structurally, verified against the layer's forward).
        vectors: an :class:`~m2iv.M2IV` (or a bank: then ``index=``/``handle.select``). Dtype and
            device are converted per layer (each layer's vectors go to that layer's device).
        strength: multiplies every gate; 0 switches steering off.
        positions: ``"all"``, ``"text"``, a boolean mask ``[B, T]`` or a callable
            (:mod:`m2iv.patch.positions`).
        backend: ``"auto" | "triton" | "ext" | "torch"`` for the fused ops.
        index: bank row(s), as in :meth:`PatchHandle.select`.
        mha_mode: ``"auto"`` (fold through o_proj where exact and possible, else head space),
            ``"fold"`` or ``"head"``.
        allow_incompatible: steer with vectors whose metadata names another model type (e.g.
            made for ``qwen2``, applied to ``llama`` of the same shapes); the shapes must fit
            regardless. Without it such vectors are refused.

    Returns:
        The :class:`PatchHandle`. A model already patched has that patch replaced (module
        docstring); the model is left as it was if anything fails.

    Raises:
        UnsupportedModelError: no text decoder layers found, or a layer whose shape or forward
            matches no style (the error names the layer class and what was expected).
        VectorsMismatchError: vectors whose layers/heads/head_dim/hidden size do not fit, or
            that were made for another model type.
        VectorsFormatError: vectors holding NaN/inf (also when written after they were built)
            or on the meta device.
        TypeError, ValueError: a bad ``strength``, ``positions``, ``backend``, ``mha_mode`` or
            ``index``.
    """
    info = describe(model)
    handle = PatchHandle(model, info, vectors, strength=strength, positions=positions,
                         backend=backend, index=index, mha_mode=mha_mode,
                         allow_incompatible=allow_incompatible)
    previous = handles_touching(model, info)
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
    except Exception:  # noqa: BLE001 - a model m2iv cannot describe was not patched by layer
        h = OWNER.get(model)
        if h is not None and h._active:
            h.remove()
            return True
        return False
    handles = handles_touching(model, info)
    for h in handles:
        h.remove()
    return bool(handles)


@contextlib.contextmanager
def steer(model: torch.nn.Module, vectors: M2IV, **kwargs: Any) -> Iterator[PatchHandle]:
    """``with steer(model, vectors, strength=..., positions=...) as handle:`` patches for the
    block and unpatches on exit, restoring any patch that was active before."""
    info = describe(model)
    previous = handles_touching(model, info)
    handle = patch_model(model, vectors, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
        for old in previous:
            if old._replaced_by is handle and not old._active:
                old._install()
