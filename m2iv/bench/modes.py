"""The steering modes a benchmark compares, each on its own copy of the model.

A benchmark that interleaves modes (unsteered, fused, hooks) must switch between them every
repetition. Patching and unpatching one model for that would rebuild the patch each time and,
under ``torch.compile``, change the forwards the compiled graphs were traced from. Instead each
mode gets a :func:`twin` of the model: its own module objects (so its own patch or hooks and its
own compiled graphs) over the very same parameter and buffer tensors (no extra weight memory).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import os
from collections.abc import Callable, Iterator

import torch

__all__ = ["twin", "MODES", "steered_twins"]

#: unsteered; the fused patcher (m2iv.patch_model); the same steering through plain forward
#: hooks; the fused patcher whose compiled graphs call the kernels as opaque ops
#: (``M2IV_COMPILED_OPS=kernels``; eager it is ``fused``)
MODES = ("unsteered", "fused", "hooks", "fused_kernels")


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree that shares every parameter and buffer tensor."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def steered_twins(model: torch.nn.Module, vectors, *, backend: str = "auto",
                  modes: tuple[str, ...] = MODES[:3], **patch_kwargs
                  ) -> tuple[dict[str, torch.nn.Module], Callable[[], None]]:
    """``({mode: model copy}, undo)``: ``unsteered`` is ``model`` itself, ``fused`` a twin
    patched with ``m2iv.patch_model(vectors, backend=backend, **patch_kwargs)``, ``hooks`` a
    twin steered by :class:`m2iv.testing.HookReference`. ``undo`` removes patch and hooks."""
    import m2iv
    from m2iv.testing import add_steering_hooks

    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    models, undo = {}, []
    for mode in modes:
        if mode == "unsteered":
            models[mode] = model
        elif mode.startswith("fused"):
            models[mode] = twin(model)
            ctx = contextlib.nullcontext()
            if mode == "fused_kernels":
                from m2iv_kernels.prepared import COMPILED_ENV
                ctx = _env(COMPILED_ENV, "kernels")
            with ctx:
                undo.append(m2iv.patch_model(models[mode], vectors, backend=backend,
                                             **patch_kwargs).remove)
        else:
            models[mode] = twin(model)
            undo.append(add_steering_hooks(models[mode], vectors,
                                           strength=patch_kwargs.get("strength", 1.0)).remove)

    def remove() -> None:
        for fn in undo:
            fn()

    return models, remove


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` meanwhile."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
