"""Fused steering ops vs the unfused PyTorch sequence a transformers decoder layer runs today.

    python -m benchmarks.kernels [--quick] [--device cpu|cuda] [--dtype bf16 fp32 ...]
                                 [--only ops registry traffic] [--sm 132] [--threads 1]
                                 [--clock wall|thread] [--out DIR]

For each op and shape it times the fused op on every available backend against
  * ``unfused``: the same steering as separate PyTorch ops (how hook-based steering runs), and
  * ``unsteered``: what the layer does with no steering at all (residual add, HF RMSNorm),
prints ratios measured interleaved in the same run (every repetition runs each variant once;
median of the per-repetition ratios with their IQR, flagged NOISY where the IQR is larger than
the effect) and writes JSON/CSV into ``--out`` (default: a new directory under ``runs/``).
On a GPU it adds GB/s and % of peak HBM bandwidth. On the CPU, Triton only runs in its
interpreter: those times are reported (small shapes only) but say nothing about kernel speed.
It also measures what each op-registry mechanism costs per call (the same trivial body through
pybind, a C++ ``TORCH_LIBRARY`` op, a ``torch.library.Library`` op, a ``custom_op`` and an
``autograd.Function``), the numbers behind the choice documented in
``m2iv_kernels/custom_ops.py``; and a traffic model of the Triton launch plans (DRAM bytes
moved over the minimum, from the same plans the launchers run; no GPU needed).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import m2iv_kernels as mk

from m2iv.bench.common import (device_tag, flag_noise, interleaved, machine_info, print_table,
                               ratio_stats, results_dir, spec_peak_bytes_per_s, time_once,
                               write_results)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("ops", "registry", "traffic")
INTERPRETER_MAX_ROWS = 64  # the interpreter costs ~ per element; keep its rows small


def _hf_rmsnorm(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, as transformers runs it."""
    dtype = h.dtype
    h = h.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def _cases(rows: int, d: int, heads: int, dtype: torch.dtype, device: torch.device):
    """(op, fused(backend), unfused, unsteered | None, bytes moved by the fused op)."""
    mk_t = dict(device=device, dtype=dtype)
    x, res = torch.randn(rows, d, **mk_t), torch.randn(rows, d, **mk_t)
    w = torch.rand(d, **mk_t)
    hv, hg = torch.randn(heads, d // heads, **mk_t), torch.rand(heads, **mk_t)
    v, g = torch.randn(d, **mk_t), torch.rand((), **mk_t)
    el = x.element_size() * rows * d

    def head_unfused():
        return x + (hg[:, None] * hv).reshape(-1)

    def add_unfused():
        return (res + x) + g * v

    def rms_unfused():
        h = (res + x) + g * v
        return _hf_rmsnorm(h, w, 1e-6), h

    def rms_unsteered():
        h = res + x
        return _hf_rmsnorm(h, w, 1e-6), h

    return [
        ("head_steer", lambda b: mk.head_steer(x, hv, hg, backend=b), head_unfused, None, 2 * el),
        ("steer_add", lambda b: mk.steer_add(res, x, v, g, backend=b), add_unfused,
         lambda: res + x, 3 * el),
        ("steer_add_rmsnorm", lambda b: mk.steer_add_rmsnorm(res, x, v, g, w, backend=b),
         rms_unfused, rms_unsteered, 4 * el),
    ]


def run_ops(device: torch.device, shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype],
            budget_s: float, clock: str = "wall") -> list[dict]:
    """Per op x shape x dtype, the fused op on every available backend, the unfused sequence
    and the unsteered layer, timed interleaved: every repetition runs each once (``inner``
    calls), so ratios are per repetition (median and IQR)."""
    avail = mk.available_backends(device)
    backends = [b for b, ok in avail.items() if ok is True]
    peak = spec_peak_bytes_per_s(device)
    rows_out = []
    for rows, d, heads in shapes:
        for dtype in dtypes:
            for op, fused, unfused, unsteered, nbytes in _cases(rows, d, heads, dtype, device):
                fns = {"unfused": unfused}
                if unsteered is not None:
                    fns["unsteered"] = unsteered
                for b in backends:
                    if b == "triton" and device.type == "cpu" and rows > INTERPRETER_MAX_ROWS:
                        continue  # the interpreter costs ~ per element
                    fns[b] = lambda b=b: fused(b)
                inner = calibrate_inner(fns["unfused"], device)
                reps = max(5, min(41, int(budget_s / (inner * len(fns)
                                                      * time_once(fns["unfused"], device)))))
                with torch.no_grad():
                    s = interleaved(fns, device, reps=reps, inner=inner, clock=clock)
                for b in backends:
                    if b not in s:
                        continue
                    interp = b == "triton" and device.type == "cpu"
                    speed = ratio_stats(s["unfused"], s[b])
                    row = {"op": op, "rows": rows, "D": d, "dtype": str(dtype)[6:],
                           "backend": b + (" (interpreter)" if interp else ""),
                           "fused_ms": statistics.median(s[b]) * 1e3,
                           "unfused_ms": statistics.median(s["unfused"]) * 1e3,
                           "speedup_vs_unfused": speed["median"],
                           "speedup_p25": speed["p25"], "speedup_p75": speed["p75"],
                           "note": flag_noise(speed), "reps": reps, "inner": inner,
                           "unsteered_ms": None, "fused_over_unsteered": None}
                    if "unsteered" in s:
                        over = ratio_stats(s[b], s["unsteered"])
                        row.update(unsteered_ms=statistics.median(s["unsteered"]) * 1e3,
                                   fused_over_unsteered=over["median"],
                                   over_unsteered_p25=over["p25"],
                                   over_unsteered_p75=over["p75"])
                    if device.type == "cuda":
                        row["GB/s"] = nbytes / (row["fused_ms"] * 1e-3) / 1e9
                        row["%peak_HBM"] = 100 * row["GB/s"] * 1e9 / peak if peak else None
                    rows_out.append(row)
    return rows_out


def calibrate_inner(fn: Callable[[], object], device: torch.device, target_s: float = 2e-3
                    ) -> int:
    """Calls per sample so that one sample lasts about ``target_s`` (timer resolution and
    per-sample overhead become negligible)."""
    fn()
    return max(1, int(target_s / time_once(fn, device)))


_CPP_REGISTRY = """
#include <torch/extension.h>
#include <torch/library.h>
at::Tensor add(const at::Tensor& a, const at::Tensor& b) { return a + b; }
TORCH_LIBRARY(m2iv_bench_cpp, m) { m.def("add(Tensor a, Tensor b) -> Tensor"); }
TORCH_LIBRARY_IMPL(m2iv_bench_cpp, CompositeExplicitAutograd, m) { m.impl("add", &add); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("add", &add); }
"""


_LIBS: list = []


def _registries() -> dict[str, Callable]:
    """The same trivial body (``a + b``) exposed each way an op registry could expose it."""
    from torch.utils.cpp_extension import load_inline

    cpp = load_inline("m2iv_bench_registry", _CPP_REGISTRY, verbose=False)
    lib = torch.library.Library("m2iv_bench_lib", "DEF")
    lib.define("add(Tensor a, Tensor b) -> Tensor")
    lib.impl("add", lambda a, b: cpp.add(a, b), "CompositeExplicitAutograd")
    _LIBS.append(lib)  # a Library unregisters its ops when collected

    @torch.library.custom_op("m2iv_bench_custom::add", mutates_args=())
    def custom(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cpp.add(a, b)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return cpp.add(a, b)

        @staticmethod
        def backward(ctx, grad):
            return grad, grad.sum((0, 1))

    return {"direct call": cpp.add,
            "C++ TORCH_LIBRARY op": torch.ops.m2iv_bench_cpp.add.default,
            "torch.library.Library op, Python kernel (m2iv_kernels)":
                torch.ops.m2iv_bench_lib.add.default,
            "torch.library.custom_op": custom,
            "autograd.Function": Fn.apply}


def run_registration_overhead(device: torch.device, reps: int = 31, calls: int = 200
                              ) -> list[dict]:
    """Host cost per call of each op-registry mechanism on a trivial body at T=1, D=4096,
    interleaved: per repetition each mechanism runs ``calls`` times in turn; the ratio to the
    direct call is taken per repetition (median and IQR over repetitions)."""
    fns = _registries()
    x, v = torch.randn(1, 1, 4096, device=device), torch.randn(4096, device=device)
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(calls):
                fn(x, v)
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(x, v)
                per_call[name].append((time.perf_counter() - t0) / calls * 1e6)
    base = per_call["direct call"]
    out = []
    for name, us in per_call.items():
        ratio = [a / b for a, b in zip(us, base)]
        extra = [a - b for a, b in zip(us, base)]
        q = statistics.quantiles(ratio, n=4)
        out.append({"mechanism": name, "us_per_call": statistics.median(us),
                    "extra_us": statistics.median(extra),
                    "ratio_to_direct": statistics.median(ratio), "ratio_p25": q[0],
                    "ratio_p75": q[2]})
    return out


def traffic(case) -> dict:
    """DRAM bytes one launcher call moves, from its launch plan, against the minimum (every
    input read once, every output written once). Each tensor argument of a launch counts once
    (parameters re-read by many programs are served from L2); the fp32 partial sums of the
    two-stage column reductions (``PART``: written by the first kernel, read by the second)
    are the difference."""
    moved, partials, essential = 0, 0, {}
    for launch in case.launches:
        for name, arg in launch.args.items():
            if not isinstance(arg, torch.Tensor):
                continue
            nbytes = arg.numel() * arg.element_size()
            moved += nbytes
            if name == "PART":
                partials += nbytes
            else:
                essential[id(arg)] = nbytes
    minimum = sum(essential.values())
    return {"op": case.op, "rows": case.rows, "D": case.d, "dtype": case.dtype,
            "variant": case.variant or "-", "min_MB": minimum / 2**20, "moved_MB": moved / 2**20,
            "partials_MB": partials / 2**20, "moved_over_min": moved / minimum}


def run_traffic(n_sm: int) -> list[dict]:
    """The traffic model over the compile report's table (bf16, D 4096/8192, T=1 and 4096
    rows, plain and with a bool mask + bank), at the launch plans for ``n_sm`` SMs."""
    from m2iv_kernels import compile_report as cr
    from m2iv_kernels.triton_backend import Target

    table = cr.cases(dtypes=("bf16",), masks=("", "mask:bool"), target=Target(False, n_sm))
    return [traffic(c) for c in table if c.variant.startswith(("mask:bool bank", "dw"))
            or c.variant in ("", "+grad_res")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="few shapes, short timing budget")
    p.add_argument("--out", default=None,
                   help="results directory (default: a new one under runs/)")
    p.add_argument("--clock", choices=("wall", "thread"), default=None,
                   help="ops part: default thread CPU time on the CPU with one torch thread, "
                        "else wall time")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                   help="run only these parts (default: all)")
    p.add_argument("--sm", type=int, default=132, help="SMs for the traffic model off a GPU "
                   "(default 132: H100 SXM)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: 1, timed by thread CPU time)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if args.quick else ["bf16", "fp32"]))]
    shapes = [(1, 4096, 32), (64, 4096, 32)] if args.quick else \
        [(1, 4096, 32), (64, 4096, 32), (256, 4096, 32), (512, 4096, 32), (2048, 4096, 32),
         (4096, 4096, 32), (4096, 8192, 64)]
    budget = 0.1 if args.quick else 0.4

    meta = machine_info(device)
    print(f"m2iv kernel benchmark on {meta['device']} (torch {meta['torch']}, "
          f"triton {meta['triton']}); backends: {mk.available_backends(device)}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print("NOTE: Triton runs in its CPU interpreter here; its times are NOT kernel speed.")
    results: list[dict] = []
    if "ops" in args.only:
        clock = args.clock or ("thread" if device.type == "cpu" and torch.get_num_threads() == 1
                               else "wall")
        rows = run_ops(device, shapes, dtypes, budget, clock)
        print(f"\nfused vs unfused, interleaved ({clock} clock; ratios: median of "
              "per-repetition ratios, p25-p75):")
        print_table(rows, ["op", "rows", "D", "dtype", "backend", "fused_ms", "unfused_ms",
                           "speedup_vs_unfused", "speedup_p25", "speedup_p75", "unsteered_ms",
                           "fused_over_unsteered", "note"]
                    + (["GB/s", "%peak_HBM"] if device.type == "cuda" else []))
        results += [{"part": "ops", "clock": clock, **r} for r in rows]
    if "registry" in args.only:
        reg = run_registration_overhead(device)
        print("\nhost cost per call of each op-registry mechanism (T=1, D=4096, interleaved):")
        print_table(reg, ["mechanism", "us_per_call", "extra_us", "ratio_to_direct", "ratio_p25",
                          "ratio_p75"])
        results += [{"op": "registration", **r} for r in reg]
    if "traffic" in args.only:
        n_sm = (torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda" else args.sm)
        tr = run_traffic(n_sm)
        print(f"\ntraffic model of the Triton launch plans ({n_sm} SMs): DRAM bytes moved / "
              "minimum")
        print_table(tr, ["op", "rows", "D", "variant", "min_MB", "moved_MB", "partials_MB",
                         "moved_over_min"])
        results += [{"part": "traffic", **r} for r in tr]
    parts = "" if set(args.only) == set(PARTS) else "-" + "-".join(args.only)
    stem = f"kernels-{device_tag(device)}-{dt.date.today().isoformat()}" + (
        "-quick" if args.quick else "") + parts
    js, cs = write_results(stem, results, meta, Path(args.out) if args.out
                           else results_dir("kernels"))
    print(f"\nwrote {js} and {cs}")


if __name__ == "__main__":
    main()
