"""The measurement that chose ``m2iv train``'s defaults: one factor at a time around
a centre, on digit-label permutations that are neither the testbed's held-out maps (those are
kept for the fidelity table, :mod:`benchmarks.fidelity`) nor its family maps.

The centre (:data:`CENTRE`) is where a first exploration pointed: batch 128, KL only, 16 demonstration sets per
query, lr 0.1, the plateau rule. Every config is the centre plus its overrides, so this file's
runs stay reproducible whatever the library's defaults become (the default ``teacher_sets=4``
was chosen from the ``m4`` row).

    python -m benchmarks.fidelity_sweep [--configs centre,batch8,...] [--maps 3] [--seeds 1]

Each run trains with :class:`m2iv.train.TrainConfig` defaults, the centre and the config's
overrides, and scores top-1 (= greedy exact match for the testbed's one-token answers) and the KL to the
16-set teacher on all 359 eval queries. Teacher outputs are shared in memory between runs of
the same (map, seed, sets), so the sweep pays each teacher forward once. Results (every run,
and mean ± std per config) go to ``benchmarks/results/fidelity-sweep-<date>.json/.csv/.md/.png``;
finished runs are skipped when the command is repeated with the same ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# the centre of the sweep: TrainConfig defaults plus these
CENTRE = {"teacher_sets": 16, "batch_size": 128, "lr": 0.1, "ce_weight": 0.0,
          "synergy_weight": 0.0, "schedule": "plateau"}
# name -> TrainConfig overrides relative to the centre
CONFIGS: dict[str, dict] = {
    "centre": {},
    # the former default recipe (fixed 300 steps, batch 8, KL + CE + synergy, cosine, one
    # demonstration set per query)
    "v0-recipe": {"steps": 300, "batch_size": 8, "eval_every": 0, "schedule": "cosine",
                  "warmup": 0.1, "ce_weight": 1.0, "synergy_weight": 0.1, "teacher_sets": 1},
    # batch size (lr unchanged)
    "batch8": {"batch_size": 8},
    "batch32": {"batch_size": 32},
    # learning rate
    "lr0.03": {"lr": 0.03},
    "lr0.3": {"lr": 0.3},
    # schedule and stopping
    "no-decay": {"plateau_decays": 0},
    "cosine1000": {"schedule": "cosine", "steps": 1000},
    # loss mix
    "ce1": {"ce_weight": 1.0},
    "ce-only": {"kl_weight": 0.0, "ce_weight": 1.0},
    "decorr0.1": {"synergy_weight": 0.1, "synergy": "decorr"},
    "align0.1": {"synergy_weight": 0.1, "synergy": "align"},
    "paper-mix": {"ce_weight": 1.0, "synergy_weight": 0.1, "synergy": "decorr"},
    # teacher sets
    "m1": {"teacher_sets": 1},
    "m4": {"teacher_sets": 4},
    "m32": {"teacher_sets": 32},
    # cheaper combinations
    "b32-m4": {"batch_size": 32, "teacher_sets": 4},
    # pool
    "pool128": {"pool_size": 128},
    # branches (the baselines' subsets under the same recipe)
    "mha-only": {"train_mlp": False},
    "mlp-only": {"train_mha": False},
}


def sweep_maps(n: int) -> list[list[int]]:
    """``n`` fixed random permutations that are neither held-out nor family maps."""
    from m2iv.testbed.data import family_maps, heldout_maps, map_key

    taken = {map_key(m) for m in heldout_maps()} | {map_key(m) for m in family_maps().values()}
    g = torch.Generator().manual_seed(12)
    out = []
    while len(out) < n:
        p = torch.randperm(10, generator=g)
        if map_key(p) in taken or int((p == torch.arange(10)).sum()) > 2:
            continue
        taken.add(map_key(p))
        out.append(p.tolist())
    return out


class MemoryCache:
    """A teacher cache held in memory for the whole sweep (same interface as
    :class:`m2iv.train.TeacherCache`)."""

    def __init__(self):
        self._d: dict[str, dict] = {}
        self.hits = self.misses = self.writes = 0

    def get(self, key, hidden_layers=None):
        e = self._d.get(key)
        if e is None or (hidden_layers is not None and "hidden" not in e):
            self.misses += 1
            return None
        self.hits += 1
        return e

    def put(self, key, entry):
        entry = {k: v.detach().cpu() for k, v in entry.items()}
        self._d[key] = entry
        self.writes += 1
        return entry

    def stats(self):
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes}


def run_one(model, builder, data, cache, overrides: dict, seed: int) -> dict:
    from m2iv.train import Distiller, TrainConfig

    cfg = TrainConfig(**dict(CENTRE, **overrides, seed=seed, eval_queries=None, progress=False))
    d = Distiller(model, data, builder, cfg, cache=cache)
    t0 = time.time()
    try:
        res = d.train()
        zero = d.evaluate(None)
        teacher_top1 = _teacher_top1(d)
    finally:
        d.close()
    m = res.metrics
    return {"top1": 100 * m["eval_top1"], "kl": m["eval_kl"], "zero_top1": 100 * zero["top1"],
            "zero_kl": zero["kl"], "teacher_top1": teacher_top1, "steps": res.steps,
            "stop": res.stop_reason, "best_step": m["best_step"],
            "seconds": round(time.time() - t0, 1), "clock": m["seconds"]}


@torch.no_grad()
def _teacher_top1(d) -> float:
    """Top-1 (%) of the run's averaged teacher itself on the eval queries (the ceiling)."""
    items = d.eval_items
    hit = 0
    for s in range(0, len(items), 128):
        t = d.teacher.targets(items[s:s + 128])
        hit += int((t["logp"][:, 0].argmax(-1) == t["answer_ids"][:, 0]).sum())
    return 100 * hit / len(items)


def summarise(runs: list[dict]) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    rows = []
    for name in [c for c in CONFIGS if c in by] + [c for c in by if c not in CONFIGS]:
        rr = by[name]
        tops = [r["top1"] for r in rr]
        maps = sorted({r["map"] for r in rr})
        per_map = [statistics.fmean(r["top1"] for r in rr if r["map"] == m) for m in maps]
        rows.append({
            "config": name, "overrides": json.dumps(CONFIGS.get(name, {})), "runs": len(rr),
            "top1_mean": statistics.fmean(tops),
            "top1_std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
            "top1_min": min(tops), "worst_map_mean": min(per_map),
            "kl_mean": statistics.fmean(r["kl"] for r in rr),
            "steps_mean": statistics.fmean(r["steps"] for r in rr),
            "train_s_mean": statistics.fmean(r["clock"]["student"] for r in rr),
            "teacher_top1_mean": statistics.fmean(r["teacher_top1"] for r in rr)})
    return rows


def format_table(rows: list[dict]) -> str:
    """The summary as Markdown (what the README shows). Wall times are left out: the sweep
    ran on a shared machine, so they measure the load as much as the config."""
    lines = ["| config | overrides of the centre | runs | top-1 % (mean ± std) | worst map | "
             "KL to its teacher |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ov = ", ".join(f"{k}={v}" for k, v in json.loads(r["overrides"]).items()) or "-"
        lines.append(f"| {r['config']} | {ov} | {r['runs']} | {r['top1_mean']:.1f} ± "
                     f"{r['top1_std']:.1f} | {r['worst_map_mean']:.1f} | {r['kl_mean']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4.2))
    xs = range(len(rows))
    ax.bar(xs, [r["top1_mean"] for r in rows], yerr=[r["top1_std"] for r in rows],
           color=["tab:blue" if r["config"] == "centre" else "tab:gray" for r in rows],
           alpha=0.7, capsize=3)
    for i, r in enumerate(rows):
        ys = [x["top1"] for x in runs if x["config"] == r["config"]]
        ax.plot([i] * len(ys), ys, "k.", ms=3)
    zs = [x["zero_top1"] for x in runs]
    ts = [x["teacher_top1"] for x in runs if x["config"] == "centre"]
    if zs:
        ax.axhline(statistics.fmean(zs), color="tab:red", ls=":", lw=1, label="zero-shot")
    if ts:
        ax.axhline(statistics.fmean(ts), color="tab:green", ls="--", lw=1,
                   label="averaged 16-set teacher")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["config"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("eval top-1 % (359 queries)")
    ax.set_ylim(0, 100)
    ax.set_title("m2iv train: one factor at a time around the centre (unseen label maps)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--maps", type=int, default=3, help="number of sweep permutations")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--date", default=None, help="results file date (default today)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from m2iv.data import load_task
    from m2iv.testbed import load_testbed
    from m2iv.testbed.digits_task import make_digits
    from m2iv.testbed.prompts import TestbedPromptBuilder

    out = Path(a.out)
    work = out / "work-sweep"
    work.mkdir(parents=True, exist_ok=True)
    stem = out / f"fidelity-sweep-{a.date or _dt.date.today().isoformat()}"
    doc = json.loads(Path(f"{stem}.json").read_text()) if Path(f"{stem}.json").exists() else {}
    runs = [r for r in doc.get("runs", []) if r["config"] in CONFIGS]
    done = {(r["config"], r["map"], r["seed"]) for r in runs}
    model, _ = load_testbed("1tok")
    builder = TestbedPromptBuilder(model)
    maps = sweep_maps(a.maps)
    t_all = time.time()
    caches: dict = {}
    for mi, perm in enumerate(maps):
        name = f"sweep{mi}"
        if not (work / name / "task.json").exists():
            make_digits(work / name, label_map=perm)
        data = load_task(str(work / name))
        for seed in range(a.seeds):
            for c in a.configs.split(","):
                if (c, name, seed) in done:
                    continue
                ov = CONFIGS[c]
                cache = caches.setdefault((name, seed, ov.get("pool_size")), MemoryCache())
                r = run_one(model, builder, data, cache, ov, seed)
                r.update(config=c, map=name, perm=perm, seed=seed)
                runs.append(r)
                rows = summarise(runs)
                doc = {"command": "python -m benchmarks.fidelity_sweep " + " ".join(
                    argv if argv is not None else sys.argv[1:]),
                       "centre": CENTRE, "configs": CONFIGS, "maps": {f"sweep{i}": m for i, m in enumerate(maps)},
                       "torch_threads": 1, "runs": runs, "summary": rows}
                Path(f"{stem}.json").write_text(json.dumps(doc, indent=1))
                print(f"[sweep] {c} {name} seed {seed}: top-1 {r['top1']:.1f} "
                      f"(zero {r['zero_top1']:.1f}, teacher {r['teacher_top1']:.1f}) KL "
                      f"{r['kl']:.3f} steps {r['steps']} ({r['stop']}) {r['seconds']:.0f}s",
                      flush=True)
    rows = summarise(runs)
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, runs, f"{stem}.png")
    table = format_table(rows)
    Path(f"{stem}.md").write_text(f"<!-- generated by `{doc['command']}` -->\n{table}\n")
    print(table)
    print(f"{time.time() - t_all:.0f} s; wrote {stem}.json/.csv/.md/.png")


if __name__ == "__main__":
    main()
