"""What steering costs: unsteered vs fused (``m2iv.patch_model``) vs forward hooks, interleaved.

For each batch size and each of eager and compiled execution it times, per repetition, every
mode once, each mode on its own :func:`~m2iv.bench.modes.twin` of the model:

* ``prefill``: forwards over the prompt (as many per sample as take ~50 ms);
* ``decode``: greedy ``generate()`` of ``steps + 1`` tokens per mode, the modes' generate
  calls in lockstep (:func:`lockstep_decode`: they take turns token by token); the time of
  ``steps`` decode steps with the KV cache, prefill excluded.

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

from .common import flag_noise, interleaved, no_gc, ratio_stats, sync, time_once
from .modes import MODES, steered_twins

PAIRS = (("fused", "unsteered"), ("hooks", "unsteered"), ("fused", "hooks"),
         ("fused_kernels", "unsteered"), ("fused_kernels", "fused"))


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


def lockstep_decode(models: dict[str, torch.nn.Module], inputs: dict, steps: int,
                    device: torch.device, clock: str = "wall", first: int = 0,
                    **generate_kwargs) -> dict[str, float]:
    """Seconds of ``steps`` decode steps per model, the models' ``generate()`` calls run in
    lockstep: one thread per model, and a baton passed at every generated token, so the modes
    alternate step by step (A, B, C, A, B, C, ...) and a burst of load on a shared machine
    hits all of them alike. Each model's time counts only while it holds the baton (its
    thread's CPU time with ``clock="thread"``), from one token to the next, prefill excluded.
    ``first``: the model that starts (rotate it between calls).
    """
    import threading

    import torch._dynamo
    from transformers import StoppingCriteriaList

    names = list(models)
    now = time.perf_counter if clock == "wall" else time.thread_time
    cond = threading.Condition()
    state = {"turn": first % len(names), "done": set()}
    spent = dict.fromkeys(names, 0.0)
    errors: list[BaseException] = []

    def pass_baton(k: int) -> None:  # under cond: the next model still generating
        for j in range(1, len(names) + 1):
            nxt = (k + j) % len(names)
            if names[nxt] not in state["done"]:
                state["turn"] = nxt
                break
        cond.notify_all()

    def wait_turn(k: int) -> None:  # under cond
        cond.wait_for(lambda: state["turn"] == k or errors)

    class Baton:
        def __init__(self, k: int):
            self.k, self.tokens, self.resumed = k, 0, 0.0

        def __call__(self, input_ids, scores, **kwargs):
            sync(device)
            t = now()
            self.tokens += 1
            if self.tokens > 1:
                spent[names[self.k]] += t - self.resumed
            with cond:
                if self.tokens == steps + 1:  # the last token: generate() returns next
                    state["done"].add(names[self.k])
                    pass_baton(self.k)
                else:
                    pass_baton(self.k)
                    wait_turn(self.k)
            self.resumed = now()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def work(k: int) -> None:
        try:
            with cond:
                wait_turn(k)
            with torch.no_grad(), torch._dynamo.config.patch(dynamo):
                models[names[k]].generate(
                    **inputs, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                    do_sample=False, stopping_criteria=StoppingCriteriaList([Baton(k)]),
                    pad_token_id=0, **generate_kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            with cond:
                errors.append(err)
                state["done"].add(names[k])
                pass_baton(k)

    # Dynamo's config is per thread: the workers get the caller's settings (_compile)
    dynamo = {k: getattr(torch._dynamo.config, k) for k in _DYNAMO}
    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(names))]
    with no_gc():
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    return spent


def prefill_call(model, inputs: dict) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return model(**inputs, use_cache=False)
    return call


_LIMITS = ("recompile_limit", "accumulated_recompile_limit")  # Dynamo's (torch >= 2.6)
#: what _compile sets and lockstep_decode hands to its worker threads
_DYNAMO = (*_LIMITS, "skip_nnmodule_hook_guards")


def _compile(models: dict[str, torch.nn.Module], backend: str = "inductor"
             ) -> Callable[[], None]:
    """``torch.compile(forward, fullgraph=True)`` on every model (a patched twin's forward is
    the patch's: the steering is traced with the model); returns the undo.

    The unsteered and hooks twins run one code object, so one Dynamo cache: by default
    (``skip_nnmodule_hook_guards``) Dynamo does not guard on module hooks, and the hooks twin
    would silently run the unsteered twin's graph. Hook guards are on meanwhile."""
    import torch._dynamo

    cfg = torch._dynamo.config
    before = {k: getattr(cfg, k) for k in _DYNAMO}
    # twins x batch sizes x (prefill, decode) graphs of one code object
    for name, least in zip(_LIMITS, (64, 512)):
        setattr(cfg, name, max(getattr(cfg, name), least))
    cfg.skip_nnmodule_hook_guards = False
    saved = [(m, m.__dict__.get("forward")) for m in models.values()]
    for m in models.values():
        m.forward = torch.compile(m.forward, fullgraph=True, backend=backend)

    def undo() -> None:
        for m, forward in saved:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
        cfg.skip_nnmodule_hook_guards = before["skip_nnmodule_hook_guards"]

    return undo


def check_compiled(models: dict[str, torch.nn.Module], inputs: dict,
                   eager: dict[str, torch.Tensor]) -> None:
    """Every steered mode's compiled prefill logits must be its own eager logits, not the
    unsteered model's: a compiled graph that dropped the steering (e.g. one shared with an
    unsteered twin) would time the wrong thing."""
    base = eager.get("unsteered")
    for mode, model in models.items():
        if mode == "unsteered" or base is None:
            continue
        got = prefill_call(model, inputs)().logits.float()
        want = eager[mode].float()
        effect = float((want - base.float()).abs().max())
        err = float((got - want).abs().max())
        if not err < 0.5 * effect:
            raise RuntimeError(
                f"compiled {mode!r} does not steer like eager {mode!r}: max |compiled - eager| "
                f"= {err:.3g} against a steering effect of {effect:.3g}; the benchmark would "
                "time a graph without the steering")


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
        modes: tuple[str, ...] = MODES[:3],
        progress: Callable[[str], None] | None = None, **patch_kwargs) -> list[dict]:
    """Rows of the cases (phase x batch x eager/compiled) with times and ratios; see the module
    docstring. ``make_inputs(batch)`` gives the model inputs of the prompt."""
    rows = []
    for comp in compiled:
        models, undo = steered_twins(model, vectors, backend=backend, modes=modes,
                                     **patch_kwargs)
        uncompile = None
        try:
            if comp:
                # one eager forward first: lazy set-up (transformers installs its output
                # capturing hooks on first use) cannot run inside a fullgraph trace
                inputs = make_inputs(batches[0])
                eager = {m: prefill_call(mm, inputs)().logits for m, mm in models.items()}
                uncompile = _compile(models)
                check_compiled(models, inputs, eager)
            gen = {"cache_implementation": "static"} if comp else {}
            for batch in batches:
                inputs = make_inputs(batch)
                for phase in phases:
                    label = f"{phase} b={batch} {'compiled' if comp else 'eager'}"
                    if progress:
                        progress(label)
                    before = None
                    if phase == "prefill":
                        fns = {m: prefill_call(mm, inputs) for m, mm in models.items()}
                        for fn in fns.values():  # compile and warm every graph first
                            fn()
                        # samples of >= ~50 ms: a short burst of load averages out
                        inner = max(1, round(0.05 / time_once(next(iter(fns.values())),
                                                               device)))
                        before = _graphs() if comp else 0
                        samples = interleaved(fns, device, reps=reps, inner=inner, warmup=1,
                                              clock=clock)
                    else:
                        for _ in range(2):  # compile and warm every graph first
                            lockstep_decode(models, inputs, steps, device, clock, **gen)
                        before = _graphs() if comp else 0
                        samples = {m: [] for m in models}
                        for r in range(reps):
                            for m, sec in lockstep_decode(models, inputs, steps, device, clock,
                                                          first=r, **gen).items():
                                samples[m].append(sec)
                    case = {"phase": phase, "batch": batch,
                            "exec": "compiled" if comp else "eager",
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


COLUMNS = ["phase", "batch", "exec", "unsteered_ms", "fused_ms", "hooks_ms",
           "fused_kernels_ms", "fused/unsteered", "fused/unsteered_p25", "fused/unsteered_p75",
           "hooks/unsteered", "fused/hooks", "fused/hooks_p25", "fused/hooks_p75",
           "fused_kernels/fused", "fused_kernels/fused_p25", "fused_kernels/fused_p75",
           "recompiles", "fused/unsteered_note", "fused/hooks_note", "fused_kernels/fused_note"]
