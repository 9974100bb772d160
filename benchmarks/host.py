"""Host time of steering at decode (T=1): per fused-op call, and per patched decoder layer.

    python -m benchmarks.host [--parts op layer] [--paths unfused public prepared]
                              [--reps 40] [--inner 200] [--out DIR]

At T=1 the kernels are tiny and a step costs what the host does: Python, argument checks,
dispatch, allocations. Times are the calling thread's CPU time (``time.thread_time``, one torch
thread), so time the thread spends descheduled on a loaded machine does not count; modes are
interleaved within every repetition; the table gives medians (us per call) and the median
per-repetition ratio with its IQR.

* ``op``: one call of each fused op at T=1, D=4096, bf16 (``steer_add_rmsnorm``, ``steer_add``,
  ``head_steer``), plain and with a per-token bool mask + a bank index, through
  ``unfused`` (the same steering as separate PyTorch ops, the way forward hooks apply it, and
  for the norm op transformers' RMSNorm), ``public`` (the public op: full validation, backend
  ``auto``) and ``prepared`` (the unchecked entry a patched layer calls,
  :mod:`m2iv_kernels.prepared`, built once as the patch builds it).
* ``layer``: one decoder layer of the ``cpu-tiny`` model (LLaMA, 256 wide, fp32) at T=1:
  unsteered, fused (``m2iv.patch_model``), hooks (the hook reference), each on its own copy
  of the model sharing the weights.

Results: ``<out>/host-cpu.json|.csv`` (default ``--out``: a new directory under ``runs/``).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import m2iv_kernels as mk
from m2iv.bench.common import (flag_noise, interleaved, machine_info, print_table, ratio_stats,
                               results_dir, write_results)

PARTS = ("op", "layer")
PATHS = ("unfused", "public", "prepared")
D, HEADS = 4096, 32


def _hf_rmsnorm(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, as transformers runs it."""
    dtype = h.dtype
    h = h.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def _op_cases(paths: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """case -> {path: call}: the three ops at T=1, plain and with mask + bank index."""
    gen = torch.Generator().manual_seed(0)
    bf = dict(dtype=torch.bfloat16)
    x, res = torch.randn(1, 1, D, generator=gen, **bf), torch.randn(1, 1, D, generator=gen, **bf)
    w = torch.rand(D, generator=gen, **bf) + 0.5
    n = 4
    bank, gates = torch.randn(n, D, generator=gen), torch.rand(n, generator=gen)
    heads, head_gates = torch.randn(n, HEADS, D // HEADS, generator=gen), torch.rand(n, HEADS)
    mask, index = torch.ones(1, 1, dtype=torch.bool), torch.tensor([2])
    cases = {}
    for variant in ("plain", "mask+index"):
        if variant == "plain":
            v, g, hv, hg, m, i = bank[0], gates[0], heads[0], head_gates[0], None, None
        else:
            v, g, hv, hg, m, i = bank, gates, heads, head_gates, mask, index
        sel = (lambda t: t) if i is None else (lambda t: t[i][:, None])  # [1, 1, D] per row
        scale = (lambda t: t) if m is None else (lambda t: t * m[..., None])

        def add_unfused(v=v, g=g, sel=sel, scale=scale):
            return res + x + scale(sel(g[..., None] * v))

        def rms_unfused(add=add_unfused):
            h = add()
            return _hf_rmsnorm(h, w, 1e-6), h

        def head_unfused(hv=hv, hg=hg, sel=sel, scale=scale):
            return x + scale(sel((hg[..., None] * hv).flatten(-2)))

        c = {"steer_add_rmsnorm": {"unfused": rms_unfused,
                                   "public": lambda v=v, g=g, m=m, i=i: mk.steer_add_rmsnorm(
                                       res, x, v, g, w, 1e-6, mask=m, index=i)},
             "steer_add": {"unfused": add_unfused,
                           "public": lambda v=v, g=g, m=m, i=i: mk.steer_add(
                               res, x, v, g, mask=m, index=i)},
             "head_steer": {"unfused": head_unfused,
                            "public": lambda hv=hv, hg=hg, m=m, i=i: mk.head_steer(
                                x, hv, hg, mask=m, index=i)}}
        if "prepared" in paths:
            from m2iv_kernels import prepared

            res_bank = prepared.Bank.residual(v, g, device=x.device)
            head_bank = prepared.Bank.heads(hv, hg, device=x.device)
            entry = prepared.Entry("auto", x.device)
            rows = prepared.rows(m, i, x)
            c["steer_add_rmsnorm"]["prepared"] = lambda b=res_bank, r=rows: entry.add_rmsnorm(
                res, x, b, w, 1e-6, 0.0, r)
            c["steer_add"]["prepared"] = lambda b=res_bank, r=rows: entry.add(res, x, b, r)
            c["head_steer"]["prepared"] = lambda b=head_bank, r=rows: entry.head(x, b, r)
        for op, fns in c.items():
            cases[f"{op} {variant}"] = {p: fns[p] for p in paths}
    return cases


def run_op(paths: tuple[str, ...], reps: int, inner: int) -> list[dict]:
    rows = []
    device = torch.device("cpu")
    with torch.no_grad():
        for case, fns in _op_cases(paths).items():
            s = interleaved(fns, device, reps=reps, inner=inner, clock="thread", warmup=2)
            row = {"part": "op", "case": case}
            for p in fns:
                row[f"{p}_us"] = statistics.median(s[p]) * 1e6
            if "unfused" in fns:
                for p in fns:
                    if p != "unfused":
                        st = ratio_stats(s[p], s["unfused"])
                        row[f"{p}/unfused"], row[f"{p}/unfused_iqr"] = st["median"], \
                            f"{st['p25']:.3f}-{st['p75']:.3f}"
                        row[f"{p}_note"] = flag_noise(st)
            rows.append(row)
            print(f"op {case}: done", flush=True)
    return rows


def run_layer(reps: int, inner: int) -> list[dict]:
    """One decoder layer of cpu-tiny at T=1, unsteered / fused / hooks."""
    import m2iv
    from m2iv.bench.modes import steered_twins
    from m2iv.bench.presets import PRESETS, build_model
    from m2iv.testing import decoder_layers

    device = torch.device("cpu")
    model = build_model(PRESETS["cpu-tiny"], device)
    vectors = m2iv.M2IV.random_like(model, seed=0)
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("args", (args, kwargs))

    layer0 = decoder_layers(model)[0][0]
    hook = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), use_cache=False)
    hook.remove()
    args, kwargs = captured["args"]
    models, undo = steered_twins(model, vectors)
    try:
        fns = {mode: (lambda layer=decoder_layers(m)[0][0]: layer(*args, **kwargs))
               for mode, m in models.items()}
        with torch.no_grad():
            s = interleaved(fns, device, reps=reps, inner=inner, clock="thread", warmup=2)
    finally:
        undo()
    row = {"part": "layer", "case": "cpu-tiny decoder layer, T=1"}
    for mode in fns:
        row[f"{mode}_us"] = statistics.median(s[mode]) * 1e6
    for mode in ("fused", "hooks"):
        st = ratio_stats(s[mode], s["unsteered"])
        row[f"{mode}/unsteered"] = st["median"]
        row[f"{mode}/unsteered_iqr"] = f"{st['p25']:.3f}-{st['p75']:.3f}"
        row[f"{mode}_note"] = flag_noise(st)
    return [row]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="op part: which call paths to time (default: all)")
    p.add_argument("--reps", type=int, default=40, help="interleaved repetitions")
    p.add_argument("--inner", type=int, default=200, help="calls per mode and repetition")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: a new one under runs/)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # thread CPU time is the measure: one thread does all the work
    rows = []
    if "op" in args.parts:
        rows += run_op(tuple(args.paths), args.reps, args.inner)
        ratio_cols = [c for p in args.paths if p != "unfused"
                      for c in (f"{p}/unfused", f"{p}/unfused_iqr", f"{p}_note")]
        print("\nhost CPU time per op call at T=1 (D=4096, bf16, one thread), us:")
        print_table([r for r in rows if r["part"] == "op"],
                    ["case"] + [f"{p}_us" for p in args.paths] + ratio_cols)
    if "layer" in args.parts:
        layer = run_layer(args.reps, max(1, args.inner // 4))
        rows += layer
        print("\nhost CPU time per decoder layer at T=1 (cpu-tiny, fp32, one thread), us:")
        print_table(layer, ["case", "unsteered_us", "fused_us", "hooks_us", "fused/unsteered",
                            "fused/unsteered_iqr", "fused_note", "hooks/unsteered",
                            "hooks/unsteered_iqr", "hooks_note"])
    device = torch.device("cpu")
    meta = {**machine_info(device), "clock": "thread_time",
            "backend": mk.resolve_backend("auto", device)}
    js, cs = write_results("host-cpu", rows, meta, args.out or results_dir("host"))
    print(f"\nwrote {js} and {cs}")
    return rows


if __name__ == "__main__":
    main()
