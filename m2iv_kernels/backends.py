"""The kernel backends: one table says what each is, where it runs and when ``auto`` picks it.

Adding a backend is one :class:`Backend` entry in :data:`BACKENDS` plus its launcher module.
A launcher module implements the contract below and may define ``UNAVAILABLE`` (a one-line
reason it cannot run at all, else None) and ``supports(device) -> str | None`` (why it cannot
run on that device, else None). ``"torch"`` has no launchers: ``ops.py`` runs the reference
(``reference.py``) with PyTorch autograd for it.

Launcher contract (every function takes and returns tensors on one device):
    steer_fwd(x, residual, vectors, gates, meta, out=None) -> out
        ``out = [residual +] x + mask * gates * vectors``; ``out`` may be ``x`` or ``residual``.
    steer_colsum(grad, meta) -> [N, C] fp32
        per bank row, the sum over its rows of ``mask * grad``.
    rmsnorm_fwd(residual, x, vectors, gates, weight, eps, weight_offset, meta, out=None)
        -> (normed, new_residual, rstd fp32 of the leading shape); ``new_residual`` goes into
        ``out`` when given (contiguous rows; may be ``residual``).
    rmsnorm_bwd(grad_normed, grad_residual, new_residual, rstd, weight, weight_offset,
                need_dw, meta) -> (d new_residual, d weight [C] fp32 | None, [N, C] fp32)
Activations are ``[..., C]`` tensors whose leading dimensions collapse into ``R`` rows of one
row stride with unit column stride (``_checks.as_rows`` views; the ops copy when no such view
exists); outputs have their shape. Vectors are a contiguous bank ``[N, H, Dh]`` with gates
``[N, H]`` (the residual ops: ``H = 1``, also given as ``[N, C]`` / ``[C]`` with gates ``[N]`` /
``[]``), and ``meta`` the per-row metadata :class:`m2iv_kernels._checks.Rows`. Rows whose bank
index lies outside ``[0, N)`` are left unsteered and get no vector gradient. Sums are fp32, and
column sums (vector, gate and weight gradients) must be deterministic: same inputs, same bits.

The automatic choice, per device type: the first available backend whose rule there is
``"default"``; then every available backend whose rule is ``"if_faster"`` replaces it when a
one-time measurement (``autochoice.py``) finds it faster.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["Backend", "BACKENDS", "available_backends", "resolve_backend", "resolve",
           "launchers"]

ENV_VAR = "M2IV_BACKEND"
ANY = "*"  # a device-type key matching every device


def _triton_ready(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'triton>=3.6')"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton runs on the CPU only in its interpreter: TRITON_INTERPRET=1, set before "
                "triton is first imported (slow: for tests, not speed)")
    return None


@dataclass(frozen=True)
class Backend:
    """One kernel backend.

    Attributes:
        name: the ``backend=`` value.
        module: the launcher module (None: the PyTorch reference, no launchers).
        devices: device types it has kernels for (``ANY``: every device).
        auto: device type (or ``ANY``) -> ``"default"`` or ``"if_faster"``; absent: never
            picked by ``auto`` on that device type.
        ready: a check that needs no import of ``module``: None, or why it cannot run.
    """

    name: str
    module: str | None
    devices: tuple[str, ...]
    auto: Mapping[str, str]
    ready: Callable[[torch.device], str | None] = lambda device: None

    def auto_rule(self, device: torch.device) -> str | None:
        return self.auto.get(device.type, self.auto.get(ANY))


BACKENDS: tuple[Backend, ...] = (
    Backend("triton", "m2iv_kernels.triton_backend", ("cuda", "cpu"), {"cuda": "default"},
            _triton_ready),
    Backend("ext", "m2iv_kernels.ext", ("cpu", "cuda"), {"cpu": "if_faster", "cuda": "if_faster"}),
    Backend("torch", None, (ANY,), {ANY: "default"}),
)


def _get(name: str) -> Backend:
    return next(b for b in BACKENDS if b.name == name)


@functools.cache
def _import(name: str) -> ModuleType | str:
    """The backend's launcher module, or a one-line reason it cannot be used."""
    try:
        module = importlib.import_module(_get(name).module)
    except Exception as err:  # noqa: BLE001 - any failure means "unavailable, and here is why"
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return getattr(module, "UNAVAILABLE", None) or module


def unavailable(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else why not."""
    b = _get(name)
    if ANY not in b.devices and device.type not in b.devices:
        return f"{name} has no kernels for {device.type} devices"
    why = b.ready(device)
    if why is not None or b.module is None:
        return why
    module = _import(name)
    if isinstance(module, str):
        return module
    supports = getattr(module, "supports", None)
    return supports(device) if supports else None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_backends(device: torch.device | str | None = None) -> dict[str, bool | str]:
    """Backend name -> ``True``, or the reason it is unavailable, for ``device``.

    ``device`` defaults to the current CUDA device when there is one, else the CPU.
    """
    dev = torch.device(device) if device is not None else default_device()
    return {b.name: unavailable(b.name, dev) or True for b in BACKENDS}


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """The backend (``"triton"``, ``"ext"``, ``"torch"``, ...) that the ops run for ``backend``
    on ``device`` (default: as :func:`available_backends`); ``auto`` honours ``M2IV_BACKEND``.

    What a benchmark reports, and what to call once before a CUDA-graph capture or a
    ``torch.compile`` of a steered model: ``auto`` is measured on the first plain call and
    fixed from then on (a measurement that cannot be made yet is not cached). Raises for an
    unknown or unavailable backend, with the reason.
    """
    return resolve(backend, torch.device(device) if device is not None else default_device())


def _auto(device: torch.device) -> tuple[str, bool]:
    """(the automatic choice, whether it is final). Not final when a measurement could not be
    made now (inside a CUDA-graph capture or a torch.compile trace, or it failed)."""
    from .autochoice import faster

    usable = [b for b in BACKENDS if b.auto_rule(device) and unavailable(b.name, device) is None]
    choice = next(b.name for b in usable if b.auto_rule(device) == "default")
    final = True
    for b in usable:
        if b.auto_rule(device) == "if_faster":
            verdict = faster(b.name, choice, device)
            final = final and verdict is not None
            choice = b.name if verdict else choice
    return choice, final


_DECIDED: dict[tuple[str, str | None, torch.device], str] = {}


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a call; ``auto`` honours the ``M2IV_BACKEND`` variable.

    A constant for ``torch.compile`` (decided outside the graph). Call it once before a
    CUDA-graph capture so that ``auto`` is measured, not guessed, for what the graph records.
    """
    env = os.environ.get(ENV_VAR) or None
    key = (backend, env, device)
    done = _DECIDED.get(key)
    if done is not None:
        return done
    name = env if backend == "auto" and env else backend
    if name == "auto":
        name, final = _auto(device)
        if not final:
            return name  # provisional: measured on a later call
    elif name not in [b.name for b in BACKENDS]:
        source = f"{ENV_VAR}={env!r}" if env == name else f"backend={name!r}"
        raise ValueError(f"unknown {source}; choose one of 'auto', " + ", ".join(
            repr(b.name) for b in BACKENDS))
    else:
        why = unavailable(name, device)
        if why is not None:
            raise RuntimeError(f"backend {name!r} is unavailable on {device}: {why}")
    _DECIDED[key] = name
    return name


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo (and
# with it triton, ~0.7 s) when m2iv_kernels is imported.
resolve._dynamo_marked_constant = True


def uses_launchers(name: str) -> bool:
    """Whether backend ``name`` runs through a launcher module (not the reference)."""
    return _get(name).module is not None


def launchers(name: str) -> ModuleType:
    """The launcher module of a resolved kernel backend."""
    module = _import(name)
    assert not isinstance(module, str), module
    return module
