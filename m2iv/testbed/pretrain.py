"""Pre-train the testbed model so that it learns multimodal in-context learning.

    python -m m2iv.testbed.pretrain --variant 1tok            # ~8-10 min on one CPU thread
    python -m m2iv.testbed.pretrain --variant 4tok            # optional, slower

Writes ``testbed_<variant>.safetensors`` and ``testbed_<variant>.json`` into ``--out`` (default:
the package's ``checkpoints/`` folder, i.e. it replaces the shipped checkpoint). Everything is
seeded: model initialisation, episode sampling and the evaluation queries.

The recipe (see :class:`~m2iv.testbed.data.Curriculum`): bursty episodes, prototype images
early, a frozen vision tower until step 600 then 0.1x LR, shift augmentation only later, AdamW
with warm-up and cosine decay, batch 32, loss on every label from the second pair on.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from .data import Curriculum, EpisodeSampler
from .model import VARIANTS, TestbedModelConfig, build_model, save_model

DEFAULTS = {
    "1tok": {"steps": 3000, "curriculum": {}},
    "4tok": {"steps": 3500, "curriculum": {"short_until": 1000, "bursty_steps": 3500}},
}


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def quick_eval(model, task, ks=(0, 4, 16), maps=("heldout0", "identity")) -> dict:
    from .icl import evaluate_icl

    was = model.training
    model.eval()
    out = {m: evaluate_icl(model, task, m, ks=ks, seed=123) for m in maps}
    model.train(was)
    return out


def train(variant: str = "1tok", steps: int | None = None, batch_size: int = 32,
          lr: float = 1e-3, weight_decay: float = 0.01, warmup: int = 200, seed: int = 0,
          curriculum: Curriculum | None = None, out: str | None = None, threads: int = 1,
          eval_every: int = 500, progress: bool = True, save: bool = True):
    """Train and (if ``save``) write the checkpoint; returns ``(model, meta)``."""
    from tqdm.auto import tqdm

    from .task import TestbedTask

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    d = DEFAULTS[variant]
    steps = steps or d["steps"]
    cur = curriculum or Curriculum(**d["curriculum"])
    cfg = TestbedModelConfig.for_variant(variant)
    model = build_model(cfg, seed=seed)
    model.train()
    task = TestbedTask(cfg)
    sampler = EpisodeSampler(cfg.tokens_per_image, cur, seed=seed + 1)

    vision = list(model.model.vision_tower.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    decay = [p for p in rest if p.ndim >= 2]
    no_decay = [p for p in rest if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay, "mult": 1.0},
         {"params": no_decay, "weight_decay": 0.0, "mult": 1.0},
         {"params": vision, "weight_decay": weight_decay, "mult": cur.vision_lr_mult}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8)
    for p in vision:
        p.requires_grad_(False)

    t0 = time.time()
    ema_loss = ema_acc = None
    history = []
    bar = tqdm(range(steps), desc=f"pretrain {variant}", disable=not progress, mininterval=1.0)
    for step in bar:
        if step == cur.unfreeze_step:
            for p in vision:
                p.requires_grad_(True)
        f = lr_factor(step, steps, warmup)
        for gr in opt.param_groups:
            gr["lr"] = lr * f * gr["mult"]
        b = sampler.sample(step, batch_size)
        logits = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"]).logits
        mask = b["targets"] != -100
        loss = F.cross_entropy(logits[mask], b["targets"][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            acc = float((logits[mask].argmax(-1) == b["targets"][mask]).float().mean())
        lv = loss.item()
        ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
        ema_acc = acc if ema_acc is None else 0.98 * ema_acc + 0.02 * acc
        bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.2f}",
                        bursty=f"{cur.p_bursty(step):.2f}", proto=f"{cur.p_proto(step):.2f}")
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            ev = quick_eval(model, task)
            history.append({"step": step + 1, "loss": round(ema_loss, 4), "eval": ev})
            msg = "  ".join(f"{m}: " + " ".join(f"k{k}={100 * a:.0f}%" for k, a in r.items())
                            for m, r in ev.items())
            (bar.write if progress else print)(f"step {step + 1}: loss {ema_loss:.3f}  {msg}")
    wall = time.time() - t0
    model.eval()
    meta = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "warmup": warmup, "seed": seed, "threads": threads, "wall_s": round(wall, 1),
            "curriculum": dataclasses.asdict(cur), "history": history,
            "data": task.data.fingerprint(), "family_maps": task.family_map_names,
            "heldout_maps": {n: task.maps[n].tolist() for n in task.heldout_map_names},
            "torch": torch.__version__}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if save:
        paths = save_model(model, variant, out, meta=meta)
        print(f"saved {paths[0]} and {paths[1]} after {wall / 60:.1f} min")
    return model, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="1tok", choices=VARIANTS)
    ap.add_argument("--out", default=None, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--family-fraction", type=float, default=None)
    ap.add_argument("--shift-start", type=int, default=None, help="-1 disables shifts")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    kw = dict(DEFAULTS[args.variant]["curriculum"])
    if args.family_fraction is not None:
        kw["family_fraction"] = args.family_fraction
    if args.shift_start is not None:
        kw["shift_start"] = None if args.shift_start < 0 else args.shift_start
    train(args.variant, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          seed=args.seed, curriculum=Curriculum(**kw), out=args.out, threads=args.threads,
          eval_every=args.eval_every, progress=not args.no_progress)


if __name__ == "__main__":
    main()
