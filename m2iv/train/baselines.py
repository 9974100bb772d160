"""Baselines in the same vectors format, so evaluation and benchmarks compare like with like.

=====================  ==========================================================================
method                 what it produces (an :class:`~m2iv.M2IV`)
=====================  ==========================================================================
``mean-activation``    training-free task / function vectors: per-head mean of the attention
                       heads' outputs (the o_proj input) at the query's last token over k-shot
                       ICL prompts, minus the same mean over zero-shot prompts, in ``mha``; the
                       same difference of the MLP outputs in ``mlp``; gates 1.
                       ``branches="mha"`` keeps the head vectors only (function-vector style,
                       ``mlp`` = 0), ``"mlp"`` the MLP ones only.
``live``               LIVE-style: one vector per layer on the layer output, KL-trained. The
                       documented subset of M2IV: ``mlp[l]`` is LIVE's vector and ``mlp_gates[l]``
                       its per-layer scale (both added after the MLP, i.e. on the layer output);
                       ``mha`` = 0 and ``mha_gates`` = 1, untrained. Loss: the mimicry KL
                       only (no CE, no synergy term).
``mha-only``           M2IV with the MLP branch frozen at zero (``mlp`` = 0).
``mlp-only``           M2IV with the MHA branch frozen at zero (``mha`` = 0); unlike ``live`` it
                       keeps M2IV's CE term (and the alignment, if ``synergy`` selects it; the
                       decorrelation needs both branches, so it is off).
``m2iv``               the full method (:func:`m2iv.train.train_m2iv`).
=====================  ==========================================================================

Why a *difference* of means: the vectors are *added* to the heads' outputs, so the additive
quantity that moves the zero-shot run towards the ICL run is the mean shift ICL causes, not the
raw mean activation (adding the raw mean would double the head's typical output). At the query
position this is the task-vector / function-vector / ICV recipe expressed in M2IV's slots.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import TaskData, load_task
from ..families import describe, module_device, module_dtype
from ..prompts import PromptBuilder, make_prompt_builder
from ..vectors import M2IV
from .config import TRAINED_METHODS, TrainConfig, TrainResult
from .distill import Distiller, train_m2iv
from .sampling import Sampler

__all__ = ["mean_activation_vectors", "train_method"]

def train_method(method: str, model, data, builder: PromptBuilder | None = None,
                 config: TrainConfig | None = None, **kwargs) -> TrainResult:
    """Train one of :data:`TRAINED_METHODS` (its overrides win over ``config``)."""
    if method not in TRAINED_METHODS:
        raise ValueError(f"unknown trained method {method!r}; choose from "
                         f"{', '.join(TRAINED_METHODS)} (mean-activation is training-free: "
                         "mean_activation_vectors)")
    keys = ("processor", "init", "resume", "dist", "cache")
    passthrough = {k: v for k, v in kwargs.items() if k in keys}
    overrides = {k: v for k, v in kwargs.items() if k not in keys}
    overrides.update(TRAINED_METHODS[method], method=method)
    return train_m2iv(model, data, builder, config, **passthrough, **overrides)


class _Collector:
    """Hooks summing o_proj inputs and MLP outputs at one position per row."""

    def __init__(self, info, layers: Sequence[int]):
        self.specs = [info.layer(i) for i in layers]
        self.positions: torch.Tensor | None = None
        self.heads = [None] * len(self.specs)
        self.mlps = [None] * len(self.specs)
        self._hooks = []

    def _take(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.positions.to(x.device)
        return x[torch.arange(x.shape[0], device=x.device), pos].float()  # [B, C]

    def __enter__(self):
        for j, spec in enumerate(self.specs):
            def pre(module, args, j=j):
                self.heads[j] = self._take(args[0])

            def post(module, args, out, j=j):
                out = out[0] if isinstance(out, (tuple, list)) else out
                self.mlps[j] = self._take(out)

            self._hooks.append(spec.o_proj.register_forward_pre_hook(pre))
            self._hooks.append(spec.mlp.register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def _mean_at_query(model, builder, info, layers, queries, demos, batch_size):
    """Per-layer mean of o_proj inputs ``[L, H*Dh]`` and MLP outputs ``[L, D]`` at the last
    prompt token."""
    dev, dt = module_device(model), module_dtype(model)
    sum_h = sum_m = None
    n = 0
    with _Collector(info, layers) as col:
        for s in range(0, len(queries), batch_size):
            q = queries[s:s + batch_size]
            d = None if demos is None else demos[s:s + batch_size]
            enc = builder.encode(q, d, with_answer=False).to(dev, dt)
            col.positions = enc.query_positions
            model(**enc.inputs, use_cache=False)
            h = torch.stack([x.sum(0) for x in col.heads])  # [L, H*Dh]
            m = torch.stack([x.sum(0) for x in col.mlps])  # [L, D]
            sum_h = h if sum_h is None else sum_h + h
            sum_m = m if sum_m is None else sum_m + m
            n += len(q)
    return sum_h / n, sum_m / n


STRENGTH_GRID = (0.125, 0.25, 0.5, 0.75, 1.0, 1.5)


@torch.no_grad()
def mean_activation_vectors(model, data, builder: PromptBuilder | None = None, *,
                            processor=None, shots: int = 4, pool_size: int | None = None,
                            n_prompts: int = 64, layers: Sequence[int] | None = None,
                            branches: str = "both", seed: int = 0, batch_size: int = 8,
                            tune: bool = True, grid: Sequence[float] = STRENGTH_GRID,
                            tune_queries: int = 32, teacher_sets: int | None = None,
                            positions: str = "all", backend: str = "auto") -> M2IV:
    """Training-free mean-activation vectors (see the module docstring).

    ``n_prompts`` training queries, each with ``shots`` demonstrations sampled from the same
    pool a trained M2IV would use (``pool_size``, ``seed``). The model must not be steered
    while this runs (the means are of the unsteered model).

    ``tune``: added at every layer and position, the raw mean shift usually overshoots, so its
    overall strength is chosen from ``grid`` by the KL to the same teacher a trained M2IV
    distils (``shots``-shot, averaged over ``teacher_sets`` demonstration sets; default
    :class:`~m2iv.train.config.TrainConfig`'s) on ``tune_queries`` *training* queries (never
    the eval split), and folded into the gates (``meta["training"]["strength"]``). Without it
    the baseline is often worse than zero-shot, which would flatter any trained method.
    """
    if branches not in ("both", "mha", "mlp"):
        raise ValueError(f"branches must be 'both', 'mha' or 'mlp'; got {branches!r}")
    data: TaskData = load_task(data)
    data.require_splits("pool", "train")
    builder = builder or make_prompt_builder(model, processor)
    info = describe(model)
    layers = tuple(layers) if layers is not None else info.steerable_layers
    sampler = Sampler(data, shots, pool_size, batch_size=n_prompts, seed=seed, eval_queries=0)
    queries = sampler.queries(0, n_prompts)
    demos = sampler.demos(queries, shots, "mean-activation")
    icl_h, icl_m = _mean_at_query(model, builder, info, layers, queries, demos, batch_size)
    zs_h, zs_m = _mean_at_query(model, builder, info, layers, queries, None, batch_size)
    base = M2IV.zeros_like(model, layers)
    L, H, Dh = base.mha.shape
    mha = (icl_h - zs_h).reshape(L, H, Dh).cpu() if branches != "mlp" else base.mha
    mlp = (icl_m - zs_m).cpu() if branches != "mha" else base.mlp
    meta = dict(base.meta, task=data.name, shots=shots, pool_size=len(sampler.pool),
                method="mean-activation",
                description=f"mean-activation ({branches}) vectors from {n_prompts} "
                            f"{shots}-shot prompts of {data.name}")
    meta["training"] = {"n_prompts": n_prompts, "branches": branches, "seed": seed,
                        "position": "query (last prompt token)"}
    v = M2IV(mha.float(), base.mha_gates, mlp.float(), base.mlp_gates, layers, meta)
    if not tune:
        return v
    sets = {} if teacher_sets is None else {"teacher_sets": teacher_sets}
    d = Distiller(model, data, builder, shots=shots, pool_size=pool_size, seed=seed, steps=0,
                  eval_every=0, progress=False, synergy_weight=0.0, positions=positions,
                  backend=backend, batch_size=batch_size, **sets)
    try:
        tq = d.sampler.queries(10**6, tune_queries)  # away from the first training batches
        kls = {float(s): d.evaluate(v, items=tq, strength=float(s))["kl"] for s in grid}
    finally:
        d.close()
    best = min(kls, key=kls.get)
    out = v.scale(best)
    out.meta["training"].update(strength=best, strength_grid_kl=kls)
    return out
