"""What steering costs: unsteered vs fused (``m2iv.patch_model``) vs forward hooks, interleaved.

For each batch size and each of eager and compiled execution it times, per repetition, every
mode once (rotating order), each mode on its own :func:`~m2iv.bench.modes.twin` of the model:

* ``prefill``: one forward over the prompt;
* ``decode``: greedy ``generate()`` of ``steps + 1`` tokens; the time from the first to the
  last generated token (prefill excluded), i.e. ``steps`` decode steps with the KV cache.

Eager uses transformers' default (dynamic) cache. Compiled is what transformers documents for
fast decoding: ``model.forward = torch.compile(model.forward, fullgraph=True)`` and
``cache_implementation="static"``; every graph is compiled in a warm-up before timing, and a
recompile during timing is counted in the results (it should be 0).

Reported per case: each mode's median time, and per pair of modes (fused/unsteered,
hooks/unsteered, fused/hooks) the median of the per-repetition time ratios with their IQR
(below 1: the first is cheaper), flagged where the IQR is larger than the effect.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .common import flag_noise, interleaved, ratio_stats, sync
from .modes import steered_twins

PAIRS = (("fused", "unsteered"), ("hooks", "unsteered"), ("fused", "hooks"))


class _Clock:
    """A stopping criterion that timestamps every generated token (never stops generation)."""

    def __init__(self, device: torch.device, now: Callable[[], float] = time.perf_counter):
        self.device, self.now, self.stamps = device, now, []

    def __call__(self, input_ids, scores, **kwargs):
        sync(self.device)
        self.stamps.append(self.now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_seconds(model, inputs: dict, steps: int, device: torch.device,
                   clock: str = "wall", **generate_kwargs) -> float:
    """Seconds between the first and the last of ``steps + 1`` greedy tokens: ``steps``
    decode steps, the prefill excluded (``clock``: as in :func:`~m2iv.bench.common.interleaved`)."""
    from transformers import StoppingCriteriaList

    clock = _Clock(device, time.perf_counter if clock == "wall" else time.thread_time)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                       do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                       pad_token_id=0, **generate_kwargs)
    return clock.stamps[-1] - clock.stamps[0]


def prefill_call(model, inputs: dict) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return model(**inputs, use_cache=False)
    return call


def _compile(models: dict[str, torch.nn.Module]) -> Callable[[], None]:
    """``torch.compile(forward, fullgraph=True)`` on every model (a patched twin's forward is
    the patch's: the steering is traced with the model); returns the undo."""
    import torch._dynamo

    # three twins x batch sizes x (prefill, decode) graphs of one code object
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 512)
    saved = [(m, m.__dict__.get("forward")) for m in models.values()]
    for m in models.values():
        m.forward = torch.compile(m.forward, fullgraph=True)

    def undo() -> None:
        for m, forward in saved:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward

    return undo


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _row(case: dict, samples: dict[str, list[float]]) -> dict:
    row = dict(case)
    for mode, s in samples.items():
        row[f"{mode}_ms"] = statistics.median(s) * 1e3
    for a, b in PAIRS:
        if a in samples and b in samples:
            st = ratio_stats(samples[a], samples[b])
            row[f"{a}/{b}"] = st["median"]
            row[f"{a}/{b}_p25"], row[f"{a}/{b}_p75"] = st["p25"], st["p75"]
            row[f"{a}/{b}_note"] = flag_noise(st)
    return row


def run(model: torch.nn.Module, vectors, make_inputs: Callable[[int], dict], *,
        batches: tuple[int, ...], compiled: tuple[bool, ...] = (False, True),
        phases: tuple[str, ...] = ("prefill", "decode"), steps: int = 16, reps: int = 15,
        device: torch.device, backend: str = "auto", clock: str = "wall",
        progress: Callable[[str], None] | None = None, **patch_kwargs) -> list[dict]:
    """Rows of the cases (phase x batch x eager/compiled) with times and ratios; see the module
    docstring. ``make_inputs(batch)`` gives the model inputs of the prompt."""
    rows = []
    for comp in compiled:
        models, undo = steered_twins(model, vectors, backend=backend, **patch_kwargs)
        uncompile = None
        try:
            if comp:
                uncompile = _compile(models)
            gen = {"cache_implementation": "static"} if comp else {}
            for batch in batches:
                inputs = make_inputs(batch)
                for phase in phases:
                    label = f"{phase} b={batch} {'compiled' if comp else 'eager'}"
                    if progress:
                        progress(label)
                    if phase == "prefill":
                        fns = {m: prefill_call(mm, inputs) for m, mm in models.items()}
                        self_timed = False
                    else:
                        fns = {m: (lambda mm=mm: decode_seconds(mm, inputs, steps, device,
                                                                clock, **gen))
                               for m, mm in models.items()}
                        self_timed = True
                    for fn in fns.values():  # compile and warm every graph before timing
                        fn()
                        fn()
                    before = _graphs() if comp else 0
                    samples = interleaved(fns, device, reps=reps, warmup=1, clock=clock,
                                          self_timed=self_timed)
                    case = {"phase": phase, "batch": batch,
                            "mode": "compiled" if comp else "eager",
                            "tokens": inputs["input_ids"].shape[1],
                            "steps": steps if phase == "decode" else None, "reps": reps,
                            "clock": clock}
                    row = _row(case, samples)
                    row["recompiles"] = (_graphs() - before) if comp else None
                    rows.append(row)
        finally:
            if uncompile is not None:
                uncompile()
                torch._dynamo.reset()
            undo()
    return rows


COLUMNS = ["phase", "batch", "mode", "unsteered_ms", "fused_ms", "hooks_ms",
           "fused/unsteered", "fused/unsteered_p25", "fused/unsteered_p75",
           "hooks/unsteered", "fused/hooks", "fused/hooks_p25", "fused/hooks_p75", "recompiles",
           "fused/unsteered_note", "fused/hooks_note"]
