"""``m2iv bench --engine vllm``: throughput of vLLM serving a batch of requests unsteered and
with K = 1, 4, 32, 256 distinct M2IVs in the same batch, as ratios measured side by side.

Three engines live in one process over the same model: vLLM without m2iv (the reference), a
second one without m2iv (an A/A control) and vLLM with a bank of 256 vector sets. Every repetition times one ``generate`` of the whole batch
(``--requests`` prompts, ``--output-len`` tokens each, greedy, EOS ignored) in every mode, in a
pair with a plain-vLLM run (back to back, order alternating), and each mode's per-pair ratio
``time(plain vLLM) / time(mode)`` is reported as median and interquartile range (ratio > 1:
faster than plain vLLM; the output-token throughput ratio). Modes:

* ``plain vLLM (control)``: a second engine without m2iv, timed like the others: its ratio
  shows the noise and any bias of the method itself (ideally 1);
* ``m2iv unsteered``: the m2iv engine, no request steered (the cost of having the plugin on);
* ``K=k``: request ``i`` steered by vector ``i % k`` (``K=1`` is one shared vector: in vLLM a
  shared vector is a bank slot like any other, so it is the same path).

Prefix caching is off in both engines (salting would otherwise change how much prefill each
mode skips across repetitions). Compiled mode (vLLM's default) unless ``--eager``. Results:
``benchmarks/results/vllm-<device>-<date>.{json,csv,png}``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

__all__ = ["add_arguments", "main_from_args", "run"]

KS = (1, 4, 32, 256)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM engine (--engine vllm)")
    g.add_argument("--vllm-model", default=None, metavar="DIR",
                   help="a Llama/Qwen2/Qwen3/Mistral directory vLLM can load (default: a random "
                   "Llama of --vllm-size saved to a temporary directory)")
    g.add_argument("--vllm-size", default="512x4", metavar="HIDDENxLAYERS",
                   help="size of the default random Llama (head_dim 64)")
    g.add_argument("--requests", type=int, default=256, help="requests per batch")
    g.add_argument("--prompt-len", type=int, default=16)
    g.add_argument("--output-len", type=int, default=16)
    g.add_argument("--ks", type=int, nargs="+", default=list(KS),
                   help="distinct vector sets per batch")
    g.add_argument("--reps", type=int, default=10, help="timed pairs per mode")
    g.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    g.add_argument("--vllm-dtype", default="float32")
    g.add_argument("--kv-cache-mib", type=int, default=512)
    g.add_argument("--cpu-threads", type=int, default=1,
                   help="CPU backend: OpenMP threads vLLM binds (cores 0..N-1); one thread keeps "
                   "the timing steady on a machine shared with other jobs")


def _engine(model: str, args, additional_config=None):
    from vllm import LLM

    tokens = args.requests * (args.prompt_len + args.output_len)
    return LLM(model=model, dtype=args.vllm_dtype, max_model_len=args.prompt_len + args.output_len
               + 16, kv_cache_memory_bytes=args.kv_cache_mib * 2**20, seed=0,
               enforce_eager=args.eager, enable_prefix_caching=False,
               max_num_seqs=args.requests, max_num_batched_tokens=min(max(tokens, 256), 8192),
               additional_config=additional_config or {})


def _model_and_bank(args, workdir: Path) -> tuple[str, str, int]:
    """(model dir, bank file, bank rows): random vectors fitting the model."""
    import torch
    from transformers import AutoModelForCausalLM

    import m2iv

    from ..testing.checkpoints import save_tiny_model

    model = args.vllm_model
    if model is None:
        hidden, layers = (int(x) for x in args.vllm_size.lower().split("x"))
        model = save_tiny_model(workdir / "model", "llama", hidden_size=hidden, num_layers=layers,
                                num_heads=hidden // 64, num_kv_heads=max(1, hidden // 128),
                                intermediate_size=hidden * 11 // 4, vocab_size=4096)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    rows = max(args.ks)
    bank = m2iv.M2IV.stack([m2iv.M2IV.random_like(hf, seed=i) for i in range(rows)])
    path = workdir / "bank.safetensors"
    bank.save(path)
    del hf
    return str(model), str(path), rows


def run(args) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory(prefix="m2iv-vllm-bench-") as workdir:
        return _run(args, Path(workdir))


def _run(args, workdir: Path) -> tuple[list[dict], dict]:
    from vllm import SamplingParams

    model, bank, rows = _model_and_bank(args, workdir)
    plain = _engine(model, args)
    control = _engine(model, args)  # A/A control: a second plain engine, measured the same way
    steer = _engine(model, args, {"m2iv": {"vectors": {"task": bank}}})
    rng = random.Random(0)
    vocab = plain.llm_engine.model_config.get_vocab_size()
    prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(args.prompt_len)]}
               for _ in range(args.requests)]

    def sp(name=None):
        extra = {"m2iv": {"vectors": name}} if name else None
        return SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                              extra_args=extra)

    modes = {"plain vLLM": (plain, [sp()] * args.requests),
             "plain vLLM (control)": (control, [sp()] * args.requests),
             "m2iv unsteered": (steer, [sp()] * args.requests)}
    for k in args.ks:
        modes[f"K={k}"] = (steer, [sp(f"task/{i % k}") for i in range(args.requests)])

    def once(name):
        """(wall seconds, process CPU seconds) of one generate of the whole batch."""
        llm, params = modes[name]
        w0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = (time.perf_counter() - w0, time.process_time() - c0)
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
        return dt

    names = list(modes)
    for name in names:  # warm-up: first-call costs, allocator, caches
        once(name)
    # each mode is timed right beside a plain-vLLM run (order alternating), so load from other
    # processes, which drifts over seconds, hits both sides of every ratio alike
    times = {n: [] for n in names}
    ratios = {n: [] for n in names}
    cpu_ratios = {n: [] for n in names}
    try:
        from tqdm import tqdm
        reps = tqdm(range(args.reps), desc="vllm bench", unit="rep")
    except ImportError:  # pragma: no cover
        reps = range(args.reps)
    for r in reps:
        for j, name in enumerate(names[1:]):
            if (r + j) % 2:
                t_mode, t_plain = once(name), once("plain vLLM")
            else:
                t_plain, t_mode = once("plain vLLM"), once(name)
            times[name].append(t_mode[0])
            times["plain vLLM"].append(t_plain[0])
            ratios[name].append(t_plain[0] / t_mode[0])
            cpu_ratios[name].append(t_plain[1] / t_mode[1])
    ratios["plain vLLM"] = cpu_ratios["plain vLLM"] = [1.0]
    out_tokens = args.requests * args.output_len
    rows_out = []
    for name in names:
        rs, cs = ratios[name], cpu_ratios[name]
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else rs * 3
        qc = statistics.quantiles(cs, n=4) if len(cs) > 1 else cs * 3
        med_t = statistics.median(times[name])
        rows_out.append({"mode": name, "k": int(name[2:]) if name.startswith("K=") else None,
                         "median_s": med_t, "output_tok_s": out_tokens / med_t,
                         "total_tok_s": args.requests * (args.prompt_len + args.output_len)
                         / med_t, "ratio_vs_plain": statistics.median(rs),
                         "ratio_p25": q[0], "ratio_p75": q[2],
                         "cpu_ratio_vs_plain": statistics.median(cs), "cpu_ratio_p25": qc[0],
                         "cpu_ratio_p75": qc[2], "pairs": len(times[name]),
                         "times_s": times[name]})
    meta = {"model": model if args.vllm_model else f"random llama {args.vllm_size}",
            "requests": args.requests, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "reps": args.reps, "eager": args.eager,
            "dtype": args.vllm_dtype, "bank_rows": rows,
            "cpu_threads": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "compilation_mode": str(steer.llm_engine.vllm_config.compilation_config.mode),
            "vllm_version": __import__("vllm").__version__}
    return rows_out, meta


def _plot(rows: list[dict], meta: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["mode"] for r in rows]
    x = np.arange(len(rows))
    lo = hi = 1.0
    for off, key, label, color in ((-0.2, "ratio", "wall time", "#4a7"),
                                   (0.2, "cpu_ratio", "process CPU time", "#47a")):
        med = np.array([r[f"{key}_vs_plain"] for r in rows])
        p25 = np.array([r[f"{key}_p25"] for r in rows])
        p75 = np.array([r[f"{key}_p75"] for r in rows])
        ax.bar(x + off, med, 0.4, yerr=[med - p25, p75 - med], capsize=3, color=color,
               label=f"{label} (median, IQR)")
        lo, hi = min(lo, p25.min()), max(hi, p75.max())
    ax.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.95, color="r", lw=0.8, ls="--", label="-5 %")
    ax.set_ylim(min(0.8, lo - 0.02), max(1.05, hi + 0.02))
    ax.set_ylabel("throughput / plain vLLM")
    mode = "eager" if meta["eager"] else "compiled"
    threads = meta.get("cpu_threads")
    where = f"CPU, vLLM threads bound to cores {threads}" if threads else meta["device"]
    ax.set_title(f"m2iv on vLLM {meta['vllm_version']} ({mode}): {meta['requests']} requests per "
                 f"batch; {where}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main_from_args(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in-process
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if args.cpu_threads and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        n = args.cpu_threads
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if n == 1 else f"0-{n - 1}"
    import torch
    from ..bench.common import device_tag, machine_info, print_table, results_dir, \
        write_results

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(args, "smoke", False):  # seconds: checks the harness, measures nothing
        args.requests, args.prompt_len, args.output_len, args.reps = 8, 8, 4, 1
        args.ks, args.eager, args.vllm_size, args.kv_cache_mib = [1, 4], True, "128x2", 32
    rows, meta = run(args)
    meta = {**machine_info(device), **meta}
    print_table(rows, ["mode", "median_s", "output_tok_s", "ratio_vs_plain", "ratio_p25",
                       "ratio_p75", "cpu_ratio_vs_plain", "cpu_ratio_p25", "cpu_ratio_p75"])
    stem = f"vllm-{device_tag(device)}-{time.strftime('%Y-%m-%d')}"
    out_dir = Path(args.out) if getattr(args, "out", None) else results_dir()
    write_results(stem, rows, meta, out_dir)
    plot = None if getattr(args, "no_plots", False) else _plot(rows, meta, out_dir / f"{stem}.png")
    print(f"results: {out_dir / stem}.json/.csv" + (f", {plot}" if plot else ""))
    return {"rows": rows, "meta": meta}
