"""The measurement behind ``backend="auto"``: is one backend faster than another here?

Measured once per (device model or CPU thread count, rivals, their builds), on the work a
steered decoder layer does (head steer and steer-add + RMSNorm at D = 4096 bf16, at decode and
prefill row counts), then cached in memory and in ``auto.json`` under the extension cache.

Never measured where timing would break or lie: inside a CUDA-graph capture or while
``torch.compile`` traces. There, and after a failed measurement, :func:`faster` answers None
(the caller keeps its default and does not cache it); a failure is retried after
:data:`RETRY_S` seconds and never written to disk.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ._checks import Rows

RETRY_S = 60.0
MARGIN = 0.95  # the challenger must be at least 5 % faster (geometric mean over the cases)
_KNOWN: dict[str, bool] = {}
_FAILED: dict[str, float] = {}  # key -> time of the failure


def _cannot_measure_now(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fingerprint(name: str) -> str:
    """What identifies a backend's code: its launcher module's ``FINGERPRINT`` (the
    extension's build, Triton's version), else torch's version."""
    from .backends import launchers, uses_launchers

    default = f"{name}:torch{torch.__version__}"
    return getattr(launchers(name), "FINGERPRINT", default) if uses_launchers(name) else default


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda/" + torch.cuda.get_device_name(device)
    return f"{device.type}/threads={torch.get_num_threads()}"


def _cache_file() -> Path:
    from .ext_build import cache_root
    return cache_root() / "auto.json"


def _read_disk() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, record: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = _read_disk()
        saved[key] = record
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def faster(challenger: str, incumbent: str, device: torch.device) -> bool | None:
    """Whether ``challenger`` runs this device's steering work faster than ``incumbent``;
    None when it cannot be known now."""
    key = f"{_device_key(device)}/{_fingerprint(challenger)}<{_fingerprint(incumbent)}"
    if key in _KNOWN:
        return _KNOWN[key]
    saved = _read_disk().get(key)
    if saved is not None and "faster" in saved:
        _KNOWN[key] = bool(saved["faster"])
        return _KNOWN[key]
    if _cannot_measure_now(device) or time.monotonic() - _FAILED.get(key, -RETRY_S) < RETRY_S:
        return None
    try:
        record = compare(device, (challenger, incumbent))
    except Exception:  # noqa: BLE001 - a failed measurement keeps the default, for now
        _FAILED[key] = time.monotonic()
        return None
    _KNOWN[key] = record["faster"]
    _write_disk(key, record)
    return record["faster"]


def _workloads(device: torch.device, rows: tuple[int, ...]):
    """(name, rows, fn(backend)): the kernels a steered layer runs, at D = 4096 bf16, through
    each backend's launchers (the reference functions for a backend without launchers)."""
    from . import reference
    from .backends import launchers, uses_launchers

    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone

    def rand(*shape, normal=True):
        fn = torch.randn if normal else torch.rand
        return fn(*shape, generator=gen, device=device).to(torch.bfloat16)

    for r in rows:
        x, res = rand(r, 4096), rand(r, 4096)
        heads, head_gates = rand(1, 32, 128), rand(1, 32, normal=False)
        vec, gate, w = rand(1, 1, 4096), rand(1, 1, normal=False), rand(4096, normal=False)
        meta = Rows(None, None, r, 1)

        def head(b, x=x, heads=heads, head_gates=head_gates, meta=meta):
            if uses_launchers(b):
                return launchers(b).steer_fwd(x, None, heads, head_gates, meta)
            return reference.head_steer(x, heads[0], head_gates[0])

        def rms(b, x=x, res=res, vec=vec, gate=gate, w=w, meta=meta):
            if uses_launchers(b):
                return launchers(b).rmsnorm_fwd(res, x, vec, gate, w, 1e-6, 0.0, meta)
            return reference.steer_add_rmsnorm(res, x, vec[0, 0], gate[0, 0], w)

        yield "head_steer", r, head
        yield "steer_add_rmsnorm", r, rms


def compare(device: torch.device, rivals: tuple[str, str], reps: int | None = None) -> dict:
    """Best-of-``reps`` time of each workload for both rivals, interleaved after a warm-up
    (the minimum: contention on a shared machine only ever adds time)."""
    cuda = device.type == "cuda"
    rows = (1, 4096) if cuda else (1, 64)
    reps = reps or (20 if cuda else 6)
    sync = torch.cuda.synchronize if cuda else None
    fns = {f"{name}/{r}/{b}": (lambda fn=fn, b=b: fn(b))
           for name, r, fn in _workloads(device, rows) for b in rivals}
    best = dict.fromkeys(fns, float("inf"))
    with torch.no_grad():
        for fn in fns.values():
            fn()
            fn()
        if sync is not None:
            sync()
        for _ in range(reps):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if sync is not None:
                    sync()
                best[key] = min(best[key], time.perf_counter() - t0)
    ratios = [best[k] / best[k.rsplit("/", 1)[0] + "/" + rivals[1]]
              for k in best if k.endswith("/" + rivals[0])]
    gmean = float(torch.tensor(ratios).log().mean().exp())
    return {"faster": gmean < MARGIN, "ratio_geomean": round(gmean, 3),
            "seconds": {k: round(v, 7) for k, v in best.items()}}
