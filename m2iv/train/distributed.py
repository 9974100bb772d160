"""Data-parallel training over queries with ``torch.distributed``.

Launch with ``torchrun --nproc_per_node N -m m2iv.cli train ...`` (or call :func:`init` in any
process group setup). Every rank holds the same frozen model and the same vectors; each
micro-batch of queries is split across ranks (contiguous shards), each rank's loss is its sum
divided by the *global* number of queries, and the vector gradients are summed with
``all_reduce``, so every rank applies the same update as one process on the whole batch
would (identical in expectation, equal up to float summation order in practice).
Backend: ``gloo`` on CPU, ``nccl`` on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init", "shard_bounds", "SINGLE"]


@dataclass
class DistContext:
    """Rank, world size and the collective helpers (no-ops for a single process)."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over ranks in place (flattened into one buffer per dtype/device)."""
        if not self.enabled or not tensors:
            return
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            o = 0
            for t in ts:
                n = t.numel()
                t.copy_(flat[o:o + n].view_as(t))
                o += n

    def sum_floats(self, values: dict[str, float], device=None) -> dict[str, float]:
        """Sum a dict of floats over ranks (same keys on every rank)."""
        if not self.enabled:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=device or "cpu")
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.cpu().tolist()))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = DistContext()


def init(backend: str = "auto", device: torch.device | str | None = None) -> DistContext:
    """Join (or start, from torchrun's environment variables) the default process group.

    Without ``WORLD_SIZE`` > 1 in the environment and no existing group, returns the
    single-process context. ``backend="auto"``: ``nccl`` if ``device`` is CUDA, else ``gloo``.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistContext()
    dev = torch.device(device) if device is not None else None
    if backend == "auto":
        backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    if dev is not None and dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), owns_group=True)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by <= 1)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def local_device(default: str | None = None) -> torch.device:
    """The device for this rank: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if default is not None and default != "auto":
        return torch.device(default)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
