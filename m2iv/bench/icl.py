"""M2IV vs token-level in-context learning: prefill latency, decode throughput, peak memory,
KV-cache size and context limits, from 1 to 128 shots, side by side in one run.

    m2iv bench --preset cpu-tiny                 # or: python -m m2iv.bench.icl --preset cpu-tiny
    m2iv bench --preset llava-1.5-7b             # on a GPU
    m2iv bench --preset cpu-tiny --set text.num_hidden_layers=8 --shots 1 4 16

Modes: (a) zero-shot, unsteered; (b) zero-shot + M2IV through the fused patcher; (c) zero-shot
+ the same steering through plain forward hooks; (d) k-shot ICL with real interleaved
image+text demonstrations. Then multi-task batches: K distinct vectors in one batch via the
bank index, against one shared vector and against running each task's requests as its own
batch (what per-request hook steering must do). Then what steering costs (a) vs (b) vs (c),
timed interleaved (:mod:`m2iv.bench.overhead`): prefill and decode at batch 1 and the preset's
decode batch, eager and compiled (``torch.compile(fullgraph=True)``, static cache), as medians
of per-repetition ratios with their IQR.

Peak memory of one prefill (activations + KV cache; weights excluded): on CUDA,
``torch.cuda.max_memory_allocated`` above the memory held before it. On the CPU, the PyTorch
profiler's allocation records (``profile_memory=True``), summed in time order: the peak of live
tensor bytes at operator boundaries (temporaries freed inside one operator are not seen). It
runs after the timings, so profiling never slows a timed call.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import inspect
from pathlib import Path

import torch

from ..testing.reference import add_steering_hooks
from .._extras import missing
from . import overhead
from .common import device_tag, kineto_quiet, machine_info, print_table, time_ms, write_results
from .overhead import decode_seconds
from .presets import PRESETS, Preset, apply_overrides, build_model, context_window, make_inputs

SHOTS = [1, 2, 4, 8, 16, 32, 64, 128]
TASKS = [1, 4, 32, 256]


# ------------------------------------------------------------------------------ measuring

def _cache_of(out):
    """The KV cache of a forward's output (``cache`` in transformers >= 5.2x, else
    ``past_key_values``)."""
    return out.get("cache", None) or out.get("past_key_values", None)


def kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class PeakMemory:
    """Peak bytes of live tensors above the level at ``__enter__`` (see the module docstring).

    CUDA: the caching allocator's own peak counter. CPU: the PyTorch profiler's allocation
    records (``profile_memory=True``), summed in time order over top-level operators and frees;
    temporaries allocated and freed inside one operator are not seen."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with kineto_quiet():
                self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return False
        with kineto_quiet():
            self.prof.__exit__(*exc)
        top = [e for e in self.prof.events() if e.cpu_parent is None and e.cpu_memory_usage]
        running = 0
        for e in sorted(top, key=lambda e: e.time_range.start):
            running += e.cpu_memory_usage
            self.peak = max(self.peak, running)
        return False


def decode_tps(model, inputs: dict, steps: int, device: torch.device, repeats: int) -> float:
    """Decode tokens per second (batch x steps / decode time), median over ``repeats``."""
    batch = inputs["input_ids"].shape[0]
    rates = sorted(batch * steps / decode_seconds(model, inputs, steps, device)
                   for _ in range(repeats))
    return rates[len(rates) // 2]


def prefill(model, inputs: dict):
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        model.forward).parameters else {}
    with torch.no_grad():
        return model(**inputs, use_cache=True, **kw)


def measure(model, preset: Preset, inputs: dict, batch_inputs: dict, device, args) -> dict:
    """Prefill latency, decode throughput at batch 1 and N, peak memory, KV bytes."""
    t = time_ms(lambda: prefill(model, inputs), device, budget_s=args.budget, min_reps=3)
    row = {"prefill_ms": t["median"], "prefill_p25_ms": t["p25"], "prefill_p75_ms": t["p75"]}
    with torch.no_grad():
        row["decode_tps_b1"] = decode_tps(model, inputs, preset.decode_steps, device,
                                          args.decode_repeats)
        row[f"decode_tps_b{preset.decode_batch}"] = decode_tps(
            model, batch_inputs, preset.decode_steps, device, args.decode_repeats)
    with PeakMemory(device) as mem:  # last: profiling must not slow a timed call
        out = prefill(model, inputs)
        kv = kv_bytes(_cache_of(out))
        del out
    row.update(peak_mem_MB=mem.peak / 2**20, kv_cache_MB=kv / 2**20)
    return row


def warm_up(model, vectors, inputs: dict, batch_inputs: dict, args) -> None:
    """First calls pay one-time costs (lazy initialisation, allocator growth, extension
    loading); run every path once so that no measured mode pays them."""
    import m2iv

    for steering in (contextlib.nullcontext(), m2iv.steer(model, vectors, backend=args.backend),
                     _hooks(model, vectors)):
        with steering, torch.no_grad():
            prefill(model, inputs)
            for inp in (inputs, batch_inputs):
                model.generate(**inp, max_new_tokens=2, do_sample=False, pad_token_id=0)


@contextlib.contextmanager
def _hooks(model, vectors, index=None):
    reference = add_steering_hooks(model, vectors, index)
    try:
        yield
    finally:
        reference.remove()


def check_fused_equals_hooks(model, vectors, inputs, backend: str) -> float:
    """Mode (b) must produce mode (c)'s logits, and both must differ from (a): a fast wrong
    path cannot win. Returns the relative max difference."""
    import m2iv

    with torch.no_grad():
        base = model(**inputs).logits.float()
        with _hooks(model, vectors):
            hooked = model(**inputs).logits.float()
        with m2iv.steer(model, vectors, backend=backend):
            fused = model(**inputs).logits.float()
    scale = hooked.abs().max().clamp_min(1e-6)
    diff = float((fused - hooked).abs().max() / scale)
    moved = float((hooked - base).abs().max() / scale)
    tol = 1e-4 if model.dtype == torch.float32 else 3e-2
    if diff > tol or moved < 10 * tol:
        raise RuntimeError(f"correctness guard failed: fused vs hook logits differ by {diff:.3g} "
                           f"(tolerance {tol}); steering moved logits by {moved:.3g}")
    return diff


# ------------------------------------------------------------------------------ the run

def run(preset: Preset, args) -> tuple[list[dict], list[dict]]:
    import m2iv
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(preset, device)
    vectors = m2iv.M2IV.random_like(model, seed=0).to(device)
    zero, n_zero = make_inputs(preset, model, 0)
    zero_b, _ = make_inputs(preset, model, 0, batch=preset.decode_batch, seed=1)
    guard = check_fused_equals_hooks(model, vectors, zero, args.backend)
    warm_up(model, vectors, zero, zero_b, args)
    ctx = context_window(preset)

    plan = [("a) unsteered", 0), ("b) M2IV fused", 0), ("c) M2IV hooks", 0)] + [
        (f"d) ICL {k}-shot", k) for k in args.shots]
    rows = []
    bar = tqdm(plan + [(f"multi-task K={k}", k) for k in args.tasks], desc=preset.name,
               unit="run")
    for mode, k in plan:
        bar.set_postfix_str(mode)
        row = {"mode": mode, "shots": k}
        try:
            if k:
                inputs, n = make_inputs(preset, model, k)
                row["prompt_tokens"] = n
                if n + preset.decode_steps + 1 > ctx:
                    row["status"] = f"exceeds context ({n} + {preset.decode_steps} > {ctx})"
                    rows.append(row)
                    bar.update()
                    continue
                batch_inputs, _ = make_inputs(preset, model, k, batch=preset.decode_batch, seed=1)
                row.update(measure(model, preset, inputs, batch_inputs, device, args))
            else:
                row["prompt_tokens"] = n_zero
                steering = (m2iv.steer(model, vectors, backend=args.backend)
                            if mode.startswith("b") else
                            _hooks(model, vectors) if mode.startswith("c")
                            else contextlib.nullcontext())
                with steering:
                    row.update(measure(model, preset, zero, zero_b, device, args))
            row["status"] = "ok"
        except (torch.cuda.OutOfMemoryError, MemoryError):
            row["status"] = "OOM"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        bar.update()
    _ratios(rows, preset)
    for row in rows:
        row["guard_rel_diff"] = guard if row["mode"].startswith(("b", "c")) else None

    tasks = run_multitask(model, preset, vectors, device, args, bar)
    bar.close()
    compiled = {"both": (False, True), "eager": (False,), "compiled": (True,),
                "none": ()}[args.overhead]
    costs = overhead.run(
        model, vectors, lambda b: make_inputs(preset, model, 0, batch=b, seed=3)[0],
        batches=(1, preset.decode_batch), compiled=compiled, steps=preset.decode_steps,
        reps=args.overhead_reps, device=device, backend=args.backend,
        progress=lambda label: print(f"steering cost: {label} ...", flush=True)) \
        if compiled else []
    return rows, tasks, costs


def _ratios(rows: list[dict], preset: Preset) -> None:
    """The ICL-vs-M2IV speedups, in place. (What steering costs against (a) is measured
    interleaved, by :mod:`m2iv.bench.overhead`: these rows are timed one after another.)"""
    by = {r["mode"][:1]: r for r in rows if r["mode"][:1] in "abc" and r.get("status") == "ok"}
    b = by.get("b")
    dec = f"decode_tps_b{preset.decode_batch}"
    for r in rows:
        if r.get("status") != "ok" or not b:
            continue
        if r["mode"].startswith("d"):
            r["m2iv_prefill_speedup"] = r["prefill_ms"] / b["prefill_ms"]
            r["m2iv_decode_speedup"] = b[dec] / r[dec]
            r["m2iv_memory_ratio"] = r["peak_mem_MB"] / max(b["peak_mem_MB"], 1e-9)
            r["m2iv_kv_ratio"] = r["kv_cache_MB"] / max(b["kv_cache_MB"], 1e-9)


def run_multitask(model, preset: Preset, vectors, device, args, bar) -> list[dict]:
    """Decode throughput of one batch whose sequences use K distinct vectors."""
    import m2iv

    batch = args.multitask_batch
    inputs, _ = make_inputs(preset, model, 0, batch=batch, seed=2, with_images=False)
    steps = preset.decode_steps
    out = []
    with m2iv.steer(model, vectors, backend=args.backend):
        decode_tps(model, inputs, 1, device, 1)  # warm-up at this batch size
        shared = decode_tps(model, inputs, steps, device, args.decode_repeats)
    for k in args.tasks:
        bar.set_postfix_str(f"multi-task K={k}")
        if k > batch:
            out.append({"K": k, "status": f"K > batch {batch}"})
            bar.update()
            continue
        bank = m2iv.M2IV.stack([vectors] + [m2iv.M2IV.random_like(model, seed=s).to(device)
                                            for s in range(1, k)])
        index = torch.arange(batch, device=device) % k
        handle = m2iv.patch_model(model, bank, backend=args.backend)
        try:
            handle.select(index)
            fused = decode_tps(model, inputs, steps, device, args.decode_repeats)
        finally:
            handle.remove()
        # per-task batches: each task's requests run as their own steered batch
        seconds = 0.0
        for t in range(k):
            rows_t = (index == t).nonzero().flatten()
            with _hooks(model, bank[t]):
                seconds += decode_seconds(model, {n: v[rows_t] for n, v in inputs.items()},
                                          steps, device)
        split = batch * steps / seconds
        out.append({"K": k, "batch": batch, "shared_vector_tps": shared, "bank_fused_tps": fused,
                    "split_per_task_hooks_tps": split, "bank_vs_shared": fused / shared,
                    "split_vs_shared": split / shared, "status": "ok"})
        bar.update()
    return out


# ------------------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override preset fields, e.g. text.num_hidden_layers=8 "
                        "image_size=224x224 decode_steps=8 dtype=bfloat16")
    p.add_argument("--shots", type=int, nargs="+", default=SHOTS)
    p.add_argument("--tasks", type=int, nargs="+", default=TASKS,
                   help="numbers of distinct vectors K in one multi-task batch")
    p.add_argument("--multitask-batch", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per prefill")
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--overhead", choices=("both", "eager", "compiled", "none"), default="both",
                   help="what steering costs, (a) vs (b) vs (c) interleaved: eager, compiled "
                        "(torch.compile + static cache; compiling takes minutes on a CPU), "
                        "both (default) or none")
    p.add_argument("--overhead-reps", type=int, default=15,
                   help="interleaved repetitions of the steering-cost measurement")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: a new one under runs/)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run: 2 shots, K in {1, 4}, tiny timing budgets, eager "
                        "steering cost only")


def plots_if_possible(rows, tasks, preset: Preset, meta: dict, stem: Path,
                      costs: list[dict] = ()) -> list[Path]:
    """The PNG plots, or none (said in one line) where matplotlib is not installed: the
    tables and result files matter more than the pictures."""
    why = missing("matplotlib", "the plots")
    if why is not None:
        print(f"note: {why}; skipped them")
        return []
    from .plots import plot_icl, plot_overhead

    files = plot_icl(rows, tasks, preset, meta, stem)
    if costs:
        files.append(plot_overhead(costs, f"{preset.name} on {meta['device']}", stem))
    return files


def main_from_args(args) -> dict:
    from .common import results_dir

    preset = apply_overrides(PRESETS[args.preset], args.overrides)
    if args.smoke:
        preset = apply_overrides(preset, ["decode_steps=4", "decode_batch=2"])
        args.shots, args.tasks, args.multitask_batch = [1, 2, 64], [1, 4], 8
        args.budget, args.decode_repeats, args.overhead_reps = 0.05, 1, 2
        if args.overhead == "both":
            args.overhead = "eager"
    device = torch.device(args.device)
    meta = {**machine_info(device), "preset": preset.name, "preset_config":
            {"family": preset.family, "text": preset.text, "vision": preset.vision,
             "image_size": preset.image_size, "dtype": preset.dtype,
             "decode_steps": preset.decode_steps, "decode_batch": preset.decode_batch},
            "backend": args.backend}
    print(f"m2iv bench: {preset.name} ({preset.description}) on {meta['device']}")
    rows, tasks, costs = run(preset, args)
    cols = ["mode", "prompt_tokens", "status", "prefill_ms", "decode_tps_b1",
            f"decode_tps_b{preset.decode_batch}", "peak_mem_MB", "kv_cache_MB",
            "m2iv_prefill_speedup", "m2iv_decode_speedup", "m2iv_memory_ratio"]
    print()
    print_table(rows, cols)
    print()
    print_table(tasks, ["K", "batch", "shared_vector_tps", "bank_fused_tps",
                        "split_per_task_hooks_tps", "bank_vs_shared", "split_vs_shared"])
    if costs:
        print("\nwhat steering costs, interleaved (time ratios: median of per-repetition "
              "ratios, p25-p75; below 1 = cheaper):")
        print_table(costs, [c for c in overhead.COLUMNS if any(c in r for r in costs)])
    out_dir = args.out or results_dir(preset.name)
    stem = f"{preset.name}-{device_tag(device)}-{dt.date.today().isoformat()}" + (
        "-smoke" if args.smoke else "")
    js, cs = write_results(stem, rows + [{"mode": "multi-task", **t} for t in tasks]
                           + [{"mode": "steering cost", **c} for c in costs], meta,
                           out_dir=out_dir)
    files = [js, cs]
    if not args.no_plots:
        files += plots_if_possible(rows, tasks, preset, meta, out_dir / stem, costs)
    print("\nwrote " + ", ".join(str(f) for f in files))
    return {"rows": rows, "tasks": tasks, "costs": costs, "files": files}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m m2iv.bench.icl",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    main()
