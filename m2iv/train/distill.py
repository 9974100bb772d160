"""Distil k-shot multimodal in-context learning into M2IV vectors: the training loop.

The model is frozen. Each optimizer step:

1. takes ``batch_size * grad_accum`` training queries from the seeded stream
   (:class:`~m2iv.train.sampling.Sampler`);
2. gets each query's teacher target (:class:`~m2iv.train.teacher.Teacher`): the mean of the
   model's k-shot answer distributions over ``teacher_sets`` demonstration sets from the pool,
   computed once per query (batched forwards, disk cache, memo);
3. runs the student, the same model on the zero-shot prompt, steered by the trainable vectors
   through :func:`m2iv.patch_model` (the fused kernels' autograd carries the gradients to the
   vectors and gates: there is no separate slow path);
4. minimises ``kl_weight * KL + ce_weight * CE + synergy_weight * synergy`` (see
   :mod:`m2iv.train.losses`) with AdamW, gradient clipping and accumulation;
5. every ``eval_every`` steps measures the KL to the teacher on validation queries held out of
   the train split and applies the plateau rule (:mod:`m2iv.train.stopping`): decay the
   learning rate, then stop, keeping the best vectors.

Learning rates are relative: with ``lr_scale="auto"`` the MLP vectors' learning rate is
``lr * r`` where ``r`` is the RMS of the steered layers' outputs at the answer positions
(measured once on the first 16 queries, averaged over ranks), and the MHA vectors' is
``lr * r / g`` with ``g`` the mean gain of o_proj; gates use ``lr`` itself (they are O(1)).
So one ``lr`` works across model sizes.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .._atomic import atomic_write
from ..data import DataError, Item, TaskData, load_task
from ..families import describe, module_device
from ..patch import patch_model
from ..prompts import PromptBuilder, make_prompt_builder
from ..vectors import M2IV
from . import checkpoint
from . import distributed as ddp
from .config import TrainConfig, TrainResult
from .forward import AnswerForward
from .losses import answer_ce, branch_decorrelation, hidden_alignment, mimicry_kl
from .plots import plot_history
from .sampling import Sampler
from .stopping import PlateauRule, lr_factor
from .teacher import Teacher, unsteered
from .teacher_cache import TeacherCache, model_fingerprint

__all__ = ["Distiller", "train_m2iv", "TENSORS"]

TENSORS = ("mha", "mha_gates", "mlp", "mlp_gates")


class Distiller:
    """One distillation run: owns the frozen model's patch, the trainable vectors, the
    optimizer and the teacher. Use :meth:`train`, or :func:`train_m2iv`.

    Args:
        model: a supported Hugging Face LVLM (or the digits testbed), any device/dtype.
        data: a :class:`~m2iv.data.TaskData` or anything :func:`m2iv.data.load_task` accepts;
            needs ``pool`` and ``train`` items (and ``eval`` for the final metrics).
        builder: the :class:`~m2iv.prompts.PromptBuilder` (default: from ``processor``).
        config: :class:`~m2iv.train.config.TrainConfig` (keyword overrides are applied on top).
        init: initial vectors (default zeros, gates one).
        dist: a :class:`~m2iv.train.distributed.DistContext` (default: single process).
        cache: a :class:`~m2iv.train.teacher_cache.TeacherCache` to share between runs
            (default: one on ``config.cache_dir``).
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
        self.device = module_device(model)
        self.info = describe(model)
        self.builder = builder or make_prompt_builder(model, processor)
        self.data: TaskData = load_task(data)
        self.data.require_splits("pool", "train")
        self.task = cfg.task or self.data.name
        self.sampler = Sampler(self.data, cfg.shots, cfg.pool_size, cfg.batch_size,
                               cfg.grad_accum, cfg.seed, cfg.eval_queries,
                               cfg.val_queries if cfg.validates else 0)

        # vectors: fp32 leaf tensors on the model's (first) device
        layers = cfg.layers if cfg.layers is not None else self.info.steerable_layers
        if init is not None and cfg.layers is not None and tuple(init.layers) != tuple(layers):
            raise ValueError(f"init covers layers {list(init.layers)} but config.layers is "
                             f"{list(layers)}")
        base = (init.detach().clone().to(self.device, torch.float32) if init is not None
                else M2IV.zeros_like(model, layers, device=self.device))
        self.layers = tuple(base.layers)
        self.params: dict[str, torch.Tensor] = {}
        for name in TENSORS:
            t = getattr(base, name).detach().clone().float()
            if (name == "mha" and not cfg.train_mha) or (name == "mlp" and not cfg.train_mlp):
                t.zero_()
            branch = "mha" if name.startswith("mha") else "mlp"
            on = cfg.train_mha if branch == "mha" else cfg.train_mlp
            self.params[name] = t.requires_grad_(on and (name == branch or cfg.train_gates))
        self._base_meta = dict(base.meta)
        self.vectors = M2IV(*(self.params[n] for n in TENSORS), self.layers, self._base_meta,
                            check_finite=False)
        self._o_proj_w = [self.info.layer(i).o_proj.weight for i in self.layers]
        self.forward = AnswerForward(model, [self.info.layers[i] for i in self.layers],
                                     cfg.amp)
        self.cache = cache or TeacherCache(cfg.cache_dir, dtype=getattr(torch, cfg.cache_dtype))
        self.teacher = Teacher(
            self.forward, lambda: unsteered(self.handle), self.builder, self.sampler,
            sets=cfg.teacher_sets, temperature=cfg.temperature,
            batch_size=cfg.teacher_batch_size or cfg.batch_size, cache=self.cache,
            model_fp=model_fingerprint(model), builder_fp=self.builder.fingerprint(),
            layers=self.layers)
        # last: nothing after this can fail and leave the model patched
        self.handle = patch_model(model, self.vectors, positions=cfg.positions,
                                  backend=cfg.backend)

        self.scales: dict[str, float] | None = None
        self.step = 0
        self.history: list[dict] = []
        # the plateau rule needs validation queries (none when the train split has < 4 items)
        self.validating = cfg.validates and bool(self.val_items)
        self.plateau = PlateauRule(cfg.patience if self.validating else None, cfg.min_delta,
                                   cfg.plateau_decays if cfg.schedule == "plateau" else 0,
                                   cfg.plateau_decay)
        self.stop_reason = ""
        self.optimizer: torch.optim.Optimizer | None = None
        self._base_lrs: dict[str, float] = {}
        self._clock = {"teacher": 0.0, "student": 0.0, "eval": 0.0}

    # ------------------------------------------------------------------ data
    @property
    def pool(self) -> list[Item]:
        return self.sampler.pool

    @property
    def train_items(self) -> list[Item]:
        return self.sampler.train

    @property
    def val_items(self) -> list[Item]:
        return self.sampler.val

    @property
    def eval_items(self) -> list[Item]:
        return self.sampler.eval

    def sample_batch(self, step: int, micro: int) -> list[Item]:
        return self.sampler.batch(step, micro)

    # ------------------------------------------------------------------ losses
    def student(self, queries: Sequence[Item], capture: bool):
        """The steered zero-shot forward (gradients flow to the vectors)."""
        enc = self.builder.encode(list(queries), None, with_answer=True)
        logits, hidden = self.forward(enc, capture=capture)
        return enc, logits, hidden

    def _targets(self, queries, need_hidden: bool) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        t = self.teacher.targets(queries, need_hidden)
        self._clock["teacher"] += time.perf_counter() - t0
        return t

    def _check_answers(self, enc, t: dict, queries) -> None:
        s_ids = enc.answer_ids.to(self.device)
        if s_ids.shape != t["answer_ids"].shape or not torch.equal(s_ids, t["answer_ids"]):
            bad = [q.where() for b, q in enumerate(queries)
                   if not torch.equal(s_ids[b][s_ids[b] != -100].cpu(),
                                      t["answer_ids"][b][t["answer_ids"][b] != -100].cpu())]
            raise RuntimeError(f"the answer tokens differ between the k-shot and the zero-shot "
                               f"prompt for {bad[:5]}: the prompt format tokenizes the answer "
                               "differently after demonstrations")

    def batch_losses(self, queries: Sequence[Item], n_global: int, train: bool = True) -> dict:
        """Loss terms of one (local) micro-batch; returns float sums and the loss tensor."""
        cfg = self.cfg
        need_h = cfg.uses_align
        t = self._targets(queries, need_h)
        t0 = time.perf_counter()
        enc, s_logits, s_hidden = self.student(queries, capture=need_h)
        self._check_answers(enc, t, queries)
        mask = t["mask"]
        kl = mimicry_kl(s_logits, t["logp"], mask, cfg.temperature)
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
        self._clock["student"] += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ optimisation
    def _calibrate(self) -> dict[str, float]:
        cfg = self.cfg
        if not isinstance(cfg.lr_scale, str):
            return {"mlp": float(cfg.lr_scale), "mha": float(cfg.lr_scale)}
        # a fixed set (the first 16 queries of the stream), whatever the batch split
        queries = self.sampler.queries(0, min(16, max(len(self.train_items), 1)))
        lo, hi = ddp.shard_bounds(len(queries), self.dist.rank, self.dist.world_size)
        with unsteered(self.handle):
            sq, cnt = self.forward.answer_square_sum(self.builder, queries[lo:hi])
        tot = self.dist.sum_floats({"sq": sq, "cnt": cnt})
        rms = math.sqrt(tot["sq"] / max(tot["cnt"], 1.0)) or 1.0
        gain = sum(self.info.o_proj_gain(i) for i in self.layers) / len(self.layers)
        return {"mlp": rms, "mha": rms / max(gain, 1e-6)}

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        if self.scales is None:
            self.scales = self._calibrate()
        gate_lr = cfg.gate_lr if cfg.gate_lr is not None else cfg.lr
        self._base_lrs = {"mha": cfg.lr * self.scales["mha"], "mlp": cfg.lr * self.scales["mlp"],
                          "mha_gates": gate_lr, "mlp_gates": gate_lr}
        groups = [{"params": [self.params[n]], "lr": lr, "name": n,
                   "weight_decay": 0.0 if n.endswith("gates") else cfg.weight_decay}
                  for n, lr in self._base_lrs.items() if self.params[n].requires_grad]
        self.optimizer = torch.optim.AdamW(groups, betas=cfg.betas)

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at ``step`` (warm-up, schedule, plateau decays)."""
        cfg = self.cfg
        warm = int(round(cfg.warmup if cfg.warmup >= 1 else cfg.warmup * cfg.steps))
        return lr_factor(step, warmup=warm, schedule=cfg.schedule, total=max(cfg.steps, 1),
                         decay_mult=self.plateau.lr_mult, min_ratio=cfg.min_lr_ratio)

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
            queries = self.sample_batch(self.step, micro)
            lo, hi = ddp.shard_bounds(len(queries), self.dist.rank, self.dist.world_size)
            if hi <= lo:
                continue
            r = self.batch_losses(queries[lo:hi], n_global)
            t0 = time.perf_counter()
            r.pop("loss_tensor").backward()
            self._clock["student"] += time.perf_counter() - t0
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
        f = self.lr_factor(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = self._base_lrs[g["name"]] * f
        n = max(sums["n"], 1.0)
        rec = {"step": self.step + 1, "kl": sums["kl"] / n, "ce": sums["ce"] / n,
               "grad_norm": float(gnorm), "lr": cfg.lr * f,
               "time": round(sum(self._clock.values()), 3)}
        if cfg.uses_align:
            rec["align"] = sums["align"] / n
        if cfg.uses_decorr:
            rec["decorr"] = sums["decorr"] / n
        rec["loss"] = (cfg.kl_weight * rec["kl"] + cfg.ce_weight * rec["ce"]
                       + cfg.synergy_weight * (rec.get("align", 0.0)
                                               + cfg.decorr_weight * rec.get("decorr", 0.0)))
        with checkpoint.deferred_interrupt():  # the update, its step and its record go together
            self.optimizer.step()
            self.step += 1
            self.history.append(rec)
        return rec

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, vectors: M2IV | None | str = "current",
                 items: Sequence[Item] | None = None, strength: float = 1.0) -> dict[str, float]:
        """Mean KL(teacher || student), CE and top-1 (first answer token == answer) over
        ``items`` (default: the evaluation queries), against the same averaged teacher as
        training.

        ``vectors``: ``"current"`` (the trained ones), ``None`` (no steering = zero vectors),
        or any :class:`~m2iv.M2IV` fitting the model (e.g. a baseline).
        """
        items = self.eval_items if items is None else list(items)
        if not items:
            raise DataError(f"task {self.data.name!r} has no eval items to evaluate on")
        old_v, old_s = self.handle.vectors, self.handle.strength
        if isinstance(vectors, M2IV):
            self.handle.set_vectors(vectors.to(self.device))
        self.handle.set_strength(0.0 if vectors is None else strength)
        try:
            lo, hi = ddp.shard_bounds(len(items), self.dist.rank, self.dist.world_size)
            sums = {"kl": 0.0, "ce": 0.0, "top1": 0.0, "n": 0.0}
            bs = self.cfg.batch_size
            for s in range(lo, hi, bs):
                q = items[s:min(s + bs, hi)]
                t = self._targets(q, False)
                t0 = time.perf_counter()
                enc = self.builder.encode(q, None, with_answer=True)
                logits, _ = self.forward(enc)
                self._check_answers(enc, t, q)
                sums["kl"] += float(mimicry_kl(logits, t["logp"], t["mask"],
                                               self.cfg.temperature))
                sums["ce"] += float(answer_ce(logits, t["answer_ids"], t["mask"]))
                sums["top1"] += float((logits[:, 0].argmax(-1) == t["answer_ids"][:, 0]).sum())
                sums["n"] += len(q)
                self._clock["eval"] += time.perf_counter() - t0
            sums = self.dist.sum_floats(sums)
        finally:
            if isinstance(vectors, M2IV):
                self.handle.set_vectors(old_v)
            self.handle.set_strength(old_s)
        n = max(sums["n"], 1.0)
        return {"kl": sums["kl"] / n, "ce": sums["ce"] / n, "top1": sums["top1"] / n}

    def validate(self) -> str:
        """Evaluate on the validation queries, log it and apply the plateau rule; returns its
        decision (``"improved"``, ``"wait"``, ``"decay"``, ``"stop"``)."""
        ev = self.evaluate(items=self.val_items)
        if not self.history:
            self.history.append({"step": self.step})
        rec = self.history[-1]
        decision = self.plateau.update(self.step, ev["kl"], ev["top1"], self.params)
        rec.update(val_kl=ev["kl"], val_ce=ev["ce"], val_top1=ev["top1"], plateau=decision)
        if decision == "decay":
            self._say(f"step {self.step}: held-out KL plateaued at {self.plateau.best['kl']:.4f}"
                      f" (step {self.plateau.best['step']}); learning rate x"
                      f"{self.cfg.plateau_decay:g}")
        self.write_logs()
        return decision

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run (or continue, after :meth:`load_checkpoint`) until the plateau rule stops it or
        ``config.steps`` is reached."""
        cfg = self.cfg
        if self.optimizer is None:
            self._build_optimizer()
        bar = None
        if cfg.progress and self.dist.is_main and cfg.steps > self.step:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"m2iv train {self.task}",
                       dynamic_ncols=True, file=sys.stderr)
        try:
            while self.step < cfg.steps and not self.plateau.stopped:
                rec = self.train_step()
                if self.validating and self.step % cfg.eval_every == 0:
                    with checkpoint.deferred_interrupt():  # the plateau rule's state
                        self.validate()
                if bar is not None:
                    bar.update(1)
                    post = {"kl": f"{rec['kl']:.4f}"}
                    if self.plateau.best is not None:
                        post["val_kl"] = f"{self.plateau.best['kl']:.4f}"
                        post["val_top1"] = f"{self.plateau.best['top1']:.3f}"
                    bar.set_postfix(post, refresh=False)
                if (cfg.checkpoint_path and cfg.checkpoint_every
                        and self.step % cfg.checkpoint_every == 0):
                    self.save_checkpoint(cfg.checkpoint_path)
        finally:
            if bar is not None:
                bar.close()
        if self.validating and self.history and "val_kl" not in self.history[-1]:
            self.validate()  # the last vectors are a candidate too
        self.stop_reason = ("plateau" if self.plateau.stopped
                            else "step cap" if self.plateau.patience is not None else "steps")
        if self.stop_reason != "steps":
            best = self.plateau.best
            self._say(f"stopped at step {self.step} ({self.stop_reason}); kept step "
                      f"{best['step']}: held-out KL {best['kl']:.4f}, top-1 {best['top1']:.3f}")
        if cfg.checkpoint_path:
            self.save_checkpoint(cfg.checkpoint_path)
        return self.result()

    def _say(self, msg: str) -> None:
        if self.cfg.progress and self.dist.is_main:
            print(f"m2iv train: {msg}", file=sys.stderr, flush=True)

    def current_vectors(self, best: bool | None = None) -> M2IV:
        """A detached copy of the vectors: the last ones, or the best evaluated ones (by the
        held-out KL on the validation queries; the default when the plateau rule is on)."""
        use_best = self._keeps_best if best is None else best
        src = (self.plateau.best["vectors"] if use_best and self.plateau.best is not None
               else self.params)
        meta = dict(self._base_meta)
        meta.update(task=self.task, shots=self.cfg.shots, pool_size=len(self.pool),
                    teacher_sets=self.cfg.teacher_sets, method=self.cfg.method,
                    losses=self.cfg.losses_meta())
        return M2IV(*(src[n].detach().clone().cpu() for n in TENSORS), self.layers, meta)

    @property
    def _keeps_best(self) -> bool:
        keep = self.cfg.keep_best
        return self.plateau.patience is not None if keep is None else bool(keep)

    def stop_info(self) -> dict:
        """Why and where the run stopped, and which evaluation was kept."""
        best = self.plateau.best
        return {"reason": self.stop_reason or "running", "step": self.step,
                "kept_step": (best["step"] if best is not None and self._keeps_best
                              else self.step),
                "val_queries": len(self.val_items),
                "best_val_kl": best["kl"] if best else None,
                "best_val_top1": best["top1"] if best else None,
                "lr_decays": self.plateau.decays_done}

    def result(self) -> TrainResult:
        v = self.current_vectors()
        metrics: dict[str, Any] = {}
        if self.eval_items:
            final, zero = self.evaluate(v), self.evaluate(None)
            metrics = {"eval_kl": final["kl"], "eval_ce": final["ce"],
                       "eval_top1": final["top1"], "zero_kl": zero["kl"],
                       "zero_ce": zero["ce"], "zero_top1": zero["top1"],
                       "kl_reduction": 1.0 - final["kl"] / zero["kl"] if zero["kl"] > 0 else 0.0,
                       "eval_queries": len(self.eval_items)}
        stop = self.stop_info()
        metrics.update(steps=self.step, stopped_early=self.stop_reason == "plateau",
                       stop_reason=stop["reason"], best_step=stop["kept_step"],
                       teacher_cache=self.cache.stats(), teacher_forwards=self.teacher.forwards,
                       seconds={k: round(v, 2) for k, v in self._clock.items()},
                       world_size=self.dist.world_size)
        v.meta["metrics"] = metrics
        v.meta["training"] = {k: val for k, val in self.cfg.to_dict().items()
                              if k not in ("log_path", "plot_path", "checkpoint_path",
                                           "cache_dir", "progress")}
        v.meta["training"].update(lr_scales=self.scales, stop=stop)
        if not v.meta.get("description"):
            v.meta["description"] = (
                f"{self.cfg.method} distilled from {self.cfg.shots}-shot ICL on {self.task} "
                f"({self.cfg.teacher_sets} demonstration sets per query, pool {len(self.pool)})")
        self.write_logs(final=metrics)
        return TrainResult(v, list(self.history), metrics, self.step,
                           self.stop_reason == "plateau", self.stop_reason)

    # ------------------------------------------------------------------ logs, checkpoints
    def write_logs(self, final: dict | None = None) -> None:
        cfg = self.cfg
        if not self.dist.is_main:
            return
        if cfg.log_path:
            doc = {"task": self.task, "config": cfg.to_dict(), "lr_scales": self.scales,
                   "stop": self.stop_info(), "history": self.history}
            if final is not None:
                doc["final"] = final
            atomic_write(cfg.log_path, json.dumps(doc, indent=1).encode())
        if cfg.plot_path and (final is not None or self.history):
            plot_history(self.history, cfg.plot_path, title=f"{cfg.method} on {self.task}")

    def save_checkpoint(self, path: str) -> None:
        """Everything needed to continue exactly (see :mod:`m2iv.train.checkpoint`)."""
        checkpoint.save(self, path)

    def load_checkpoint(self, path: str) -> None:
        checkpoint.load(self, path)

    def close(self) -> None:
        """Remove the patch from the model."""
        self.handle.remove()


def train_m2iv(model, data, builder: PromptBuilder | None = None,
               config: TrainConfig | None = None, *, processor=None, init: M2IV | None = None,
               resume: str | None = None, dist: ddp.DistContext | None = None,
               cache: TeacherCache | None = None, **overrides) -> TrainResult:
    """Train M2IV vectors for ``model`` on ``data`` (see :class:`Distiller`); returns a
    :class:`~m2iv.train.config.TrainResult` whose ``vectors`` carry the full metadata
    (including ``meta["training"]["stop"]``: why the run stopped). The model is left
    unpatched."""
    d = Distiller(model, data, builder, config, processor=processor, init=init, dist=dist,
                  cache=cache, **overrides)
    try:
        if resume and os.path.exists(resume):
            d.load_checkpoint(resume)
        return d.train()
    finally:
        d.close()
