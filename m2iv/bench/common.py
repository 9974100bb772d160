"""Shared benchmark plumbing: timing, machine description, result files.

Ratios are measured side by side: :func:`interleaved` runs every mode once per repetition
(A, B, C, then B, C, A, ...), so a load spike on a shared machine hits all modes of that
repetition alike, and :func:`ratio_stats` reports the median of the per-repetition ratios with
their interquartile range; :func:`flag_noise` says when that spread is larger than the effect.
Clocks: wall time (``perf_counter``; on a GPU with a device sync), or the calling thread's CPU
time (``thread_time``), which a descheduled thread does not accumulate: valid for
single-threaded CPU runs only, and the steadier measure on a loaded machine.
:func:`time_ms` (one callable, median and IQR) is for absolute times.

Runs write to a fresh directory under ``runs/`` unless ``--out`` names one: committed results
in ``benchmarks/results/`` are only ever replaced by a deliberate copy.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import gc
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[2]
RUNS = Path("runs")


def results_dir(name: str = "bench") -> Path:
    """A new run directory ``runs/<name>-<date>T<time>`` under the current directory (never
    ``benchmarks/results``, whose files are committed evidence: copy a run there on purpose)."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    path = RUNS / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = RUNS / f"{name}-{stamp}-{n}"
    return path


@contextlib.contextmanager
def kineto_quiet() -> Iterator[None]:
    """Drop the ``USDT: ... profiler_start`` / ``profiler_stop`` lines that the PyTorch
    profiler's C++ side (libkineto) writes to file descriptor 2 on every start and stop, whatever
    ``KINETO_LOG_LEVEL`` says, and which would tear through a progress bar. File descriptor 2 is
    captured around the call; every other line is passed on to ``sys.stderr``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).fflush(None)  # C stdio buffers out before fd 2 goes back
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(True)
                    if not line.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call (synchronised on a GPU)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return max(time.perf_counter() - t0, 1e-9)


def time_ms(fn: Callable[[], object], device: torch.device, *, budget_s: float = 0.3,
            min_reps: int = 5) -> dict[str, float]:
    """Median and interquartile range of ``fn``'s run time in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, quantiles=[0.5, 0.25, 0.75], rep=int(budget_s * 1000))
        return {"median": q[0], "p25": q[1], "p75": q[2]}
    fn()  # warm-up (and first-call setup)
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(2e-3 / once))  # batch very fast calls so the timer resolution is moot
    reps = max(min_reps, min(200, int(budget_s / (once * inner))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    qs = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "p25": qs[0], "p75": qs[2]}


CLOCKS = ("wall", "thread")


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off meanwhile (collected first), as ``timeit`` does:
    a collection would land in whichever mode happens to allocate past the threshold."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def interleaved(fns: Mapping[str, Callable[[], object]], device: torch.device, *, reps: int,
                inner: int = 1, clock: str = "wall", warmup: int = 1,
                setup: Mapping[str, Callable[[], Callable[[], None]]] | None = None,
                self_timed: bool = False,
                progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each mode, one sample per repetition, modes interleaved.

    Every repetition runs each mode ``inner`` times back to back, in an order rotated by one
    per repetition, so no mode always runs first or after the same neighbour. ``setup[name]``
    (optional) is entered before a mode's calls and returns its undo, called after them
    (outside the timed region). ``clock``: ``"wall"`` or ``"thread"`` (see the module
    docstring; on a GPU only ``"wall"``). ``self_timed``: each call returns the seconds to
    count (e.g. decode steps without their prefill) instead of being timed whole.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}; got {clock!r}")
    if clock == "thread" and device.type != "cpu":
        raise ValueError("clock='thread' measures CPU time: use it for CPU runs only")
    now = time.perf_counter if clock == "wall" else time.thread_time
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[:r % len(names)]
        with no_gc():
            _one_round(fns, order, samples if r >= warmup else None, device, inner, now,
                       setup, self_timed)
        if progress is not None:
            progress(r)
    return samples


def _one_round(fns, order, samples, device, inner, now, setup, self_timed) -> None:
    """Each mode of ``order`` once (``inner`` calls); appended to ``samples`` unless None."""
    for name in order:
        undo = setup[name]() if setup and name in setup else None
        try:
            fn = fns[name]
            sync(device)
            t0 = now()
            if self_timed:
                counted = sum(fn() for _ in range(inner))
            else:
                for _ in range(inner):
                    fn()
            sync(device)
            elapsed = (counted if self_timed else now() - t0) / inner
        finally:
            if undo is not None:
                undo()
        if samples is not None:
            samples[name].append(elapsed)


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Median, 25th and 75th percentile of the per-repetition ratios ``num[i] / den[i]``."""
    ratios = [a / b for a, b in zip(num, den)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "p25": q[0], "p75": q[2]}


def flag_noise(stats: Mapping[str, float]) -> str:
    """``""``, or a warning when the IQR of a ratio is larger than its distance from 1 (the
    effect reported): the run cannot tell that ratio from 1 (or its sign is unsure)."""
    iqr, effect = stats["p75"] - stats["p25"], abs(stats["median"] - 1.0)
    return f"NOISY: IQR {iqr:.3f} > effect {effect:.3f}" if iqr > effect else ""


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=_REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


#: spec-sheet HBM bandwidth (bytes/s) by device-name fragment, first match wins: "% of peak"
PEAK_HBM = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
            "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L40S": 0.864e12,
            "RTX 4090": 1.008e12}


def spec_peak_bytes_per_s(device: torch.device) -> float | None:
    """The spec-sheet HBM bandwidth of a CUDA ``device`` (:data:`PEAK_HBM`), or None (a CPU,
    or a GPU the table does not know)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_HBM.items() if key in name), None)


def machine_info(device: torch.device) -> dict:
    """Where and with what a result was measured."""
    info = {"device": device_name(device), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "commit": _git_commit(), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-").lower()
    return "cpu"


def write_results(stem: str, rows: list[dict], meta: dict, out_dir: Path | None = None
                  ) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (machine + rows) and ``<stem>.csv`` (rows) under ``out_dir``."""
    out_dir = out_dir or results_dir(stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, cs = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    js.write_text(json.dumps({"machine": meta, "rows": rows}, indent=1) + "\n")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with cs.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return js, cs


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
