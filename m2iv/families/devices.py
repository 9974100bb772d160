"""Where a module computes: the one place m2iv asks a model (or one of its layers) for its
device and dtype (``device_map`` aware: a layer's own parameters decide)."""
from __future__ import annotations

import torch

__all__ = ["module_device", "module_dtype"]


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first materialised parameter (or buffer); ``meta`` if all are
    on the meta device; the CPU for a module without any."""
    first = None
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
        first = first or t.device
    return first or torch.device("cpu")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (float32 without any)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
