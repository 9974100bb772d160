"""Checkpoints of a distillation run: everything needed to continue exactly.

Vectors, optimizer state, step, learning-rate scales, history, the plateau rule's state (best
vectors, patience counter, decays), RNG states and the model fingerprint (a checkpoint never
resumes on another model). Written atomically by rank 0; read with ``weights_only=True``.

The data a resumed run sees is a pure function of the seed and the step, so it continues on the
same batches. Teacher targets are recomputed (or read from the disk cache): with the cache kept
(``cache_dir``) a resumed run is bit-identical to an uninterrupted one; without it, recomputed
targets can differ in the last bits where the teacher batches are composed differently.

A checkpoint taken when Ctrl-C stops a run (``m2iv train`` saves one) must not catch a step
half applied: the loop applies each update inside :func:`deferred_interrupt`, where Ctrl-C waits
for the block to end.
"""
from __future__ import annotations

import contextlib
import io
import random
import signal
import threading
from collections.abc import Iterator

import torch

from .._atomic import atomic_write
from .teacher_cache import model_fingerprint

__all__ = ["CHECKPOINT_VERSION", "state_dict", "save", "load", "deferred_interrupt"]

CHECKPOINT_VERSION = 2


def state_dict(d) -> dict:
    """The checkpoint of :class:`~m2iv.train.distill.Distiller` ``d``."""
    return {
        "version": CHECKPOINT_VERSION,
        "step": d.step,
        "config": d.cfg.to_dict(),
        "layers": list(d.layers),
        "vectors": {k: v.detach().clone().cpu() for k, v in d.params.items()},
        "optimizer": d.optimizer.state_dict() if d.optimizer else None,
        "scales": d.scales,
        "history": d.history,
        "plateau": d.plateau.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(random.getstate()[1])},
        "model_fingerprint": model_fingerprint(d.model),
    }


def save(d, path: str) -> None:
    """Write ``d``'s checkpoint to ``path`` (rank 0; every rank waits for it)."""
    if d.dist.is_main:
        buf = io.BytesIO()
        torch.save(state_dict(d), buf)
        atomic_write(path, buf.getvalue())
    d.dist.barrier()


def load(d, path: str) -> None:
    """Continue ``d`` from the checkpoint at ``path`` (refused with a clear error if it was
    made by another version, for other layers or with another model)."""
    st = torch.load(path, map_location="cpu", weights_only=True)
    if st.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {st.get('version')!r}, this m2iv reads "
                         f"version {CHECKPOINT_VERSION}: start the run again without --resume")
    if tuple(st["layers"]) != d.layers:
        raise ValueError(f"{path}: the checkpoint covers layers {st['layers']} but this run "
                         f"steers {list(d.layers)}")
    if st.get("model_fingerprint") != model_fingerprint(d.model):
        raise ValueError(f"{path}: the checkpoint was made with a different model")
    with torch.no_grad():
        for k, v in st["vectors"].items():
            d.params[k].copy_(v.to(d.params[k].device))
    d.scales = st["scales"]
    d.step = int(st["step"])
    d._build_optimizer()
    if st["optimizer"] is not None:
        d.optimizer.load_state_dict(st["optimizer"])
    d.history = list(st["history"])
    d.plateau.load_state_dict(st["plateau"], d.device)
    torch.set_rng_state(st["rng"]["torch"])
    if st["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["rng"]["cuda"])
    state = random.getstate()
    random.setstate((state[0], tuple(st["rng"]["python"]), state[2]))


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """A block that Ctrl-C (SIGINT) does not cut short: a signal arriving inside is delivered
    to the previous handler when the block ends (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending and previous is not signal.SIG_IGN:
        if callable(previous):
            previous(signal.SIGINT, None)
        else:  # SIG_DFL
            raise KeyboardInterrupt
