"""The loss curve of a run as a PNG: training loss terms per step, held-out KL and top-1 per
evaluation, the kept (best) evaluation and the learning-rate decays marked."""
from __future__ import annotations

import os

from .._extras import require

__all__ = ["plot_history"]


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """Write the loss curve of ``history`` (the run's log records) to ``path`` (needs
    matplotlib: :class:`~m2iv.errors.MissingDependencyError` naming the extra without it)."""
    matplotlib = require("matplotlib", "the loss plot")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in history if "loss" in r]
    for key, style in (("loss", "-"), ("kl", "-"), ("ce", "--"), ("align", ":")):
        ys = [r[key] for r in history if "loss" in r and key in r]
        if ys and len(ys) == len(steps):
            ax.plot(steps, ys, style, label=f"train {key}", linewidth=1, alpha=0.8)
    ev = [(r["step"], r["val_kl"]) for r in history if "val_kl" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out KL", linewidth=1.5, markersize=3)
    for r in history:
        if r.get("plateau") == "decay":
            ax.axvline(r["step"], color="tab:orange", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    top = [(r["step"], r["val_top1"]) for r in history if "val_top1" in r]
    if top:
        ax2 = ax.twinx()
        ax2.plot(*zip(*top), "s--", color="tab:green", label="held-out top-1", linewidth=1,
                 markersize=3)
        ax2.set_ylabel("top-1")
        ax2.set_ylim(0, 1)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="center right")
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
