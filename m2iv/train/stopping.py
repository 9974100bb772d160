"""When to stop, what to keep, and the learning-rate schedule.

The plateau rule watches the held-out KL to the teacher (on validation queries held out of the
train split): an evaluation *improves* when it beats the best so far by a relative ``min_delta``.
After ``patience`` evaluations without improvement it either decays the learning rate (up to
``decays`` times) or stops. The best evaluated vectors are kept, so stopping late costs
nothing but time. The reason for stopping goes into the log and the vectors' metadata.
"""
from __future__ import annotations

import math

import torch

__all__ = ["PlateauRule", "lr_factor"]


def lr_factor(step: int, *, warmup: int, schedule: str, total: int, decay_mult: float,
              min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at ``step``: a linear warm-up over ``warmup`` steps, then
    ``decay_mult`` (``"plateau"``: constant, lowered by the plateau rule) or a cosine from 1 to
    ``min_ratio`` over ``total`` steps (``"cosine"``)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "plateau":
        return decay_mult
    t = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class PlateauRule:
    """Best-so-far tracking and the stop / decay decision (see the module docstring)."""

    def __init__(self, patience: int | None, min_delta: float, decays: int, decay: float):
        self.patience, self.min_delta = patience, min_delta
        self.decays, self.decay = decays, decay
        self.best: dict | None = None  # step, kl, top1, vectors
        self.bad = 0
        self.decays_done = 0
        self.lr_mult = 1.0
        self.stopped = False

    def update(self, step: int, kl: float, top1: float, params: dict[str, torch.Tensor]) -> str:
        """Record an evaluation; returns ``"improved"``, ``"wait"``, ``"decay"`` (the learning
        rate was just lowered) or ``"stop"``."""
        if self.best is None or kl < self.best["kl"] * (1.0 - self.min_delta):
            self.best = {"step": step, "kl": kl, "top1": top1,
                         "vectors": {k: v.detach().clone() for k, v in params.items()}}
            self.bad = 0
            return "improved"
        self.bad += 1
        if self.patience is None or self.bad < self.patience:
            return "wait"
        if self.decays_done < self.decays:
            self.decays_done += 1
            self.lr_mult *= self.decay
            self.bad = 0
            return "decay"
        self.stopped = True
        return "stop"

    def state_dict(self) -> dict:
        best = None if self.best is None else dict(
            self.best, vectors={k: v.cpu() for k, v in self.best["vectors"].items()})
        return {"best": best, "bad": self.bad, "decays_done": self.decays_done,
                "lr_mult": self.lr_mult, "stopped": self.stopped}

    def load_state_dict(self, st: dict, device) -> None:
        b = st["best"]
        self.best = None if b is None else dict(
            b, vectors={k: v.to(device) for k, v in b["vectors"].items()})
        self.bad, self.decays_done = int(st["bad"]), int(st["decays_done"])
        self.lr_mult, self.stopped = float(st["lr_mult"]), bool(st["stopped"])
