"""``m2iv train``, ``m2iv eval`` and ``m2iv data``: train M2IVs from the command line.

    m2iv data make-digits digits/                     # the built-in example task
    m2iv train --data digits/ --out digits.safetensors  # measured defaults, stops on a plateau
    m2iv eval  --data digits/ --vectors digits.safetensors --shots 0,1,4,8,16 \\
               --baselines mean-activation --out digits-eval.json

Data parallel: ``torchrun --nproc_per_node 2 -m m2iv.cli train ...`` (gloo on CPU, nccl on GPU).
(Over 500 lines on purpose: most of it is the argument table of :class:`~m2iv.train.TrainConfig`,
each option with its type check and help; the commands themselves are short.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import M2IVError
from .args import (existing_dir, existing_file, finite_float, non_negative_float,
                   non_negative_int, output_file, positive_float, positive_int, writable_dir)
from .errors import UsageError, on_interrupt

__all__ = ["add_parsers", "load_model", "MODEL_PRESETS"]

MODEL_PRESETS = {
    "testbed": "the digits testbed LLaVA shipped with m2iv (1 image token per image)",
    "testbed-1tok": "same as testbed",
    "testbed-4tok": "the digits testbed with 4 image tokens per image",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not ``None`` or a switch's
    ``False``, and not twice where the help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def _csv_ints(s: str) -> list[int]:
    """Comma-separated integers >= 0 (``0,1,4,16``)."""
    try:
        values = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {s!r}")
    return values


def _vectors_file(spec: str) -> str:
    """``FILE`` or ``NAME=FILE`` naming an existing vectors file."""
    existing_file(spec.rpartition("=")[2] if "=" in spec else spec)
    return spec


def _dtype(name: str | None):
    """The torch dtype called ``name`` (``None`` for ``"auto"``)."""
    import torch

    if name in (None, "auto"):
        return None
    dt = getattr(torch, name, None) if name in DTYPES else None
    if not isinstance(dt, torch.dtype):
        raise UsageError(f"unknown dtype={name!r}; choose from {', '.join(DTYPES)}")
    return dt


def load_model(spec: str | None, data_dir: str | None = None, device: str = "auto",
               dtype: str = "auto", processor: str | None = None, template: str = "auto"):
    """``(model, prompt_builder)`` for a preset name (see :data:`MODEL_PRESETS`) or a local
    Hugging Face model directory (``AutoModelForImageTextToText`` + ``AutoProcessor``).

    Raises :class:`~m2iv.cli.errors.UsageError` without a model to load,
    :class:`~m2iv.errors.M2IVError` when it cannot be loaded (``OSError`` for a missing
    testbed checkpoint)."""
    import torch

    from .._extras import require
    from ..data import task_info
    from ..prompts import make_prompt_builder
    from ..train.distributed import local_device

    if spec is None and data_dir:
        spec = task_info(data_dir).get("model")
    if spec is None:
        raise UsageError("model= is required: a preset (" + ", ".join(MODEL_PRESETS) + ") or a "
                         "local model directory (or a 'model' entry in the data's task.json)")
    dt = _dtype(dtype)
    dev = local_device(device)
    if spec in MODEL_PRESETS:
        from ..testbed import load_testbed

        variant = "4tok" if spec.endswith("4tok") else "1tok"
        model, _ = load_testbed(variant, device=dev, dtype=dt or torch.float32)
        return model, make_prompt_builder(model)
    transformers = require("transformers", f"loading the Hugging Face model {spec!r}")
    if dt is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(spec, dtype=dt)
        proc = transformers.AutoProcessor.from_pretrained(processor or spec)
    except (OSError, ValueError) as err:
        raise M2IVError(f"cannot load model {spec!r}: it is not a preset "
                        f"({', '.join(MODEL_PRESETS)}) and loading it as a Hugging Face "
                        f"model failed: {str(err).splitlines()[0]}") from None
    model.to(dev).eval()
    return model, make_prompt_builder(model, proc, template=template)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="a preset (" + ", ".join(MODEL_PRESETS) + ") or a local Hugging Face "
                   "model directory; default: the 'model' of the data's task.json")
    g.add_argument("--processor", default=None,
                   help="processor directory; default: the --model directory")
    g.add_argument("--template", default="auto", choices=["auto", "chat", "plain"],
                   help="prompt format: the processor's chat template or the plain fallback")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), "
                   "cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="model dtype (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "ext", "torch"],
                   help="kernel backend of the patched model")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads; default: torch's, 1 for the testbed presets (whose "
                   "tiny matrices only contend on more)")


def add_parsers(subparsers) -> None:
    """Register ``train``, ``eval`` and ``data`` on an argparse ``subparsers`` object (each
    sets ``args.func``). Imports no torch (``m2iv train --help`` stays fast)."""
    from ..train.config import METHODS, SCHEDULES, SYNERGY_MODES, TrainConfig as C

    # ---------------------------------------------------------------- train
    p = subparsers.add_parser(
        "train", help="distil k-shot ICL into M2IV vectors (or train a baseline)",
        usage="%(prog)s --data DIR --out FILE.safetensors [options]",
        description="Train M2IV vectors by distilling the model's k-shot in-context learning, "
        "averaged over many demonstration sets, into vectors (mimicry KL; optional answer CE "
        "and MHA/MLP synergy terms). Trains until the held-out KL stops improving. Writes a "
        "safetensors vectors file with full metadata, a JSON log and a PNG loss curve. "
        "Ctrl-C saves a checkpoint; the same command with --resume continues it.",
        formatter_class=_HelpFormatter)
    _add_model_args(p)
    g = p.add_argument_group("task")
    g.add_argument("--data", "-d", required=True, type=existing_dir,
                   help="task directory (data.jsonl + images; splits pool, train, eval)")
    g.add_argument("--shots", "-k", type=positive_int, default=C.shots,
                   help="demonstrations per teacher prompt")
    g.add_argument("--teacher-sets", type=positive_int, default=C.teacher_sets,
                   help="demonstration sets per query whose answer distributions are averaged "
                   "into the teacher target (many-shot: sets x shots demonstrations per query)")
    g.add_argument("--pool-size", type=positive_int, default=None,
                   help="demonstration pool size (a seeded subset); default: the whole pool "
                   "split")
    g.add_argument("--method", default="m2iv", choices=list(METHODS),
                   help="m2iv, a trained baseline or ablation (live: the layer-output vector "
                   "alone; mha-only, mlp-only: one branch of M2IV), or the training-free "
                   "mean-activation vectors")
    g.add_argument("--layers", type=_csv_ints, default=None,
                   help="steered layers, e.g. 0,1,2; default: every steerable layer")
    g.add_argument("--positions", default="all", choices=["all", "text"],
                   help="tokens the vectors are added to")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=C.steps,
                   help="step cap (the plateau rule usually stops earlier; with --patience 0 "
                   "exactly this many steps)")
    g.add_argument("--batch-size", type=positive_int, default=C.batch_size,
                   help="queries per micro-batch (global, over all ranks)")
    g.add_argument("--grad-accum", type=positive_int, default=C.grad_accum,
                   help="micro-batches per optimizer step")
    g.add_argument("--lr", type=positive_float, default=C.lr,
                   help="learning rate, relative to the residual-stream RMS")
    g.add_argument("--schedule", default=C.schedule, choices=list(SCHEDULES),
                   help="plateau: constant, lowered by the plateau rule; cosine: over --steps")
    g.add_argument("--weight-decay", type=non_negative_float, default=C.weight_decay,
                   help="AdamW weight decay of the vectors")
    g.add_argument("--warmup", type=non_negative_float, default=C.warmup,
                   help="linear learning-rate warm-up: steps, or a fraction (< 1) of --steps")
    g.add_argument("--grad-clip", type=non_negative_float, default=C.grad_clip,
                   help="gradient-norm clip (0: none)")
    g.add_argument("--seed", type=non_negative_int, default=C.seed,
                   help="seed of every draw: pool subset, queries, demonstration sets")
    g = p.add_argument_group("losses")
    g.add_argument("--kl-weight", type=non_negative_float, default=C.kl_weight,
                   help="weight of the mimicry KL to the teacher's answer distribution")
    g.add_argument("--ce-weight", type=non_negative_float, default=C.ce_weight,
                   help="weight of the cross-entropy on the answer tokens")
    g.add_argument("--synergy-weight", type=non_negative_float, default=C.synergy_weight,
                   help="weight of the MHA/MLP synergy term (see --synergy)")
    g.add_argument("--synergy", default=C.synergy, choices=list(SYNERGY_MODES),
                   help="MHA/MLP synergy term: branch decorrelation, per-layer hidden-state "
                   "alignment to the teacher, both, or none")
    g.add_argument("--decorr-weight", type=non_negative_float, default=C.decorr_weight,
                   help="weight of the decorrelation inside the synergy term")
    g.add_argument("--temperature", type=positive_float, default=C.temperature,
                   help="softmax temperature of the mimicry KL")
    g = p.add_argument_group("stopping")
    g.add_argument("--eval-every", type=non_negative_int, default=C.eval_every,
                   help="steps between held-out evaluations (0: none, train --steps steps)")
    g.add_argument("--val-queries", type=non_negative_int, default=C.val_queries,
                   help="train queries held out for the held-out evaluations")
    g.add_argument("--patience", type=non_negative_int, default=C.patience,
                   help="evaluations without improvement before the learning rate is lowered "
                   "or the run stops (0: never stop early)")
    g.add_argument("--min-delta", type=non_negative_float, default=C.min_delta,
                   help="relative held-out KL improvement that counts")
    g.add_argument("--plateau-decays", type=non_negative_int, default=C.plateau_decays,
                   help="learning-rate decays (x --plateau-decay) before a plateau stops the run")
    g.add_argument("--plateau-decay", type=positive_float, default=C.plateau_decay,
                   help="learning-rate factor at a plateau (< 1)")
    g.add_argument("--eval-queries", type=non_negative_int, default=C.eval_queries,
                   help="eval-split queries for the final metrics (0: all)")
    g = p.add_argument_group("mechanics")
    g.add_argument("--checkpoint", default=None, type=output_file(),
                   help="checkpoint file; default: OUT.ckpt")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=50,
                   help="steps between checkpoints (0: only at the end and on Ctrl-C)")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    g.add_argument("--cache-dir", default=None, type=writable_dir,
                   help="teacher-output cache directory (reruns and resumes skip the teacher)")
    g.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16",
                                                                 "float16"],
                   help="dtype of the cached teacher outputs")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"],
                   help="autocast of the forwards (auto: bf16 on CUDA for fp32 models)")
    g.add_argument("--teacher-batch-size", type=positive_int, default=None,
                   help="prompts per teacher forward; default: --batch-size")
    g.add_argument("--n-prompts", type=positive_int, default=64,
                   help="prompts averaged by --method mean-activation")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log-dir", default=None, type=writable_dir,
                   help="where the JSON log and the PNG loss curve go; default: next to --out")
    p.add_argument("--out", "-o", required=True, type=output_file(".safetensors"),
                   help="output vectors (.safetensors)")
    p.set_defaults(func=_cmd_train)

    # ---------------------------------------------------------------- eval
    p = subparsers.add_parser(
        "eval", help="accuracy of zero-shot, k-shot ICL, M2IVs and baselines",
        usage="%(prog)s --data DIR [--vectors [NAME=]FILE ...] [--shots 0,1,4] [options]",
        description="Evaluate on the task's eval split (exact match after VQA normalisation): "
        "zero-shot, k-shot ICL for each --shots, every --vectors file and every --baselines "
        "method. Prints a table and writes JSON.",
        formatter_class=_HelpFormatter)
    _add_model_args(p)
    p.add_argument("--data", "-d", required=True, type=existing_dir,
                   help="task directory (data.jsonl + images)")
    p.add_argument("--vectors", "-v", nargs="*", default=[], metavar="FILE", type=_vectors_file,
                   help="M2IV files (NAME=FILE to name a row)")
    p.add_argument("--shots", type=_csv_ints, default=[0, 1, 2, 4],
                   help="ICL shot counts to evaluate (0 = zero-shot)")
    p.add_argument("--baselines", nargs="*", default=[], choices=["mean-activation"],
                   help="training-free baselines computed on the fly")
    p.add_argument("--baseline-shots", type=positive_int, default=16,
                   help="demonstrations per prompt of the mean-activation baseline")
    p.add_argument("--balanced", action="store_true",
                   help="class-balanced ICL demonstrations (over the pool's answers)")
    p.add_argument("--pool-size", type=positive_int, default=None,
                   help="demonstration pool size; default: the whole pool split")
    p.add_argument("--eval-queries", type=positive_int, default=None,
                   help="eval-split queries scored; default: the whole split")
    p.add_argument("--kl-shots", type=positive_int, default=None,
                   help="also report the KL to this k-shot teacher for vector rows")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="generation budget; default: enough for the longest answer")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward")
    p.add_argument("--positions", default="all", choices=["all", "text"],
                   help="tokens the vectors are added to")
    p.add_argument("--strength", type=finite_float, default=1.0,
                   help="scale of every vectors file (1: as trained)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the demonstration draws and the query subset")
    p.add_argument("--cache-dir", default=None, type=writable_dir,
                   help="teacher-output cache for --kl-shots")
    p.add_argument("--predictions", action="store_true", help="keep every prediction in JSON")
    p.add_argument("--out", "-o", default=None, type=output_file(".json"),
                   help="results JSON")
    p.add_argument("--table", default=None, type=output_file(),
                   help="also write the Markdown table here")
    p.set_defaults(func=_cmd_eval)

    # ---------------------------------------------------------------- data
    p = subparsers.add_parser("data", help="task data: make the built-in example, validate")
    sub = p.add_subparsers(dest="data_command", metavar="COMMAND")
    sub.required = True
    sp = sub.add_parser("make-digits", formatter_class=_HelpFormatter,
                        help="write the built-in digits task (scikit-learn's 8x8 digits, "
                        "answers by a label permutation)")
    sp.add_argument("dir", type=writable_dir, help="directory to write (created if needed)")
    sp.add_argument("--map", default="heldout0",
                    help="label map: heldout0..heldout7, identity, reverse, succ, shift5, parity")
    sp.add_argument("--pool-size", type=positive_int, default=None,
                    help="items of the pool split (a seeded subset); default: all")
    sp.add_argument("--train-size", type=positive_int, default=None,
                    help="items of the train split; default: all")
    sp.add_argument("--eval-size", type=positive_int, default=None,
                    help="items of the eval split; default: all")
    sp.add_argument("--seed", type=non_negative_int, default=0, help="seed of the subsets")
    sp.set_defaults(func=_cmd_make_digits)
    sp = sub.add_parser("check", help="validate a task directory and print its splits")
    sp.add_argument("dir", type=existing_dir, help="task directory")
    sp.set_defaults(func=_cmd_check)


# -------------------------------------------------------------------------- commands
def _setup_threads(args) -> None:
    import torch

    from ..data import task_info

    threads = getattr(args, "threads", None)
    if threads is None and (args.model or task_info(args.data).get("model")) in MODEL_PRESETS:
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def _cmd_make_digits(args) -> int:
    from ..testbed.digits_task import make_digits

    t = make_digits(args.dir, label_map=args.map, pool_size=args.pool_size,
                    train_size=args.train_size, eval_size=args.eval_size, seed=args.seed)
    print(f"wrote {args.dir}: {t}")
    return 0


def _cmd_check(args) -> int:
    from ..data import TaskData

    print(TaskData.from_dir(args.dir))
    return 0


def _load_data(path: str):
    """The task at ``path``; a :class:`~m2iv.data.DataError` names the directory."""
    from ..data import DataError, load_task

    try:
        return load_task(path)
    except DataError as err:
        raise DataError(f"bad task data in {path}: {err}") from None


def _check_task(data, args) -> None:
    """Refuse, before the model loads, a task this run cannot use: an empty pool or train
    split, or fewer pool items than ``--shots`` (or than ``--pool-size``)."""
    from ..data import DataError
    from ..train.sampling import Sampler

    empty = [s for s in ("pool", "train") if not data.split(s)]
    if empty:
        raise UsageError(
            f"{args.data}: the task has no {' and no '.join(empty)} items (splits: "
            f"{data.counts()}); m2iv train draws its --shots demonstrations from 'pool' and "
            "trains on 'train' queries: set each item's \"split\" in data.jsonl")
    try:
        Sampler(data, args.shots, args.pool_size, eval_queries=None)
    except DataError as err:
        raise UsageError(str(err)) from None


def _train_config(args):
    """The run's :class:`~m2iv.train.config.TrainConfig` from the flags (a combination it
    refuses is a :class:`UsageError`, found before anything is loaded)."""
    from ..train.config import TRAINED_METHODS, TrainConfig

    out = args.out
    stem = os.path.splitext(os.path.basename(out))[0]
    log_dir = args.log_dir or os.path.dirname(os.path.abspath(out))
    try:
        cfg = TrainConfig(
            shots=args.shots, teacher_sets=args.teacher_sets, pool_size=args.pool_size,
            steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            lr=args.lr, schedule=args.schedule, weight_decay=args.weight_decay,
            warmup=args.warmup, grad_clip=args.grad_clip, kl_weight=args.kl_weight,
            ce_weight=args.ce_weight, synergy_weight=args.synergy_weight, synergy=args.synergy,
            decorr_weight=args.decorr_weight, temperature=args.temperature,
            layers=tuple(args.layers) if args.layers else None, positions=args.positions,
            backend=args.backend, seed=args.seed, eval_every=args.eval_every,
            val_queries=args.val_queries, patience=args.patience or None,
            min_delta=args.min_delta, plateau_decays=args.plateau_decays,
            plateau_decay=args.plateau_decay, eval_queries=args.eval_queries or None,
            checkpoint_path=args.checkpoint or (out + ".ckpt"),
            checkpoint_every=args.checkpoint_every, cache_dir=args.cache_dir,
            cache_dtype=args.cache_dtype, amp=args.amp,
            teacher_batch_size=args.teacher_batch_size,
            log_path=os.path.join(log_dir, f"{stem}.log.json"),
            plot_path=os.path.join(log_dir, f"{stem}.loss.png"),
            progress=not args.no_progress, method=args.method)
        for k, val in TRAINED_METHODS.get(args.method, {}).items():
            setattr(cfg, k, val)
        cfg.__post_init__()
    except ValueError as err:
        raise UsageError(str(err)) from None
    return cfg


def _interrupt_saver(d, path: str):
    """What Ctrl-C during ``d.train()`` does: save a checkpoint and say how to continue."""
    def save() -> str:
        if d.step == 0:
            return "interrupted before the first step: nothing to resume"
        d.save_checkpoint(path)
        return (f"checkpoint of step {d.step} saved to {path}; the same command with --resume "
                "continues it")
    return save


def _mean_activation(model, data, builder, cfg, args, dist):
    """The training-free baseline's vectors, with the eval metrics a trained run reports."""
    from ..train.baselines import mean_activation_vectors
    from ..train.distill import Distiller

    v = mean_activation_vectors(model, data, builder, shots=cfg.shots, pool_size=cfg.pool_size,
                                n_prompts=args.n_prompts, layers=args.layers, seed=cfg.seed,
                                teacher_sets=cfg.teacher_sets)
    d = Distiller(model, data, builder, cfg, dist=dist, steps=0, eval_every=0)
    try:
        if d.eval_items:
            ev, zero = d.evaluate(v), d.evaluate(None)
            v.meta["metrics"] = {"eval_kl": ev["kl"], "zero_kl": zero["kl"],
                                 "eval_top1": ev["top1"],
                                 "kl_reduction": 1 - ev["kl"] / zero["kl"]
                                 if zero["kl"] > 0 else 0.0}
    finally:
        d.close()
    return v


def _cmd_train(args) -> int:
    from .._extras import missing
    from ..train import distributed as ddp
    from ..train.distill import Distiller

    cfg = _train_config(args)
    data = _load_data(args.data)
    _check_task(data, args)
    _setup_threads(args)
    dist = ddp.init(device=str(ddp.local_device(args.device)))
    try:
        no_plot = missing("matplotlib", "the loss plot") if cfg.plot_path else None
        if no_plot:
            cfg.plot_path = None
            if dist.is_main:
                print(f"m2iv train: note: {no_plot}; training without it", file=sys.stderr)
        model, builder = load_model(args.model, args.data, args.device, args.dtype,
                                    args.processor, args.template)
        if args.method == "mean-activation":
            v = _mean_activation(model, data, builder, cfg, args, dist)
        else:
            d = Distiller(model, data, builder, cfg, dist=dist)
            try:
                ckpt = cfg.checkpoint_path
                if args.resume:
                    if os.path.exists(ckpt):
                        d.load_checkpoint(ckpt)
                        if dist.is_main:
                            print(f"resumed from {ckpt} at step {d.step}", file=sys.stderr)
                    elif dist.is_main:
                        print(f"no checkpoint at {ckpt}: starting from scratch", file=sys.stderr)
                with on_interrupt(_interrupt_saver(d, ckpt)):
                    res = d.train()
            finally:
                d.close()
            v = res.vectors
        if dist.is_main:
            v.save(args.out)
            m = v.meta.get("metrics", {})
            summary = {k: m[k] for k in ("eval_kl", "zero_kl", "kl_reduction", "eval_top1",
                                         "stop_reason", "steps", "best_step", "seconds")
                       if k in m}
            print(f"wrote {args.out} ({v}); {json.dumps(summary)}")
        dist.barrier()
        return 0
    finally:
        dist.close()


def _cmd_eval(args) -> int:
    from .._atomic import atomic_write
    from ..train.baselines import mean_activation_vectors
    from ..train.evaluate import compare, format_table
    from ..vectors import M2IV

    data = _load_data(args.data)
    vectors = {}
    for spec in args.vectors:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        v = M2IV.load(path)
        name = name or v.meta.get("method") or os.path.splitext(os.path.basename(path))[0]
        if name in vectors:
            name = os.path.splitext(os.path.basename(path))[0]
        vectors[name] = v
    _setup_threads(args)
    model, builder = load_model(args.model, args.data, args.device, args.dtype, args.processor,
                                args.template)
    for b in args.baselines:
        vectors[b] = mean_activation_vectors(model, data, builder, shots=args.baseline_shots,
                                             pool_size=args.pool_size, seed=args.seed)
    res = compare(model, data, builder, vectors=vectors, ks=args.shots, pool_size=args.pool_size,
                  eval_queries=args.eval_queries, seed=args.seed,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  positions=args.positions, backend=args.backend, strength=args.strength,
                  kl_shots=args.kl_shots, balanced=args.balanced, cache_dir=args.cache_dir,
                  keep_predictions=args.predictions)
    table = format_table(res)
    print(table)
    if args.out:
        atomic_write(args.out, json.dumps(res, indent=1).encode())
    if args.table:
        atomic_write(args.table, (table + "\n").encode())
    return 0
