"""Shared benchmark plumbing: timing, machine description, result files.

Timing on a GPU uses ``triton.testing.do_bench`` (CUDA events, cache flush between repeats);
on the CPU the median of repeated wall-clock runs after warm-up. Ratios are always measured
side by side in one process, so a noisy shared machine shifts both sides alike.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[2]
RESULTS = _REPO / "benchmarks" / "results"


def results_dir() -> Path:
    """``benchmarks/results`` in a source checkout; ``./m2iv-results`` for an installed copy."""
    return RESULTS if (_REPO / ".git").exists() and RESULTS.parent.is_dir() \
        else Path("m2iv-results")


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
    out_dir = out_dir or results_dir()
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
