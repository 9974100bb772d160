"""What steering costs a model: unsteered vs ``m2iv.patch_model`` vs plain forward hooks.

    python -m benchmarks.patched [--preset cpu-tiny|llava-1.5-7b|...] [--device cpu|cuda]
                                 [--batch 1 8] [--eager-only | --compiled-only]
                                 [--phases prefill decode] [--steps 16] [--reps 15]
                                 [--positions all|text] [--clock wall|thread] [--threads 1]
                                 [--smoke] [--out DIR]

Prefill (one forward over an image + question prompt) and decode (``--steps`` greedy steps
with the KV cache), at each batch size, eager and compiled (``torch.compile(model.forward,
fullgraph=True)`` with transformers' static cache), through three modes on twins of one model
sharing its weights, interleaved within every repetition (:mod:`m2iv.bench.overhead`):

* ``unsteered``: the model as loaded;
* ``fused``: ``m2iv.patch_model(model, vectors)`` (fused ops, backend ``auto``;
  ``--positions text`` leaves the image tokens unsteered: the masked kernel path);
* ``hooks``: the same vectors through plain forward hooks
  (:class:`m2iv.testing.HookReference`), the way hook-based steering libraries apply them.

The table gives each mode's median time and the median per-repetition ratios fused/unsteered,
hooks/unsteered and fused/hooks with their IQR; a ratio whose IQR is larger than its distance
from 1 is flagged NOISY. Results: ``<out>/patched-<device>-<preset>.json|.csv`` (default
``--out``: a new directory under ``runs/``; copy a run into ``benchmarks/results/`` to commit
it). On the CPU one torch thread by default, timed by the thread's CPU time (``--clock``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import m2iv
from m2iv._extras import missing
from m2iv.bench import overhead
from m2iv.bench.modes import MODES
from m2iv.bench.common import (device_tag, machine_info, print_table, results_dir,
                               write_results)
from m2iv.bench.presets import PRESETS, apply_overrides, build_model, make_inputs
from m2iv_kernels import resolve_backend


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model (default: cpu-tiny on the CPU, llava-1.5-7b on a GPU)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--eager-only", action="store_true", help="skip torch.compile")
    how.add_argument("--compiled-only", action="store_true", help="skip eager mode")
    p.add_argument("--phases", nargs="+", choices=("prefill", "decode"),
                   default=["prefill", "decode"])
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per generate()")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:3]),
                   help="fused_kernels: the fused patch with its kernels as opaque ops in "
                        "compiled graphs (M2IV_COMPILED_OPS=kernels; in eager = fused)")
    p.add_argument("--positions", choices=("all", "text"), default="all",
                   help="tokens the fused patch steers (text: image tokens unsteered)")
    p.add_argument("--clock", choices=("wall", "thread"), default=None,
                   help="default: thread CPU time on the CPU with one thread, else wall")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: 1; multi-threaded timings on a "
                        "shared machine swing by 2x between identical runs)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override preset fields (as in m2iv bench)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run: batch 1, 2 steps, 2 repetitions, 2 layers")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: a new one under runs/)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    clock = args.clock or ("thread" if device.type == "cpu" and torch.get_num_threads() == 1
                           else "wall")
    name = args.preset or ("cpu-tiny" if device.type == "cpu" else "llava-1.5-7b")
    preset = apply_overrides(PRESETS[name], args.overrides)
    if args.smoke:
        preset = apply_overrides(preset, ["text.num_hidden_layers=2"])
        args.batch, args.steps, args.reps = [1], 2, 2
    torch.manual_seed(0)
    model = build_model(preset, device)
    model.generation_config.eos_token_id = None
    vectors = m2iv.M2IV.random_like(model, seed=0).to(device)
    compiled = (False,) if args.eager_only else (True,) if args.compiled_only else (False, True)
    rows = overhead.run(model, vectors, lambda b: make_inputs(preset, model, 0, batch=b)[0],
                        batches=tuple(args.batch), compiled=compiled, phases=tuple(args.phases),
                        steps=args.steps, reps=args.reps, device=device, clock=clock,
                        modes=tuple(args.modes), positions=args.positions,
                        progress=lambda label: print(f"{label} ...", flush=True))
    backend = resolve_backend("auto", device)
    for row in rows:
        row.update(preset=preset.name, device=device_tag(device), dtype=preset.dtype,
                   backend=backend, positions=args.positions,
                   threads=torch.get_num_threads() if device.type == "cpu" else None)
    meta = {**machine_info(device), "preset": preset.name, "clock": clock}
    print(f"\nsteering cost, {preset.name} on {meta['device']} (backend {backend}, "
          f"{clock} clock; ratios: median of per-repetition time ratios, IQR p25-p75)")
    print_table(rows, [c for c in overhead.COLUMNS if any(c in r for r in rows)])
    out = args.out or results_dir("patched")
    stem = f"patched-{device_tag(device)}-{preset.name}"
    files = list(write_results(stem, rows, meta, out))
    why = missing("matplotlib", "the plot")
    if why is not None:
        print(f"note: {why}; skipped it")
    elif not args.no_plots:
        from m2iv.bench.plots import plot_overhead

        files.append(plot_overhead(rows, f"{preset.name} on {meta['device']}", out / stem))
    print("\nwrote " + ", ".join(map(str, files)))
    return rows


if __name__ == "__main__":
    main()
