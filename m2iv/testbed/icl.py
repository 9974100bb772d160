"""k-shot in-context-learning evaluation of the testbed model.

``python -m m2iv.testbed.icl --variant 1tok`` prints the ICL table of both settings: accuracy at
k = 0, 1, 2, 4, 8, 16 on held-out query images, with demonstrations from the held-out ``demo``
split, random or class-balanced, for (a) the held-out permutations and (b) the family maps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .model import LABEL_IDS
from .task import PromptBatch, TestbedTask

KS = (0, 1, 2, 4, 8, 16)


def label_logits(model, batch: PromptBatch, **forward_kwargs) -> torch.Tensor:
    """``FloatTensor[B, 10]``: the model's logits of the 10 label tokens at the answer position.

    Gradients flow if enabled (wrap in ``torch.no_grad()`` for evaluation).
    """
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b = batch.to(dev, dtype)
    out = model(**b.model_inputs(), **forward_kwargs)
    rows = torch.arange(len(b), device=dev)
    logits = out.logits[rows, b.answer_positions]  # [B, V]
    return logits[:, torch.tensor(LABEL_IDS, device=dev)].float()


@torch.no_grad()
def accuracy(model, batch: PromptBatch, chunk: int = 512) -> float:
    """Fraction of prompts whose arg-max label token (among the 10) is the answer."""
    correct = 0
    for s in range(0, len(batch), chunk):
        sub = _slice(batch, s, s + chunk)
        pred = label_logits(model, sub).argmax(-1).cpu()
        correct += int((pred == sub.answer_labels).sum())
    return correct / len(batch)


def _slice(batch: PromptBatch, s: int, e: int) -> PromptBatch:
    n_img = batch.k + 1
    return PromptBatch(
        input_ids=batch.input_ids[s:e], attention_mask=batch.attention_mask[s:e],
        pixel_values=batch.pixel_values[s * n_img:e * n_img],
        answer_positions=batch.answer_positions[s:e], answer_tokens=batch.answer_tokens[s:e],
        answer_labels=batch.answer_labels[s:e], query_digits=batch.query_digits[s:e],
        query_indices=batch.query_indices[s:e], demo_indices=batch.demo_indices[s:e],
        label_map=batch.label_map)


@torch.no_grad()
def evaluate_icl(model, task: TestbedTask, label_map, ks=KS, balanced: bool = False,
                 n_queries: int | None = None, seed: int = 0, contexts: int = 1,
                 query_split: str = "test", demo_split: str = "demo") -> dict[int, float]:
    """Accuracy of k-shot ICL for each k in ``ks``: ``{k: accuracy}``.

    Queries: the whole ``query_split`` (default the held-out test images, 359 of them), or
    ``n_queries`` drawn from it (cycling); the same queries for every k. Demonstrations: fresh
    per query from ``demo_split`` (random or class-balanced). ``contexts > 1`` averages the
    label probabilities of that many independent demonstration sets per query (the "averaged
    teacher").
    """
    g = torch.Generator().manual_seed(seed)
    n = n_queries or len(task.split(query_split))
    q = task.sample_queries(n, split=query_split, generator=g)
    res = {}
    for k in ks:
        probs = 0.0
        for _ in range(contexts if k > 0 else 1):
            d = task.sample_demos(n, k, split=demo_split, balanced=balanced, generator=g,
                                  exclude=q if query_split == demo_split else None)
            batch = task.prompts(q, label_map, d)
            p = torch.cat([label_logits(model, _slice(batch, s, s + 512)).softmax(-1).cpu()
                           for s in range(0, n, 512)])
            probs = probs + p
        answers = task.label_map(label_map)[task.data.digits[q]]
        res[k] = float((probs.argmax(-1) == answers).float().mean())
    return res


@torch.no_grad()
def icl_table(model, task: TestbedTask, ks=KS, seeds=(0,), n_queries: int | None = None,
              maps: list[str] | None = None) -> dict:
    """Accuracy for every map in ``maps`` (default: every held-out and family map), both
    demonstration modes and each seed: ``{map: {"random"|"balanced": {k: [acc per seed]}}}``."""
    maps = maps or (task.heldout_map_names + task.family_map_names)
    out: dict = {}
    for name in maps:
        out[name] = {}
        for mode in ("random", "balanced"):
            accs: dict[int, list[float]] = {k: [] for k in ks}
            for s in seeds:
                r = evaluate_icl(model, task, name, ks=ks, balanced=mode == "balanced",
                                 n_queries=n_queries, seed=1000 * s + 17)
                for k in ks:
                    accs[k].append(r[k])
            out[name][mode] = accs
    return out


def summarise(table: dict, names: list[str], ks=KS, over: str = "maps") -> dict:
    """Mean and spread: ``{mode: {k: (mean, std, min, max)}}``.

    ``over="maps"``: the spread of the per-map accuracies (each averaged over seeds);
    ``over="seeds"``: the spread over seeds of the accuracy averaged over ``names``.
    """
    res = {}
    for mode in ("random", "balanced"):
        res[mode] = {}
        for k in ks:
            if over == "maps":
                vals = [statistics.fmean(table[n][mode][k]) for n in names]
            else:
                n_seeds = len(table[names[0]][mode][k])
                vals = [statistics.fmean(table[n][mode][k][s] for n in names)
                        for s in range(n_seeds)]
            res[mode][k] = (statistics.fmean(vals),
                            statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                            min(vals), max(vals))
    return res


def format_table(table: dict, task: TestbedTask, ks=KS, over: str = "maps") -> str:
    """A Markdown table: accuracy in % as mean ± std (over maps, or over seeds)."""
    lines = []
    hdr = "| setting | demos | " + " | ".join(f"k={k}" for k in ks) + " |"
    sep = "|" + "---|" * (len(ks) + 2)
    lines += [hdr, sep]
    groups = [("(a) held-out maps (8)", task.heldout_map_names),
              ("(b) family maps (5)", task.family_map_names)]
    groups += [(f"(b) {n}", [n]) for n in task.family_map_names]
    for label, names in groups:
        names = [n for n in names if n in table]
        if not names:
            continue
        s = summarise(table, names, ks, over=over)
        for mode in ("random", "balanced"):
            cells = []
            for k in ks:
                mean, std, lo, hi = s[mode][k]
                show = len(names) > 1 if over == "maps" else len(table[names[0]][mode][k]) > 1
                cells.append(f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if show else ""))
            lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    from . import load_testbed

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", default="1tok", choices=["1tok", "4tok"])
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--seeds", type=int, default=1, help="demonstration-sampling seeds")
    ap.add_argument("--queries", type=int, default=None,
                    help="queries per (map, k); default: all 359 held-out test images")
    ap.add_argument("--json", default=None, help="also write the raw table here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, task = load_testbed(args.variant, directory=args.checkpoint_dir)
    table = icl_table(model, task, seeds=tuple(range(args.seeds)), n_queries=args.queries)
    n_test = args.queries or len(task.split("test"))
    print(f"accuracy (%) on {n_test} queries from the held-out test images; "
          "mean ± std over maps")
    print(format_table(table, task))
    if args.seeds > 1:
        print(f"\nthe same, mean ± std over {args.seeds} demonstration seeds")
        print(format_table(table, task, over="seeds"))
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"variant": args.variant, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
