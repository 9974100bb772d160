"""Fused steering ops vs the unfused PyTorch sequence a transformers decoder layer runs today.

    python -m benchmarks.kernels [--quick] [--device cpu|cuda] [--dtype bf16 fp32 ...]

For each op and shape it times the fused op on every available backend against
  * ``unfused``: the same steering as separate PyTorch ops (how hook-based steering runs), and
  * ``unsteered``: what the layer does with no steering at all (residual add, HF RMSNorm),
prints ratios measured in the same run and writes JSON/CSV under ``benchmarks/results/``.
On a GPU it adds GB/s and % of peak HBM bandwidth. On the CPU, Triton only runs in its
interpreter: those times are reported (small shapes only) but say nothing about kernel speed.
It also measures what each ``torch.library`` registration mechanism costs per call, the number
behind the eager-path choice documented in ``m2iv_kernels/library.py``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path

import torch

import m2iv_kernels as mk

from m2iv.bench.common import device_tag, machine_info, print_table, time_ms, write_results

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Spec-sheet HBM bandwidth (bytes/s) by device-name fragment, for "% of peak".
PEAK_HBM = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
            "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L40S": 0.864e12,
            "RTX 4090": 1.008e12}
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


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_HBM.items() if key in name), None)


def run_ops(device: torch.device, shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype],
            budget_s: float) -> list[dict]:
    avail = mk.available_backends(device)
    backends = [b for b in ("triton", "ext", "torch") if avail[b] is True]
    peak = _peak(device)
    rows_out = []
    for rows, d, heads in shapes:
        for dtype in dtypes:
            for op, fused, unfused, unsteered, nbytes in _cases(rows, d, heads, dtype, device):
                t_unf = time_ms(unfused, device, budget_s=budget_s)["median"]
                t_uns = time_ms(unsteered, device, budget_s=budget_s)["median"] \
                    if unsteered else None
                for b in backends:
                    interp = b == "triton" and device.type == "cpu"
                    if interp and rows > INTERPRETER_MAX_ROWS:
                        continue
                    t = time_ms(lambda: fused(b), device, budget_s=budget_s)
                    row = {"op": op, "rows": rows, "D": d, "dtype": str(dtype)[6:],
                           "backend": b + (" (interpreter)" if interp else ""),
                           "fused_ms": t["median"], "p25_ms": t["p25"], "p75_ms": t["p75"],
                           "unfused_ms": t_unf, "speedup_vs_unfused": t_unf / t["median"],
                           "unsteered_ms": t_uns,
                           "fused_over_unsteered": t["median"] / t_uns if t_uns else None}
                    if device.type == "cuda":
                        row["GB/s"] = nbytes / (t["median"] * 1e-3) / 1e9
                        row["%peak_HBM"] = 100 * row["GB/s"] * 1e9 / peak if peak else None
                    rows_out.append(row)
    return rows_out


def _registered_add():
    """A trivial op registered the way ``m2iv_kernels.library`` registers its launchers."""
    if not hasattr(torch.ops.m2iv_bench, "add"):
        @torch.library.custom_op("m2iv_bench::add", mutates_args=())
        def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

        add.register_fake(lambda a, b: torch.empty_like(a))
    return torch.ops.m2iv_bench.add


def run_registration_overhead(device: torch.device) -> list[dict]:
    """Per-call host cost of each way to expose an op, on a trivial body at T=1, D=4096."""
    x = torch.randn(1, 1, 4096, device=device)
    v = torch.randn(4096, device=device)

    def body(a, b):
        return a + b

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return body(a, b)

        @staticmethod
        def backward(ctx, grad):
            return grad, grad.sum((0, 1))

    registered = _registered_add()
    mechanisms: dict[str, Callable] = {
        "direct call": lambda: body(x, v),
        "autograd.Function": lambda: Fn.apply(x, v),
        "torch.library.custom_op": lambda: registered(x, v),
    }
    base = None
    out = []
    for name, fn in mechanisms.items():
        us = time_ms(fn, device, budget_s=0.3)["median"] * 1e3
        base = us if base is None else base
        out.append({"mechanism": name, "us_per_call": us, "overhead_us": us - base})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="few shapes, short timing budget")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if args.quick else ["bf16", "fp32"]))]
    shapes = [(1, 4096, 32), (64, 4096, 32)] if args.quick else \
        [(1, 4096, 32), (64, 4096, 32), (512, 4096, 32), (4096, 4096, 32), (4096, 8192, 64)]
    budget = 0.1 if args.quick else 0.4

    meta = machine_info(device)
    print(f"m2iv kernel benchmark on {meta['device']} (torch {meta['torch']}, "
          f"triton {meta['triton']}); backends: {mk.available_backends(device)}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print("NOTE: Triton runs in its CPU interpreter here; its times are NOT kernel speed.")
    rows = run_ops(device, shapes, dtypes, budget)
    print_table(rows, ["op", "rows", "D", "dtype", "backend", "fused_ms", "unfused_ms",
                       "speedup_vs_unfused", "unsteered_ms", "fused_over_unsteered"]
                + (["GB/s", "%peak_HBM"] if device.type == "cuda" else []))
    reg = run_registration_overhead(device)
    print("\nper-call cost of the registration mechanisms (T=1, D=4096):")
    print_table(reg, ["mechanism", "us_per_call", "overhead_us"])
    stem = f"kernels-{device_tag(device)}-{dt.date.today().isoformat()}" + (
        "-quick" if args.quick else "")
    kw = {"out_dir": Path(args.out)} if args.out else {}
    js, cs = write_results(stem, rows + [{"op": "registration", **r} for r in reg], meta, **kw)
    print(f"\nwrote {js} and {cs}")


if __name__ == "__main__":
    main()
