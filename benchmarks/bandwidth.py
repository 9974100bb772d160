"""Memory bandwidth of each fused kernel, forward and backward, per backend.

    python -m benchmarks.bandwidth [--device cuda|cpu] [--shapes 4096x4096 4096x8192]
                                   [--dtype bf16] [--backends triton ext] [--out DIR]

Every op of ``m2iv_kernels`` in both directions (backward: the gradients M2IV training needs,
vectors and gates, while the activations' gradient flows through as in a steered model;
``steer_add_rmsnorm`` also with the norm weight's), plain and with a bool token mask plus a
bank of 8 vectors picked per sequence (``mask+bank``). Activations are ``[8, rows / 8, D]``
with 128-wide heads, vectors and gates fp32 (trainable vectors on a half-precision model).
Per case: the median time of one call (and its IQR), the fewest bytes the call must move
(each activation-sized input read once, each activation-sized output written once: vectors,
gates, masks, per-row statistics and the fp32 partial sums of column reductions are left out
as small), GB/s, % of the GPU's spec-sheet HBM peak and % of a device-to-device copy measured
in the same run.

Why CUDA graphs: at 4096 rows a call moves 32-256 MB, 10-60 us on an H100/H200, less than the
tens of microseconds an eager Python call takes to launch it, so eager timings would describe
the host. Each case is captured as one graph of ``sets`` calls over distinct input sets that
together hold at least four times the L2 (no call finds its inputs in the cache), and the graph
is replayed: time per call = replay time / sets, median and IQR over replays (the ~1 us gap
between kernels in a graph counts against the kernels). A case whose capture fails is timed
eagerly instead and marked so. On the CPU (the ``make gpu-check`` dry run) calls are timed
eagerly on one input set; Triton is listed there only under its interpreter.

Writes ``bandwidth-<device>-<date>.json|.csv|.png`` (the plot: % of the copy per case).
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import m2iv_kernels as mk
from m2iv_kernels.backends import BACKENDS, uses_launchers

from m2iv._extras import missing
from m2iv.bench.common import (device_tag, machine_info, print_table, spec_peak_bytes_per_s,
                               time_ms, write_results)

from .kernels import DTYPES

HEAD_DIM = 128
SEQS = 8  # sequences per batch: the bank index picks one vector per sequence
BANK = 8


@dataclass(frozen=True)
class Case:
    op: str
    direction: str  # "fwd" | "bwd" | "bwd+dw"
    moved: int  # activation-sized tensors read or written (the minimum)


CASES = (
    Case("head_steer", "fwd", 2),          # read x, write out
    Case("steer_add", "fwd", 3),           # read residual, x; write out
    Case("steer_add_rmsnorm", "fwd", 4),   # read residual, x; write normed, new residual
    Case("head_steer", "bwd", 1),          # read grad (column sums); grad x passes through
    Case("steer_add", "bwd", 1),
    Case("steer_add_rmsnorm", "bwd", 4),   # read both grads and new residual; write d input
    Case("steer_add_rmsnorm", "bwd+dw", 4),
)
VARIANTS = ("plain", "mask+bank")


def _inputs(case: Case, rows: int, d: int, dtype: torch.dtype, device: torch.device,
            variant: str) -> dict:
    """Arguments of one call (activations, vectors, gates, mask, index, norm weight)."""
    seqs = SEQS if rows % SEQS == 0 else 1
    act = dict(device=device, dtype=dtype)
    train = case.direction != "fwd"
    lead = (seqs, rows // seqs)
    heads = max(1, d // HEAD_DIM)
    bank = (BANK,) if variant == "mask+bank" else ()
    vshape = bank + ((heads, d // heads) if case.op == "head_steer" else (d,))
    kw = dict(x=torch.randn(*lead, d, **act).requires_grad_(train),
              vectors=torch.randn(vshape, device=device).requires_grad_(train),
              gates=torch.rand(vshape[:-1], device=device).requires_grad_(train))
    if case.op != "head_steer":
        kw["residual"] = torch.randn(*lead, d, **act).requires_grad_(train)
    if case.op == "steer_add_rmsnorm":
        kw["weight"] = (torch.rand(d, **act) + 0.5).requires_grad_(case.direction == "bwd+dw")
    if variant == "mask+bank":
        kw["mask"] = torch.rand(lead, device=device) > 0.5
        kw["index"] = torch.arange(seqs, device=device) % BANK
    return kw


def _forward(op: str, kw: dict, backend: str):
    if op == "head_steer":
        return mk.head_steer(kw["x"], kw["vectors"], kw["gates"], mask=kw.get("mask"),
                             index=kw.get("index"), backend=backend)
    if op == "steer_add":
        return mk.steer_add(kw["residual"], kw["x"], kw["vectors"], kw["gates"],
                            mask=kw.get("mask"), index=kw.get("index"), backend=backend)
    return mk.steer_add_rmsnorm(kw["residual"], kw["x"], kw["vectors"], kw["gates"],
                                kw["weight"], 1e-6, mask=kw.get("mask"), index=kw.get("index"),
                                backend=backend)


def _call(case: Case, kw: dict, backend: str) -> Callable[[], object]:
    """One timed call. Backward: the forward runs here, once; the call is its backward."""
    if case.direction == "fwd":
        def fwd():
            with torch.no_grad():
                return _forward(case.op, kw, backend)
        return fwd
    out = _forward(case.op, kw, backend)
    outs = out if isinstance(out, tuple) else (out,)
    grads = tuple(torch.randn_like(o) for o in outs)
    wrt = [kw["vectors"], kw["gates"]] + ([kw["weight"]] if case.direction == "bwd+dw" else [])
    return lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True)


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4)
    return statistics.median(samples), q[0], q[2]


def graph_ms(make_calls: Callable[[], list[Callable[[], object]]], device: torch.device,
             budget_s: float) -> tuple[float, float, float]:
    """(median, p25, p75) ms per call of the calls ``make_calls()`` returns, captured as one
    CUDA graph and replayed. ``make_calls`` runs on the capture stream, so that the backward
    of forwards it runs is recorded on that stream too."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        calls = make_calls()
        for call in calls:  # warm-up outside the capture: compiles, allocates
            call()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    reps = max(10, min(200, int(budget_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for a, b in marks:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize(device)
    return _quartiles([a.elapsed_time(b) / len(calls) for a, b in marks])


def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))


def time_case(case: Case, rows: int, d: int, dtype: torch.dtype, device: torch.device,
              variant: str, backend: str, budget_s: float) -> dict:
    nbytes = case.moved * rows * d * torch.empty((), dtype=dtype).element_size()
    interpreted = backend == "triton" and device.type == "cpu"
    row = {"op": case.op, "direction": case.direction, "variant": variant, "rows": rows,
           "D": d, "dtype": str(dtype)[6:], "backend": backend + (" (interpreter)" if interpreted
                                                                  else ""),
           "MB": nbytes / 2**20}
    sets = max(3, math.ceil(4 * _l2_bytes(device) / nbytes)) if device.type == "cuda" else 1

    def make_calls():
        return [_call(case, _inputs(case, rows, d, dtype, device, variant), backend)
                for _ in range(sets)]

    if device.type == "cuda":
        try:
            med, p25, p75 = graph_ms(make_calls, device, budget_s)
            row.update(timing="cuda-graph", sets=sets)
        except Exception as err:  # noqa: BLE001 - recorded; the eager timing still says much
            row["graph_error"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            next_call = itertools.cycle(make_calls()).__next__
            t = time_ms(lambda: next_call()(), device, budget_s=budget_s)
            med, p25, p75 = t["median"], t["p25"], t["p75"]
            row.update(timing="eager (host launch included)", sets=sets)
    else:
        t = time_ms(make_calls()[0], device, budget_s=budget_s)
        med, p25, p75 = t["median"], t["p25"], t["p75"]
        row.update(timing="eager", sets=1)
    row.update(ms=med, p25_ms=p25, p75_ms=p75, **{"GB/s": nbytes / (med * 1e-3) / 1e9})
    return row


def copy_ceiling(device: torch.device, megabytes: int, budget_s: float) -> dict:
    """A device-to-device copy of ``megabytes``: bytes read + written per second."""
    n = megabytes * 2**20 // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        med, p25, p75 = graph_ms(lambda: [lambda: dst.copy_(src)], device, budget_s)
    else:
        t = time_ms(lambda: dst.copy_(src), device, budget_s=budget_s)
        med, p25, p75 = t["median"], t["p25"], t["p75"]
    nbytes = 2 * src.numel() * src.element_size()
    return {"op": "copy", "direction": "-", "variant": "-", "rows": None, "D": None,
            "dtype": "bf16", "backend": "torch", "MB": nbytes / 2**20,
            "timing": "cuda-graph" if device.type == "cuda" else "eager", "sets": 1,
            "ms": med, "p25_ms": p25, "p75_ms": p75, "GB/s": nbytes / (med * 1e-3) / 1e9}


def kernel_backends(device: torch.device, wanted: list[str] | None) -> dict[str, bool | str]:
    """Each kernel backend asked for (default: all with kernels of their own) -> True or why
    it cannot run on ``device``."""
    avail = mk.available_backends(device)
    names = wanted or [b.name for b in BACKENDS if uses_launchers(b.name)]
    return {name: avail[name] for name in names}


def run(device: torch.device, shapes: list[tuple[int, int]], dtype: torch.dtype,
        backends: list[str] | None = None, budget_s: float = 0.2, copy_mb: int = 1024,
        progress: bool = True) -> list[dict]:
    copy = copy_ceiling(device, copy_mb, budget_s)
    peak = spec_peak_bytes_per_s(device)
    copy["%peak_HBM"] = 100 * copy["GB/s"] * 1e9 / peak if peak else None
    rows_out = [copy]
    for name, ok in kernel_backends(device, backends).items():
        if ok is not True:
            rows_out.append({"op": "-", "backend": name, "status": f"unavailable: {ok}"})
            continue
        for rows, d in shapes:
            for variant in VARIANTS:
                for case in CASES:
                    try:
                        row = time_case(case, rows, d, dtype, device, variant, name, budget_s)
                        row["status"] = "ok"
                    except Exception as err:  # noqa: BLE001 - one case never ends the run
                        row = {"op": case.op, "direction": case.direction, "variant": variant,
                               "rows": rows, "D": d, "backend": name,
                               "status": f"error: {type(err).__name__}: {err}"[:300]}
                    if "GB/s" in row:
                        row["%peak_HBM"] = 100 * row["GB/s"] * 1e9 / peak if peak else None
                        row["%copy"] = 100 * row["GB/s"] / copy["GB/s"]
                    rows_out.append(row)
                    if progress:
                        print(f"{name:6s} {case.op:18s} {case.direction:6s} {variant:9s} "
                              f"{rows}x{d}: {row.get('GB/s', float('nan')):8.1f} GB/s "
                              f"{row['status'] if row['status'] != 'ok' else ''}", flush=True)
    return rows_out


def plot(rows: list[dict], meta: dict, path: Path) -> Path | None:
    """Bars of % of the measured copy per case, one panel per D: backends side by side,
    mask+bank hatched; the copy (100 %) and the spec-sheet peak as lines. None (said in one
    line) where matplotlib is missing."""
    why = missing("matplotlib", "the bandwidth plot")
    if why is not None:
        print(f"note: {why}; skipped it")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    copy = next(r for r in rows if r.get("op") == "copy")
    shapes = sorted({(r["rows"], r["D"]) for r in ok})
    cases = list(dict.fromkeys((r["op"], r["direction"]) for r in ok))
    bars = list(dict.fromkeys((r["backend"], r["variant"]) for r in ok))
    by = {(r["op"], r["direction"], r["rows"], r["D"], r["backend"], r["variant"]): r["%copy"]
          for r in ok}
    fig, axes = plt.subplots(len(shapes), 1, figsize=(9, 3.2 * len(shapes)), squeeze=False)
    width = 0.8 / max(len(bars), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    backends = list(dict.fromkeys(b for b, _ in bars))
    for ax, shape in zip(axes[:, 0], shapes):
        for j, (backend, variant) in enumerate(bars):
            xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, [by.get((*c, *shape, backend, variant), 0) for c in cases], width,
                   color=colors[backends.index(backend) % len(colors)],
                   hatch="//" if variant != "plain" else None, edgecolor="white",
                   label=f"{backend}, {variant}")
        ax.axhline(100, color="black", lw=1, label=f"copy, {copy['GB/s']:.0f} GB/s")
        if copy.get("%peak_HBM"):
            ax.axhline(100 * 100 / copy["%peak_HBM"], color="black", ls="--", lw=1,
                       label="spec-sheet peak")
        ax.set_xticks(range(len(cases)), [f"{op}\n{direction}" for op, direction in cases],
                      fontsize=7)
        ax.set_ylabel("% of the measured copy")
        ax.set_title(f"{shape[0]} x {shape[1]} {ok[0]['dtype']} on {meta['device']}",
                     fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ROWSxD, e.g. 4096x8192")
    if rows < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be positive")
    return rows, d


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bandwidth",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=_shape, nargs="+", default=[(4096, 4096), (4096, 8192)],
                   metavar="ROWSxD", help="activation shapes (default 4096x4096 4096x8192)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--backends", nargs="+", default=None,
                   choices=[b.name for b in BACKENDS],
                   help="default: every backend with kernels of its own (triton, ext)")
    p.add_argument("--budget", type=float, default=0.2, help="seconds of timing per case")
    p.add_argument("--copy-mb", type=int, default=None,
                   help="size of the copy ceiling (default 1024 MB on a GPU, 16 on the CPU)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    copy_mb = args.copy_mb or (1024 if device.type == "cuda" else 16)
    meta = machine_info(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(sm=props.multi_processor_count, l2_bytes=_l2_bytes(device),
                    spec_peak_GBps=(spec_peak_bytes_per_s(device) or 0) / 1e9 or None)
    print(f"m2iv kernel bandwidth on {meta['device']} (torch {meta['torch']}, "
          f"triton {meta['triton']})")
    rows = run(device, args.shapes, DTYPES[args.dtype], args.backends, args.budget, copy_mb)
    print()
    for r in rows:
        if str(r.get("status", "")).startswith("unavailable"):
            print(f"{r['backend']}: {r['status']}")
    print_table([r for r in rows if not str(r.get("status", "")).startswith("unavailable")],
                ["op", "direction", "variant", "rows", "D", "backend", "timing", "ms", "GB/s",
                 "%peak_HBM", "%copy", "status"])
    stem = f"bandwidth-{device_tag(device)}-{dt.date.today().isoformat()}"
    js, cs = write_results(stem, rows, meta, Path(args.out) if args.out else None)
    png = plot(rows, meta, js.with_suffix(".png")) if any(
        r.get("status") == "ok" for r in rows) else None
    print(f"\nwrote {js}, {cs}" + (f" and {png}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
