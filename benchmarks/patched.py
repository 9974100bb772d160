"""Latency of a steered model: unpatched vs ``m2iv.patch_model`` vs plain forward hooks.

    python -m benchmarks.patched [--preset cpu-tiny|llava-1.5-7b|...] [--device cpu|cuda]
                                 [--quick] [--out DIR]

For one forward (prefill of a text prompt, several batch sizes) and for ``generate()`` (greedy,
KV cache, a fixed number of new tokens) it times, side by side in one process:

* ``unpatched``: the model as loaded, no steering;
* ``patched``: ``m2iv.patch_model(model, vectors)`` (fused ops, backend ``auto``, every token);
* ``patched_masked``: the same with a per-token position mask (a quarter of the prompt, where
  images would sit, left unsteered): the masked kernel path;
* ``hooks``: the same steering (DESIGN.md section 1) with plain forward hooks
  (:mod:`m2iv.testing.reference`), the way hook-based steering libraries apply it;

and prints ``patched / unpatched`` and ``patched / hooks`` ratios. Variants are timed in
interleaved rounds (order alternating); each round keeps a median, and the fastest round of each
variant is reported: on a shared machine noise only ever adds time, so the minimum over rounds
is the steadiest estimate of what each variant costs. Results
go to ``benchmarks/results/patched-<device>-<preset>.json|.csv``.

On a CPU the automatic backend is the C++ extension where built, else the PyTorch reference
(Triton runs there only in its interpreter): at these tiny shapes CPU numbers measure per-call
overheads (Python, op dispatch), not memory traffic. One thread by default on the CPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import m2iv
from m2iv.bench.common import device_tag, machine_info, print_table, time_ms, write_results
from m2iv.bench.presets import PRESETS, build_model
from m2iv.testing import add_steering_hooks
from m2iv_kernels.backends import resolve

VARIANTS = ("unpatched", "patched", "patched_masked", "hooks")


def _variant(model, vectors, name: str, mask: torch.Tensor | None):
    """Install variant ``name``; returns its undo function."""
    if name == "unpatched":
        return lambda: None
    if name in ("patched", "patched_masked"):
        positions = mask if name == "patched_masked" else "all"
        handle = m2iv.patch_model(model, vectors, positions=positions)
        return handle.remove
    return add_steering_hooks(model, vectors).remove


def _measure(model, vectors, make_call, mask, device, rounds: int, budget: float,
             min_reps: int = 5) -> dict:
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            undo = _variant(model, vectors, name, mask)
            try:
                fn = make_call()
                with torch.no_grad():
                    samples[name].append(time_ms(fn, device, budget_s=budget,
                                                 min_reps=min_reps)["median"])
            finally:
                undo()
    return {name: min(s) for name, s in samples.items()}


def run(preset_name: str, device: torch.device, quick: bool) -> list[dict]:
    preset = PRESETS[preset_name]
    model = build_model(preset, device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    vectors = m2iv.M2IV.random_like(model, seed=0, dtype=torch.float32, device=device)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    rounds = 3 if quick else 5
    budget = 0.15 if quick else 0.25
    cpu = device.type == "cpu"
    prompt = 64 if cpu else 512
    forward_batches = (1, 4) if quick or cpu else (1, 8)
    new_tokens = 8 if quick else (16 if cpu else 32)
    gen_batches = (1,) if quick else ((1, 4) if cpu else (1, 8))
    rows = []

    def ids(batch: int) -> torch.Tensor:
        return torch.randint(3, vocab - 8, (batch, prompt), generator=gen).to(device)

    def prompt_mask(batch: int) -> torch.Tensor:
        mask = torch.ones(batch, prompt, dtype=torch.bool)
        mask[:, 1: 1 + prompt // 4] = False  # where an image would sit
        return mask

    for batch in forward_batches:
        x = ids(batch)
        t = _measure(model, vectors, lambda: (lambda: model(input_ids=x, use_cache=False)),
                     prompt_mask(batch), device, rounds, budget)
        rows.append(dict(case="forward", batch=batch, tokens=prompt, **_ratios(t)))
        print(f"forward  batch={batch}: done", flush=True)
    for batch in gen_batches:
        x = ids(batch)
        att = torch.ones_like(x)

        def call():
            return lambda: model.generate(input_ids=x, attention_mask=att,
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          do_sample=False)

        t = _measure(model, vectors, call, prompt_mask(batch), device, rounds, budget,
                     min_reps=3)
        rows.append(dict(case="generate", batch=batch, tokens=f"{prompt}+{new_tokens}",
                         **_ratios(t)))
        print(f"generate batch={batch}: done", flush=True)
    for row in rows:
        row.update(preset=preset_name, device=device_tag(device), dtype=preset.dtype,
                   layers=len(vectors.layers), backend=resolve("auto", device),
                   threads=torch.get_num_threads() if cpu else None)
    return rows


def _ratios(t: dict[str, float]) -> dict:
    return {"unpatched_ms": t["unpatched"], "patched_ms": t["patched"],
            "patched_masked_ms": t["patched_masked"], "hooks_ms": t["hooks"],
            "patched/unpatched": t["patched"] / t["unpatched"],
            "masked/unpatched": t["patched_masked"] / t["unpatched"],
            "patched/hooks": t["patched"] / t["hooks"],
            "hooks/unpatched": t["hooks"] / t["unpatched"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model (default: cpu-tiny on the CPU, llava-1.5-7b on a GPU)")
    p.add_argument("--quick", action="store_true", help="fewer cases, shorter timing budget")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: 1; multi-threaded timings on a "
                        "shared machine swing by 2x between identical runs)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    preset = args.preset or ("cpu-tiny" if device.type == "cpu" else "llava-1.5-7b")
    torch.manual_seed(0)
    rows = run(preset, device, args.quick)
    print(f"\nm2iv.patch_model latency, {preset} on {machine_info(device)['device']}")
    print_table(rows, ["case", "batch", "tokens", "backend", "unpatched_ms", "patched_ms",
                       "hooks_ms", "patched/unpatched", "masked/unpatched", "patched/hooks"])
    out = Path(args.out) if args.out else None
    js, cs = write_results(f"patched-{device_tag(device)}-{preset}", rows, machine_info(device),
                           out)
    print(f"\nwrote {js} and {cs}")


if __name__ == "__main__":
    main()
