"""PNG plots of the ICL-vs-M2IV benchmark (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_COLORS = {"a": "#7f7f7f", "b": "#d62728", "c": "#1f77b4", "d": "#2ca02c"}


def _icl(rows):
    return [r for r in rows if r["mode"].startswith("d")]


def _flat(rows, key):
    return {r["mode"]: r[key] for r in rows if r["mode"][:1] in "abc" and r.get("status") == "ok"}


def _vs_shots(ax, rows, key, ylabel, title):
    icl = _icl(rows)
    ok = [r for r in icl if r.get("status") == "ok"]
    ax.plot([r["shots"] for r in ok], [r[key] for r in ok], "o-", color=_COLORS["d"],
            label="k-shot ICL", lw=2)
    for mode, value in _flat(rows, key).items():
        ax.axhline(value, color=_COLORS[mode[0]], ls="-" if mode[0] == "b" else "--", lw=2,
                   label=mode[3:] + " (zero-shot)")
    values = [v for v in [r[key] for r in ok] + list(_flat(rows, key).values()) if v > 0]
    ymin, ymax = (min(values), max(values)) if values else (0.1, 1.0)
    top = ymax * 1.4
    for r in icl:
        if r.get("status") != "ok":
            ax.plot(r["shots"], top, "x", color="black", ms=9)
            ax.annotate("exceeds\ncontext" if "context" in r["status"] else r["status"],
                        (r["shots"], top), textcoords="offset points", xytext=(0, -22),
                        ha="center", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["shots"] for r in icl], [str(r["shots"]) for r in icl])
    ax.set_ylim(ymin / 1.5, top * 1.6)
    ax.set_yscale("log")
    ax.set_xlabel("demonstrations in the prompt (shots)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_icl(rows: list[dict], tasks: list[dict], preset, meta: dict, stem: Path) -> list[Path]:
    """Write ``<stem>-latency.png``, ``-memory.png``, ``-multitask.png`` (the steering cost:
    :func:`plot_overhead`)."""
    where = f"{preset.name} on {meta['device']}"
    files = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _vs_shots(ax, rows, "prefill_ms", "prefill latency / TTFT (ms)",
              f"Prefill latency vs shots: {where}")
    files.append(_save(fig, stem, "latency"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _vs_shots(axes[0], rows, "peak_mem_MB", "peak memory above weights (MiB)",
              f"Peak memory vs shots: {where}")
    _vs_shots(axes[1], rows, "kv_cache_MB", "KV cache (MiB)", "KV-cache size vs shots")
    files.append(_save(fig, stem, "memory"))

    ok = [t for t in tasks if t.get("status") == "ok"]
    if ok:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ks = [t["K"] for t in ok]
        ax.plot(ks, [t["bank_fused_tps"] for t in ok], "o-", color=_COLORS["b"], lw=2,
                label="m2iv: one batch, bank index")
        ax.plot(ks, [t["split_per_task_hooks_tps"] for t in ok], "s--", color=_COLORS["c"],
                lw=2, label="hooks: one batch per task")
        ax.axhline(ok[0]["shared_vector_tps"], color="gray", ls=":", label="one shared vector")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct vectors K in the batch")
        ax.set_ylabel(f"decode tokens/s (batch {ok[0]['batch']})")
        ax.set_title(f"Multi-task throughput: {where}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        files.append(_save(fig, stem, "multitask"))
    return files


def plot_overhead(costs: list[dict], where: str, stem: Path) -> Path:
    """``<stem>-overhead.png``: per case, the interleaved time ratios of fused and hooks to
    unsteered (median, IQR whiskers); below the line at 1, steering costs less than nothing."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(costs) + 2), 4.2))
    width = 0.38
    for k, (mode, color) in enumerate((("fused", _COLORS["b"]), ("hooks", _COLORS["c"]))):
        key = f"{mode}/unsteered"
        for i, c in enumerate(costs):
            if key not in c:
                continue
            x = i + (k - 0.5) * width
            med, lo, hi = c[key], c.get(f"{key}_p25", c[key]), c.get(f"{key}_p75", c[key])
            ax.bar(x, med - 1.0, width, bottom=1.0, color=color, alpha=0.8,
                   label=mode if i == 0 else None)
            ax.errorbar(x, med, yerr=[[med - lo], [hi - med]], color="black", capsize=3, lw=1)
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xticks(range(len(costs)),
                  [f"{c['phase']}\nb={c['batch']} {c['exec']}" for c in costs], fontsize=8)
    ax.set_ylabel("time / unsteered (median, IQR)")
    ax.set_title(f"What steering costs, interleaved: {where}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, stem, "overhead")


def _save(fig, stem: Path, name: str) -> Path:
    path = Path(f"{stem}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
