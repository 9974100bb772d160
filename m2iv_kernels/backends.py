"""Backend discovery and choice.

A kernel backend is a module exposing the four launchers of the contract in
``triton_kernels.py`` (``steer_fwd``, ``steer_colsum``, ``rmsnorm_fwd``, ``rmsnorm_bwd``).
``"torch"`` is the reference in ``reference.py`` with PyTorch autograd; it is always available.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("triton", "ext", "torch")
ENV_VAR = "M2IV_BACKEND"

# backend name -> module implementing the launcher contract
_MODULES = {"triton": "m2iv_kernels.triton_kernels", "ext": "m2iv_kernels.ext"}


@functools.cache
def _import(name: str) -> ModuleType | str:
    """The backend's module, or a one-line reason it cannot be used."""
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as err:  # noqa: BLE001 - any failure means "unavailable, and here is why"
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return getattr(module, "UNAVAILABLE", None) or module


def _reason(name: str, device: torch.device) -> str | None:
    """None when ``name`` can run on ``device``, else why not."""
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'triton>=3.6')"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return ("no GPU here; Triton runs on the CPU only under TRITON_INTERPRET=1, set "
                    "before triton is first imported (slow: for tests, not speed)")
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels are not built for {device.type} devices"
    module = _import(name)
    if isinstance(module, str):
        return module
    supports = getattr(module, "supports", None)
    return supports(device) if supports else None


def available_backends(device: torch.device | str | None = None) -> dict[str, bool | str]:
    """Backend name -> ``True``, or the reason it is unavailable, for ``device``.

    ``device`` defaults to the current CUDA device when there is one, else the CPU.
    """
    dev = torch.device(device) if device is not None else default_device()
    return {name: _reason(name, dev) or True for name in BACKENDS}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _auto(device: torch.device) -> str:
    """The automatic choice: Triton on CUDA, the extension where built and faster, else torch."""
    if device.type == "cuda" and _reason("triton", device) is None:
        preferred = _import("ext")
        if not isinstance(preferred, str) and getattr(preferred, "faster_than_triton",
                                                      lambda d: False)(device):
            return "ext"
        return "triton"
    if device.type == "cpu" and _reason("ext", device) is None:
        ext = _import("ext")
        if getattr(ext, "faster_than_reference", lambda d: True)(device):
            return "ext"
    return "torch"


@functools.lru_cache(maxsize=64)
def _resolve_cached(backend: str, env: str | None, device: torch.device) -> str:
    if backend == "auto" and env:
        backend = env
    if backend == "auto":
        return _auto(device)
    if backend not in BACKENDS:
        source = f"{ENV_VAR}={env!r}" if env == backend else f"backend={backend!r}"
        raise ValueError(f"unknown {source}; choose one of 'auto', " + ", ".join(
            repr(b) for b in BACKENDS))
    why = _reason(backend, device)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable on {device}: {why}")
    return backend


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a call; ``auto`` honours the ``M2IV_BACKEND`` variable.
    A constant for ``torch.compile``: it is decided once, outside the graph."""
    return _resolve_cached(backend, os.environ.get(ENV_VAR) or None, device)


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo (and
# with it triton, ~0.7 s) when m2iv_kernels is imported.
resolve._dynamo_marked_constant = True


def kernels(name: str) -> ModuleType:
    """The launcher module of a resolved kernel backend (``triton`` or ``ext``)."""
    module = _import(name)
    assert not isinstance(module, str), module
    return module
