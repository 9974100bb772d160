"""Distil k-shot multimodal in-context learning into M2IV vectors.

The model is frozen. Each optimizer step:

1. samples ``batch_size * grad_accum`` training queries (a seeded stream: each epoch a fresh
   permutation of the ``train`` split) and, *for every query*, ``shots`` demonstrations drawn
   from the demonstration pool (``pool_size`` items of the ``pool`` split). The pool can be far
   larger than one context: over the steps the vectors see all of it ("many-shot");
2. runs the teacher, the unsteered model on the k-shot prompt with the answer appended
   (teacher forcing), or reads its outputs from the :class:`TeacherCache`;
3. runs the student, the same model on the zero-shot prompt, steered by the trainable vectors
   through :func:`m2iv.patch_model` (the fused kernels' autograd carries the gradients to
   the vectors and gates: there is no separate slow path);
4. minimises ``kl_weight * KL + ce_weight * CE + synergy_weight * synergy`` (see
   :mod:`m2iv.train.losses`), with AdamW, linear warm-up then cosine decay, gradient clipping
   and accumulation.

Sampling is a pure function of ``(seed, step, micro-batch)``, so a resumed run sees the same
data as an uninterrupted one, reruns hit the teacher cache, and data-parallel ranks agree on
the global batch and each takes a contiguous shard of it.

Learning rates are relative: with ``lr_scale="auto"`` the MLP vectors' learning rate is
``lr * r`` where ``r`` is the RMS of the steered layers' outputs at the answer positions
(measured once on the first batch, averaged over ranks), and the MHA vectors' is
``lr * r / g`` with ``g`` the mean gain of o_proj; gates use ``lr`` itself (they are O(1)).
So one ``lr`` works across model sizes.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .._atomic import atomic_write
from ..data import DataError, Item, TaskData, load_task
from ..families import describe
from ..patch import patch_model
from ..prompts import EncodedBatch, PromptBuilder, make_prompt_builder
from ..vectors import M2IV
from . import distributed as ddp
from .losses import answer_ce, branch_decorrelation, hidden_alignment, mimicry_kl
from .teacher_cache import TeacherCache, model_fingerprint, prompt_key

__all__ = ["TrainConfig", "Distiller", "Sampler", "TrainResult", "train_m2iv", "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1
_TENSORS = ("mha", "mha_gates", "mlp", "mlp_gates")


@dataclass
class TrainConfig:
    """Every knob of a distillation run (saved in checkpoints and in the vectors' metadata)."""

    # task
    shots: int = 4
    pool_size: int | None = None  # None: the whole pool split
    # optimisation
    steps: int = 200
    batch_size: int = 8  # queries per micro-batch (global, over all ranks)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.05
    lr_scale: str | float = "auto"  # "auto" (residual-stream RMS) or a number
    gate_lr: float | None = None  # default: lr
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of steps (< 1) or a number of steps
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    # losses
    kl_weight: float = 1.0
    ce_weight: float = 1.0
    synergy_weight: float = 0.1
    synergy: str = "decorr"  # "decorr" | "align" | "both" | "none" (see losses.py)
    decorr_weight: float = 1.0  # weight of the decorrelation inside the synergy term
    temperature: float = 1.0
    # what is trained (baselines and ablations)
    train_mha: bool = True
    train_mlp: bool = True
    train_gates: bool = True
    layers: tuple[int, ...] | None = None  # None: every steerable layer
    positions: str = "all"  # steered tokens of the student ("all" or "text")
    backend: str = "auto"
    # mechanics
    seed: int = 0
    eval_every: int = 50  # 0: only at the end
    eval_queries: int = 64
    patience: int | None = None  # early stopping: evaluations without improvement
    min_delta: float = 0.0
    keep_best: bool | None = None  # None: True when early stopping (patience) is on
    checkpoint_path: str | None = None
    checkpoint_every: int = 0
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA for fp32 models), "bf16", "none"
    teacher_batch_size: int | None = None  # rows per teacher forward (default batch_size)
    log_path: str | None = None
    plot_path: str | None = None
    progress: bool = True
    task: str | None = None
    method: str = "m2iv"

    def __post_init__(self):
        if self.shots < 1:
            raise ValueError(f"shots must be >= 1 (the teacher needs demonstrations); got "
                             f"{self.shots}")
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps >= 0, batch_size >= 1 and grad_accum >= 1 are required")
        if self.synergy not in ("align", "decorr", "both", "none"):
            raise ValueError(f"synergy must be 'align', 'decorr', 'both' or 'none'; got "
                             f"{self.synergy!r}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none'; got {self.amp!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not (self.train_mha or self.train_mlp):
            raise ValueError("nothing to train: train_mha and train_mlp are both False")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        self.betas = tuple(self.betas)

    @property
    def uses_align(self) -> bool:
        return self.synergy_weight > 0 and self.synergy in ("align", "both")

    @property
    def uses_decorr(self) -> bool:
        return (self.synergy_weight > 0 and self.decorr_weight > 0
                and self.synergy in ("decorr", "both") and self.train_mha and self.train_mlp)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def losses_meta(self) -> dict:
        return {"kl_weight": self.kl_weight, "ce_weight": self.ce_weight,
                "synergy_weight": self.synergy_weight, "synergy": self.synergy,
                "decorr_weight": self.decorr_weight, "temperature": self.temperature}


@dataclass
class TrainResult:
    vectors: M2IV
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    steps: int = 0
    stopped_early: bool = False


def _seed_of(*parts) -> int:
    h = hashlib.sha256(("|".join(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class Sampler:
    """The run's data: the demonstration pool (``pool_size`` items of the pool split, a seeded
    subset), the training queries, the fixed evaluation queries and their demonstrations, and
    the per-step batches. Every draw is a pure function of ``(seed, step, micro-batch)``.
    """

    def __init__(self, data: TaskData, shots: int, pool_size: int | None = None,
                 batch_size: int = 8, grad_accum: int = 1, seed: int = 0,
                 eval_queries: int | None = 64):
        self.data, self.shots, self.seed = data, shots, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        pool = data.pool
        if pool_size is not None:
            if pool_size > len(pool):
                raise DataError(f"pool_size {pool_size} > the {len(pool)} items of the pool "
                                f"split of task {data.name!r}")
            g = torch.Generator().manual_seed(_seed_of(seed, "pool"))
            order = torch.randperm(len(pool), generator=g)[:pool_size].tolist()
            pool = [pool[i] for i in sorted(order)]
        if len(pool) < shots:
            raise DataError(f"the demonstration pool of task {data.name!r} has {len(pool)} "
                            f"items, fewer than shots={shots}")
        self.pool: list[Item] = pool
        self.train: list[Item] = data.train
        ev = data.eval
        if ev and eval_queries:
            g = torch.Generator().manual_seed(_seed_of(seed, "eval"))
            order = torch.randperm(len(ev), generator=g)[:eval_queries].tolist()
            ev = [ev[i] for i in sorted(order)]
        self.eval: list[Item] = ev
        self.eval_demos = self.demos(self.eval, shots, "evaldemos")

    def demos(self, queries: Sequence[Item], k: int, salt: str = "demos",
              keys: Sequence | None = None) -> list[list[Item]]:
        """``k`` distinct pool items per query (never the query itself). Query ``i`` draws from
        a generator seeded by ``(seed, salt, keys[i])`` (default ``keys[i] = i``), so a query's
        demonstrations do not depend on how the batch is split."""
        if k > len(self.pool):
            raise DataError(f"{k} demonstrations requested but the pool has {len(self.pool)}")
        keys = range(len(queries)) if keys is None else keys
        n = len(self.pool)
        out = []
        for q, key in zip(queries, keys):
            g = torch.Generator().manual_seed(_seed_of(self.seed, salt, key))
            perm = torch.randperm(n, generator=g)[:k + 1].tolist()
            out.append([self.pool[i] for i in perm if self.pool[i].id != q.id][:k])
        return out

    def queries(self, start: int, n: int) -> list[Item]:
        """Items ``start .. start + n`` of the training-query stream (a fresh seeded
        permutation of the train split per epoch)."""
        m = len(self.train)
        if m == 0:
            raise DataError(f"task {self.data.name!r} has no train items")
        out, perms = [], {}
        for p in range(start, start + n):
            epoch, j = divmod(p, m)
            if epoch not in perms:
                g = torch.Generator().manual_seed(_seed_of(self.seed, "epoch", epoch))
                perms[epoch] = torch.randperm(m, generator=g).tolist()
            out.append(self.train[perms[epoch][j]])
        return out

    def batch(self, step: int, micro: int) -> tuple[list[Item], list[list[Item]]]:
        """The global micro-batch ``micro`` of optimizer step ``step``: queries and their
        demonstrations."""
        start = (step * self.grad_accum + micro) * self.batch_size
        q = self.queries(start, self.batch_size)
        return q, self.demos(q, self.shots, "demos", range(start, start + self.batch_size))


class _Capture:
    """Forward hooks on decoder layers that keep their outputs at given positions only."""

    def __init__(self, layer_modules: Sequence[torch.nn.Module]):
        self.modules = list(layer_modules)
        self.positions: torch.Tensor | None = None  # [B, A]
        self.out: list[torch.Tensor | None] = [None] * len(self.modules)
        self._hooks = []

    def __enter__(self):
        for i, m in enumerate(self.modules):
            self._hooks.append(m.register_forward_hook(self._make(i)))
        return self

    def _make(self, i):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            pos = self.positions.to(h.device)
            idx = pos[..., None].expand(*pos.shape, h.shape[-1])
            self.out[i] = torch.gather(h, 1, idx)  # [B, A, D]
        return hook

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def stacked(self) -> torch.Tensor:
        if any(o is None for o in self.out):
            raise RuntimeError("a decoder layer did not run: cannot capture its output")
        return torch.stack(self.out, 1)  # [B, L, A, D]


class Distiller:
    """One distillation run: owns the frozen model's patch, the trainable vectors, the
    optimizer and the teacher cache. Use :meth:`train`, or :func:`train_m2iv`.

    Args:
        model: a supported Hugging Face LVLM (or the digits testbed), any device/dtype.
        data: a :class:`~m2iv.data.TaskData` or anything :func:`m2iv.data.load_task` accepts;
            needs ``pool`` and ``train`` items (and ``eval`` for evaluation).
        builder: the :class:`~m2iv.prompts.PromptBuilder` (default: from ``processor``).
        config: :class:`TrainConfig` (keyword overrides are applied on top).
        init: initial vectors (default zeros, gates one).
        dist: a :class:`~m2iv.train.distributed.DistContext` (default: single process).
    """

    def __init__(self, model, data, builder: PromptBuilder | None = None,
                 config: TrainConfig | None = None, *, processor=None, init: M2IV | None = None,
                 dist: ddp.DistContext | None = None, cache: TeacherCache | None = None,
                 **overrides):
        cfg = copy.deepcopy(config) if config is not None else TrainConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown TrainConfig field {k!r}")
            setattr(cfg, k, v)
        cfg.__post_init__()
        self.cfg = cfg
        self.dist = dist or ddp.SINGLE
        self.model = model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.device = _model_device(model)
        self.info = describe(model)
        self.builder = builder or make_prompt_builder(model, processor)
        self.data: TaskData = load_task(data)
        self.data.require_splits("pool", "train")
        self.task = cfg.task or self.data.name
        self.sampler = Sampler(self.data, cfg.shots, cfg.pool_size, cfg.batch_size,
                               cfg.grad_accum, cfg.seed, cfg.eval_queries)
        self._eval_demos = self.sampler.eval_demos
        self.cache = cache or TeacherCache(cfg.cache_dir, dtype=getattr(torch, cfg.cache_dtype))
        self._eval_cache = TeacherCache(cfg.cache_dir, dtype=self.cache.dtype, memory=True)
        self._model_fp = model_fingerprint(model)
        self._builder_fp = self.builder.fingerprint()
        self._use_amp = (cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda"
                                               and _model_dtype(model) == torch.float32))
        self._logits_kw = "logits_to_keep" in inspect.signature(type(model).forward).parameters

        # vectors: fp32 leaf tensors on the model's (first) device
        layers = cfg.layers if cfg.layers is not None else self.info.steerable_layers
        base = (init.detach().clone().to(self.device, torch.float32) if init is not None
                else M2IV.zeros_like(model, layers, device=self.device))
        if init is not None and cfg.layers is not None and tuple(init.layers) != tuple(layers):
            raise ValueError(f"init covers layers {list(init.layers)} but config.layers is "
                             f"{list(layers)}")
        self.layers = tuple(base.layers)
        meta = dict(base.meta)
        self.params: dict[str, torch.Tensor] = {}
        for name in _TENSORS:
            t = getattr(base, name).detach().clone().float()
            if name == "mha" and not cfg.train_mha:
                t.zero_()
            if name == "mlp" and not cfg.train_mlp:
                t.zero_()
            trainable = ((name == "mha" and cfg.train_mha) or (name == "mlp" and cfg.train_mlp)
                         or (name == "mha_gates" and cfg.train_mha and cfg.train_gates)
                         or (name == "mlp_gates" and cfg.train_mlp and cfg.train_gates))
            self.params[name] = t.requires_grad_(trainable)
        self._base_meta = meta
        self.vectors = M2IV(*(self.params[n] for n in _TENSORS), self.layers, meta,
                            check_finite=False)
        self.handle = patch_model(model, self.vectors, positions=cfg.positions,
                                  backend=cfg.backend)
        self._layer_modules = [self.info.layers[i] for i in self.layers]
        self._o_proj_w = [self.info.layer(i).o_proj.weight for i in self.layers]

        self.scales: dict[str, float] | None = None
        self.step = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.optimizer = None
        self.scheduler = None
        self._t0 = time.time()

    # ------------------------------------------------------------------ data
    @property
    def pool(self) -> list[Item]:
        return self.sampler.pool

    @property
    def train_items(self) -> list[Item]:
        return self.sampler.train

    @property
    def eval_items(self) -> list[Item]:
        return self.sampler.eval

    def sample_batch(self, step: int, micro: int):
        return self.sampler.batch(step, micro)

    # ------------------------------------------------------------------ forwards
    def _autocast(self):
        if self._use_amp and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, enc: EncodedBatch, capture: bool):
        """Logits ``[B, A, V]`` at the answer positions and (``capture``) the steered layers'
        outputs there ``[B, L, A, D]``."""
        enc = enc.to(self.device, _model_dtype(self.model))
        pos = enc.answer_positions
        kw = {}
        if self._logits_kw:
            keep, inverse = torch.unique(pos, return_inverse=True)
            kw["logits_to_keep"] = keep
        with contextlib.ExitStack() as stack:
            cap = stack.enter_context(_Capture(self._layer_modules)) if capture else None
            if cap is not None:
                cap.positions = pos
            with self._autocast():
                out = self.model(**enc.inputs, use_cache=False, **kw)
            logits = out.logits
            if self._logits_kw:
                if logits.shape[1] != keep.numel():
                    raise RuntimeError("the model ignored logits_to_keep")
                idx = inverse
            else:
                idx = pos
            ix = idx[..., None].expand(*idx.shape, logits.shape[-1])
            ans_logits = torch.gather(logits, 1, ix)
            hidden = cap.stacked() if cap is not None else None
        return ans_logits, hidden

    @torch.no_grad()
    def teacher(self, queries: Sequence[Item], demos: Sequence[Sequence[Item]],
                need_hidden: bool, cache: TeacherCache | None = None) -> dict[str, torch.Tensor]:
        """Teacher outputs for the rows (from the cache where possible), padded:
        ``logits [B, A, V]``, ``answer_ids [B, A]``, ``mask [B, A]``, ``hidden [B, L, A, D]``."""
        cache = cache or self.cache
        keys = [prompt_key(self._model_fp, self._builder_fp, d, q) for q, d in zip(queries, demos)]
        layers = self.layers if need_hidden else None
        entries: list[dict | None] = [cache.get(k, layers) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            tb = self.cfg.teacher_batch_size or self.cfg.batch_size
            old = self.handle.strength
            self.handle.set_strength(0.0)  # the unsteered model
            try:
                for s in range(0, len(missing), tb):
                    rows = missing[s:s + tb]
                    enc = self.builder.encode([queries[i] for i in rows],
                                              [demos[i] for i in rows], with_answer=True)
                    logits, hidden = self._forward(enc, capture=need_hidden)
                    for r, i in enumerate(rows):
                        n = int(enc.answer_mask[r].sum())
                        e = {"logits": logits[r, :n], "answer_ids": enc.answer_ids[r, :n]}
                        if need_hidden:
                            e["hidden"] = hidden[r, :, :n]
                            e["hidden_layers"] = torch.tensor(self.layers, dtype=torch.long)
                        entries[i] = cache.put(keys[i], e)
            finally:
                self.handle.set_strength(old)
        return self._stack(entries, need_hidden)

    def _stack(self, entries: list[dict], need_hidden: bool) -> dict[str, torch.Tensor]:
        B = len(entries)
        A = max(e["answer_ids"].numel() for e in entries)
        V = entries[0]["logits"].shape[-1]
        logits = torch.zeros(B, A, V)
        ids = torch.full((B, A), -100, dtype=torch.long)
        hidden = None
        if need_hidden:
            D = entries[0]["hidden"].shape[-1]
            hidden = torch.zeros(B, len(self.layers), A, D)
        for b, e in enumerate(entries):
            n = e["answer_ids"].numel()
            logits[b, :n] = e["logits"].float()
            ids[b, :n] = e["answer_ids"]
            if need_hidden:
                have = e["hidden_layers"].tolist()
                sel = torch.tensor([have.index(i) for i in self.layers])
                hidden[b, :, :n] = e["hidden"][sel].float()
        out = {"logits": logits.to(self.device), "answer_ids": ids.to(self.device),
               "mask": (ids != -100).to(self.device)}
        if hidden is not None:
            out["hidden"] = hidden.to(self.device)
        return out

    def student(self, queries: Sequence[Item], capture: bool):
        """The steered zero-shot forward (gradients flow to the vectors)."""
        enc = self.builder.encode(list(queries), None, with_answer=True)
        logits, hidden = self._forward(enc, capture=capture)
        return enc, logits, hidden

    # ------------------------------------------------------------------ losses
    def _check_answers(self, enc: EncodedBatch, t: dict, queries) -> None:
        s_ids = enc.answer_ids.to(self.device)
        A = t["answer_ids"].shape[1]
        if s_ids.shape[1] != A or not torch.equal(s_ids, t["answer_ids"]):
            bad = [q.where() for b, q in enumerate(queries)
                   if not torch.equal(s_ids[b][s_ids[b] != -100].cpu(),
                                      t["answer_ids"][b][t["answer_ids"][b] != -100].cpu())]
            raise RuntimeError(f"the answer tokens differ between the k-shot and the zero-shot "
                               f"prompt for {bad[:5]}: the prompt format tokenizes the answer "
                               "differently after demonstrations")

    def batch_losses(self, queries, demos, n_global: int, train: bool = True) -> dict:
        """Loss terms of one (local) micro-batch; returns float sums and the loss tensor."""
        cfg = self.cfg
        need_h = cfg.uses_align
        t = self.teacher(queries, demos, need_h)
        enc, s_logits, s_hidden = self.student(queries, capture=need_h)
        self._check_answers(enc, t, queries)
        mask = t["mask"]
        kl = mimicry_kl(s_logits, t["logits"], mask, cfg.temperature)
        ce = answer_ce(s_logits, t["answer_ids"], mask)
        loss = (cfg.kl_weight * kl + cfg.ce_weight * ce) / n_global
        out = {"kl": float(kl.detach()), "ce": float(ce.detach()), "n": len(queries)}
        if need_h:
            al = hidden_alignment(s_hidden, t["hidden"], mask)
            loss = loss + cfg.synergy_weight * al / n_global
            out["align"] = float(al.detach())
        if cfg.uses_decorr and train:
            dec = branch_decorrelation(self.params["mha"], self.params["mha_gates"],
                                       self.params["mlp"], self.params["mlp_gates"],
                                       self._o_proj_w)
            share = len(queries) / n_global
            loss = loss + cfg.synergy_weight * cfg.decorr_weight * dec * share
            out["decorr"] = float(dec.detach()) * len(queries)
        out["loss_tensor"] = loss
        return out

    # ------------------------------------------------------------------ optimisation
    def _calibrate(self) -> dict[str, float]:
        cfg = self.cfg
        if not isinstance(cfg.lr_scale, str):
            s = float(cfg.lr_scale)
            return {"mlp": s, "mha": s}
        # a fixed set (the first 16 queries of the stream), whatever the batch split
        queries = self.sampler.queries(0, min(16, max(len(self.train_items), 1)))
        lo, hi = ddp.shard_bounds(len(queries), self.dist.rank, self.dist.world_size)
        local = queries[lo:hi]
        sq, cnt = 0.0, 0.0
        if local:
            old = self.handle.strength
            self.handle.set_strength(0.0)
            try:
                with torch.no_grad():
                    enc = self.builder.encode(local, None, with_answer=True)
                    _, h = self._forward(enc, capture=True)  # [B, L, A, D]
                m = enc.answer_mask.to(h.device)[:, None, :, None].float()
                sq = float((h.float().pow(2) * m).sum())
                cnt = float(m.sum()) * h.shape[1] * h.shape[-1]
            finally:
                self.handle.set_strength(old)
        tot = self.dist.sum_floats({"sq": sq, "cnt": cnt})
        rms = math.sqrt(tot["sq"] / max(tot["cnt"], 1.0)) or 1.0
        gain = sum(self.info.o_proj_gain(i) for i in self.layers) / len(self.layers)
        return {"mlp": rms, "mha": rms / max(gain, 1e-6)}

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        if self.scales is None:
            self.scales = self._calibrate()
        gate_lr = cfg.gate_lr if cfg.gate_lr is not None else cfg.lr
        groups = []
        for name, lr, wd in (("mha", cfg.lr * self.scales["mha"], cfg.weight_decay),
                             ("mlp", cfg.lr * self.scales["mlp"], cfg.weight_decay),
                             ("mha_gates", gate_lr, 0.0), ("mlp_gates", gate_lr, 0.0)):
            p = self.params[name]
            if p.requires_grad:
                groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": name})
        self.optimizer = torch.optim.AdamW(groups, betas=cfg.betas)
        warm = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * cfg.steps
        warm = int(round(warm))
        total = max(cfg.steps, 1)
        mn = cfg.min_lr_ratio

        def factor(s: int) -> float:
            if warm > 0 and s < warm:
                return (s + 1) / warm
            t = min(max((s - warm) / max(total - warm, 1), 0.0), 1.0)
            return mn + (1.0 - mn) * 0.5 * (1.0 + math.cos(math.pi * t))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.params.values() if p.requires_grad]

    def train_step(self) -> dict:
        """One optimizer step (all micro-batches); returns the logged record."""
        cfg = self.cfg
        if self.optimizer is None:
            self._build_optimizer()
        self.optimizer.zero_grad(set_to_none=False)
        n_global = cfg.batch_size * cfg.grad_accum
        sums = {"kl": 0.0, "ce": 0.0, "align": 0.0, "decorr": 0.0, "n": 0.0}
        for micro in range(cfg.grad_accum):
            queries, demos = self.sample_batch(self.step, micro)
            lo, hi = ddp.shard_bounds(len(queries), self.dist.rank, self.dist.world_size)
            if hi <= lo:
                continue
            r = self.batch_losses(queries[lo:hi], demos[lo:hi], n_global)
            r.pop("loss_tensor").backward()
            for k in sums:
                sums[k] += r.get(k, 0.0)
        params = self._trainable()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.dist.all_reduce_sum_([p.grad for p in params])
        sums = self.dist.sum_floats(sums)
        gnorm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        n = max(sums["n"], 1.0)
        rec = {"step": self.step, "kl": sums["kl"] / n, "ce": sums["ce"] / n,
               "grad_norm": float(gnorm), "lr": lrs.get("mlp", lrs.get("mha")),
               "time": round(time.time() - self._t0, 3)}
        if cfg.uses_align:
            rec["align"] = sums["align"] / n
        if cfg.uses_decorr:
            rec["decorr"] = sums["decorr"] / n
        rec["loss"] = (cfg.kl_weight * rec["kl"] + cfg.ce_weight * rec["ce"]
                       + cfg.synergy_weight * (rec.get("align", 0.0)
                                               + cfg.decorr_weight * rec.get("decorr", 0.0)))
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, vectors: M2IV | None | str = "current", items=None, demos=None,
                 strength: float = 1.0) -> dict[str, float]:
        """Held-out teacher-student divergence: mean KL(teacher || student), CE and top-1
        agreement of the first answer token with the answer, over the evaluation queries
        (fixed demonstrations; teacher outputs kept in memory).

        ``vectors``: ``"current"`` (the trained ones), ``None`` (no steering = zero vectors),
        or any :class:`~m2iv.M2IV` fitting the model (e.g. a baseline).
        """
        items = self.eval_items if items is None else items
        demos = self._eval_demos if demos is None else demos
        if not items:
            raise DataError(f"task {self.data.name!r} has no eval items to evaluate on")
        old_v, old_s = self.handle.vectors, self.handle.strength
        if isinstance(vectors, M2IV):
            self.handle.set_vectors(vectors.to(self.device))
        self.handle.set_strength(0.0 if vectors is None else strength)
        try:
            lo, hi = ddp.shard_bounds(len(items), self.dist.rank, self.dist.world_size)
            sums = {"kl": 0.0, "ce": 0.0, "top1": 0.0, "n": 0.0}
            bs = self.cfg.teacher_batch_size or self.cfg.batch_size
            for s in range(lo, hi, bs):
                q = items[s:min(s + bs, hi)]
                d = demos[s:min(s + bs, hi)]
                t = self.teacher(q, d, False, cache=self._eval_cache)
                enc = self.builder.encode(q, None, with_answer=True)
                logits, _ = self._forward(enc, capture=False)
                self._check_answers(enc, t, q)
                sums["kl"] += float(mimicry_kl(logits, t["logits"], t["mask"],
                                               self.cfg.temperature))
                sums["ce"] += float(answer_ce(logits, t["answer_ids"], t["mask"]))
                sums["top1"] += float((logits[:, 0].argmax(-1) == t["answer_ids"][:, 0]).sum())
                sums["n"] += len(q)
            sums = self.dist.sum_floats(sums)
        finally:
            if isinstance(vectors, M2IV):
                self.handle.set_vectors(old_v)
            self.handle.set_strength(old_s)
        n = max(sums["n"], 1.0)
        return {"kl": sums["kl"] / n, "ce": sums["ce"] / n, "top1": sums["top1"] / n}

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run (or continue, after :meth:`load_checkpoint`) to ``config.steps``."""
        cfg = self.cfg
        if self.optimizer is None:
            self._build_optimizer()
        bar = None
        if cfg.progress and self.dist.is_main and cfg.steps > self.step:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"m2iv train {self.task}",
                       dynamic_ncols=True)
        try:
            while self.step < cfg.steps and not self.stopped_early:
                rec = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.eval_items:
                    self._periodic_eval()
                if (cfg.checkpoint_path and cfg.checkpoint_every
                        and self.step % cfg.checkpoint_every == 0):
                    self.save_checkpoint(cfg.checkpoint_path)
        finally:
            if bar is not None:
                bar.close()
        if self.eval_items and (not self.history or "eval_kl" not in self.history[-1]):
            if not self.stopped_early:
                self._periodic_eval()
        if cfg.checkpoint_path:
            self.save_checkpoint(cfg.checkpoint_path)
        return self.result()

    def _periodic_eval(self) -> None:
        ev = self.evaluate()
        rec = self.history[-1] if self.history else {"step": self.step}
        if not self.history:
            self.history.append(rec)
        rec.update({"eval_kl": ev["kl"], "eval_ce": ev["ce"], "eval_top1": ev["top1"]})
        if self.best is None or ev["kl"] < self.best["eval_kl"] - self.cfg.min_delta:
            self.best = {"step": self.step, "eval_kl": ev["kl"],
                         "vectors": {k: v.detach().clone() for k, v in self.params.items()}}
            self.bad_evals = 0
        else:
            self.bad_evals += 1
            if self.cfg.patience is not None and self.bad_evals >= self.cfg.patience:
                self.stopped_early = True
        self.write_logs()

    def current_vectors(self, best: bool | None = None) -> M2IV:
        """A detached copy of the vectors: the last ones, or the best evaluated ones if
        ``keep_best`` (by default only with early stopping; the selection uses the eval queries,
        so the reported eval metrics are then slightly optimistic)."""
        keep = self.cfg.keep_best
        if keep is None:
            keep = self.cfg.patience is not None
        use_best = keep if best is None else best
        src = self.best["vectors"] if (use_best and self.best is not None) else self.params
        meta = dict(self._base_meta)
        meta.update(task=self.task, shots=self.cfg.shots, pool_size=len(self.pool),
                    method=self.cfg.method, losses=self.cfg.losses_meta())
        return M2IV(*(src[n].detach().clone().cpu() for n in _TENSORS), self.layers, meta)

    def result(self) -> TrainResult:
        v = self.current_vectors()
        metrics: dict[str, Any] = {}
        if self.eval_items:
            final = self.evaluate(v)
            zero = self.evaluate(None)
            metrics = {"eval_kl": final["kl"], "eval_ce": final["ce"],
                       "eval_top1": final["top1"], "zero_kl": zero["kl"],
                       "zero_ce": zero["ce"], "zero_top1": zero["top1"],
                       "kl_reduction": 1.0 - final["kl"] / zero["kl"] if zero["kl"] > 0 else 0.0,
                       "eval_queries": len(self.eval_items)}
        metrics.update(steps=self.step, stopped_early=self.stopped_early,
                       best_step=self.best["step"] if self.best else None,
                       teacher_cache=self.cache.stats(), world_size=self.dist.world_size)
        v.meta["metrics"] = metrics
        v.meta["training"] = {k: val for k, val in self.cfg.to_dict().items()
                              if k not in ("log_path", "plot_path", "checkpoint_path",
                                           "cache_dir", "progress")}
        v.meta["training"]["lr_scales"] = self.scales
        v.meta.setdefault("description", "")
        if not v.meta["description"]:
            v.meta["description"] = (f"{self.cfg.method} distilled from {self.cfg.shots}-shot ICL "
                                     f"on {self.task} (pool {len(self.pool)})")
        self.write_logs(final=metrics)
        return TrainResult(v, list(self.history), metrics, self.step, self.stopped_early)

    # ------------------------------------------------------------------ logs
    def write_logs(self, final: dict | None = None) -> None:
        cfg = self.cfg
        if not self.dist.is_main:
            return
        if cfg.log_path:
            doc = {"task": self.task, "config": cfg.to_dict(), "lr_scales": self.scales,
                   "history": self.history}
            if final is not None:
                doc["final"] = final
            atomic_write(cfg.log_path, json.dumps(doc, indent=1).encode())
        if cfg.plot_path and (final is not None or self.history):
            plot_history(self.history, cfg.plot_path, title=f"{cfg.method} on {self.task}")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "layers": list(self.layers),
            "vectors": {k: v.detach().clone().cpu() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scales": self.scales,
            "history": self.history,
            "best": None if self.best is None else {
                "step": self.best["step"], "eval_kl": self.best["eval_kl"],
                "vectors": {k: v.cpu() for k, v in self.best["vectors"].items()}},
            "bad_evals": self.bad_evals,
            "stopped_early": self.stopped_early,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python": list(random.getstate()[1])},
            "model_fingerprint": self._model_fp,
        }

    def save_checkpoint(self, path: str) -> None:
        """Everything needed to continue exactly: vectors, optimizer, scheduler, step, RNG
        states, history and the early-stopping state (rank 0 writes)."""
        if self.dist.is_main:
            buf = __import__("io").BytesIO()
            torch.save(self.state_dict(), buf)
            atomic_write(path, buf.getvalue())
        self.dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        st = torch.load(path, map_location="cpu", weights_only=True)
        if st.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: unsupported checkpoint version {st.get('version')!r}")
        if tuple(st["layers"]) != self.layers:
            raise ValueError(f"{path}: the checkpoint covers layers {st['layers']} but this run "
                             f"steers {list(self.layers)}")
        if st.get("model_fingerprint") != self._model_fp:
            raise ValueError(f"{path}: the checkpoint was made with a different model")
        with torch.no_grad():
            for k, v in st["vectors"].items():
                self.params[k].copy_(v.to(self.params[k].device))
        self.scales = st["scales"]
        self.step = int(st["step"])
        self._build_optimizer()
        if st["optimizer"] is not None:
            self.optimizer.load_state_dict(st["optimizer"])
        if st["scheduler"] is not None:
            self.scheduler.load_state_dict(st["scheduler"])
        self.history = list(st["history"])
        b = st["best"]
        self.best = None if b is None else {
            "step": b["step"], "eval_kl": b["eval_kl"],
            "vectors": {k: v.to(self.device) for k, v in b["vectors"].items()}}
        self.bad_evals = int(st["bad_evals"])
        self.stopped_early = bool(st["stopped_early"])
        torch.set_rng_state(st["rng"]["torch"])
        if st["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        state = random.getstate()
        random.setstate((state[0], tuple(st["rng"]["python"]), state[2]))

    def close(self) -> None:
        """Remove the patch from the model."""
        self.handle.remove()


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """The loss curve (training loss terms per step, held-out KL per evaluation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in history if "loss" in r]
    for key, style in (("loss", "-"), ("kl", "-"), ("ce", "--"), ("align", ":")):
        ys = [r[key] for r in history if "loss" in r and key in r]
        if ys and len(ys) == len(steps):
            ax.plot(steps, ys, style, label=f"train {key}", linewidth=1)
    ev = [(r["step"], r["eval_kl"]) for r in history if "eval_kl" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out KL", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def train_m2iv(model, data, builder: PromptBuilder | None = None,
               config: TrainConfig | None = None, *, processor=None, init: M2IV | None = None,
               resume: str | None = None, dist: ddp.DistContext | None = None,
               **overrides) -> TrainResult:
    """Train M2IV vectors for ``model`` on ``data`` (see :class:`Distiller`); returns a
    :class:`TrainResult` whose ``vectors`` carry the full metadata. The model is left
    unpatched."""
    d = Distiller(model, data, builder, config, processor=processor, init=init, dist=dist,
                  **overrides)
    try:
        if resume and os.path.exists(resume):
            d.load_checkpoint(resume)
        return d.train()
    finally:
        d.close()
