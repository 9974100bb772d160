"""The fidelity table on the shipped digits testbed: zero-shot + M2IV vs k-shot ICL (random and
class-balanced demonstrations) vs the baselines, per label map, several training seeds, every
row scored on the same eval queries.

    python -m benchmarks.fidelity [--quick] [--seeds 3] [--maps heldout0,...] [--out DIR]

Setting (a): the eight held-out permutations ``heldout0`` .. ``heldout7`` (never seen in
pre-training); setting (b): family maps (task identification). Per map and seed:

* ICL rows: :func:`m2iv.train.compare` (greedy generation, exact match) on all 359 eval
  queries, demonstrations drawn with the seed, random and class-balanced;
* trained rows: ``m2iv`` (every :class:`~m2iv.train.TrainConfig` default: the plateau rule
  stops it), ``m2iv-pool128`` (the same with a 128-item pool, the many-shot contrast, on the
  first ``--pool-maps`` maps), and the baselines ``live`` (= M2IV's MLP branch alone under
  the default KL-only loss, so also the MLP-only ablation) and ``mha-only`` with the same
  data, teacher, defaults and stopping rule; ``mean-activation`` (training-free, strength
  tuned on training queries against the same teacher);
* the vector rows are scored by the same :func:`~m2iv.train.compare` on the same queries; the
  query digests of the ICL and vector evaluations are recorded and must be equal.

Teacher outputs are shared in memory by the trained rows of one (map, seed, pool).

Results: ``benchmarks/results/fidelity-testbed-<date>.json`` (every value, per seed),
``.csv`` (mean, std, n per map and row), ``.md`` (the README's tables, generated) and
``.png``; ``--quick`` is a CI-sized smoke run (heldout0 and succ, one seed, 256 train and 120
eval queries, 4 teacher sets, 60 steps: every code path, not meaningful numbers).
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

KS = (0, 1, 2, 4, 8, 16)
HELDOUT = [f"heldout{i}" for i in range(8)]
FAMILY = ["succ", "reverse", "shift5"]
# trained rows: name -> (method, TrainConfig overrides beyond the defaults)
TRAINED = {
    "m2iv": ("m2iv", {}),
    "m2iv-pool128": ("m2iv", {"pool_size": 128}),
    "live": ("live", {}),
    "mha-only": ("mha-only", {}),
}
# "mlp-only" (M2IV's MLP branch alone, M2IV's loss) is not trained here: under the default loss
# (the mimicry KL alone) it is the same run as "live" (same slot, same loss, same seed).
# --quick: a CI-sized smoke run (the numbers mean little; every code path runs)
QUICK_DATA = {"train_size": 256, "eval_size": 120}
QUICK_TRAIN = {"steps": 60, "eval_every": 20, "teacher_sets": 4}
QUICK_KS = (0, 4, 16)


def _setting(map_name: str) -> str:
    return "a" if map_name.startswith("heldout") else "b"


def _vector_accs(eval_json: dict) -> dict[str, float]:
    """``{row name: accuracy %}`` from a :func:`m2iv.train.compare` / ``m2iv eval`` result."""
    return {r["method"]: 100.0 * float(r["accuracy"]) for r in eval_json["rows"]}


def run_map(model, builder, map_name: str, seeds, work: Path, *, quick: bool, pool_rows: bool,
            log) -> dict:
    """Every row of one map: ``{row: [per seed] or {k: [per seed]}}`` plus ``_`` bookkeeping."""
    import torch

    from m2iv.data import load_task
    from m2iv.testbed.digits_task import make_digits
    from m2iv.train import compare, mean_activation_vectors, train_method

    from .fidelity_sweep import MemoryCache

    sizes = QUICK_DATA if quick else {}
    ddir = work / (f"data-{map_name}" + ("-quick" if quick else ""))
    if not (ddir / "task.json").exists():
        make_digits(ddir, label_map=map_name, **sizes)
    data = load_task(str(ddir))
    res: dict = {"icl-random": {}, "icl-balanced": {}, "_query_digest": [], "_train": {}}
    over = QUICK_TRAIN if quick else {}
    ks = QUICK_KS if quick else KS
    for seed in seeds:
        t0 = time.time()
        for mode in ("random", "balanced"):
            r = compare(model, data, builder, ks=ks, seed=seed, balanced=mode == "balanced",
                        batch_size=128)
            res["_query_digest"].append(r["query_digest"])
            for row, k in zip(r["rows"], ks):
                res[f"icl-{mode}"].setdefault(str(k), []).append(100 * row["accuracy"])
        res.setdefault("zero-shot", []).append(res["icl-random"]["0"][-1])
        caches: dict = {}
        vectors = {}
        for name, (method, ov) in TRAINED.items():
            if name == "m2iv-pool128" and not pool_rows:
                continue
            cache = caches.setdefault(ov.get("pool_size"), MemoryCache())
            tr = train_method(method, model, data, builder, seed=seed, progress=False,
                              cache=cache, **over, **ov)
            vectors[name] = tr.vectors
            res["_train"].setdefault(name, []).append(
                {"seed": seed, "steps": tr.steps, "stop": tr.stop_reason,
                 "kept_step": tr.metrics["best_step"], "eval_top1": tr.metrics["eval_top1"],
                 "seconds": tr.metrics["seconds"]})
            log(f"  {map_name} seed {seed} {name}: {tr.steps} steps ({tr.stop_reason}), "
                f"kept {tr.metrics['best_step']}")
        vectors["mean-activation"] = mean_activation_vectors(
            model, data, builder, shots=16, seed=seed,
            teacher_sets=over.get("teacher_sets"))
        r = compare(model, data, builder, vectors=vectors, ks=(), seed=seed, batch_size=128)
        res["_query_digest"].append(r["query_digest"])
        for name, acc in _vector_accs(r).items():
            res.setdefault(name, []).append(acc)
        res.setdefault("_wall_s", []).append(round(time.time() - t0, 1))
        torch.manual_seed(0)
        log(f"{map_name} seed {seed}: " + ", ".join(
            f"{k} {res[k][-1]:.1f}" for k in ("zero-shot", *vectors)) +
            f"; ICL-16 {res['icl-random']['16'][-1]:.1f} / balanced "
            f"{res['icl-balanced']['16'][-1]:.1f} ({res['_wall_s'][-1]:.0f} s)")
    if len(set(res["_query_digest"])) != 1:
        raise RuntimeError(f"{map_name}: ICL and vector rows scored different query sets "
                           f"({set(res['_query_digest'])})")
    res["_eval_queries"] = len(data.eval)
    return res


# ------------------------------------------------------------------ aggregation and output
def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(result: dict) -> list[dict]:
    """Flat rows {map, setting, row, k, mean, std, n} from ``{map: {row: [..] | {k: [..]}}}``."""
    rows = []
    for m, d in result["maps"].items():
        for name, v in d.items():
            if name.startswith("_"):
                continue
            if isinstance(v, dict):
                for k, xs in v.items():
                    mu, sd = _ms(xs)
                    rows.append(dict(map=m, setting=_setting(m), row=name, k=int(k), mean=mu,
                                     std=sd, n=len(xs)))
            else:
                mu, sd = _ms(v)
                rows.append(dict(map=m, setting=_setting(m), row=name, k=None, mean=mu, std=sd,
                                 n=len(v)))
    return rows


def format_table(rows: list[dict]) -> str:
    """Every aggregated row, one per line."""
    lines = ["| map | setting | row | k | accuracy % (mean ± std) | seeds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        k = "" if r["k"] is None else str(r["k"])
        acc = "–" if r["mean"] is None else f"{r['mean']:.1f} ± {r['std']:.1f}"
        lines.append(f"| {r['map']} | {r['setting']} | {r['row']} | {k} | {acc} | {r['n']} |")
    return "\n".join(lines)


def _get(rows, m, row, k=None):
    for r in rows:
        if r["map"] == m and r["row"] == row and r["k"] == k:
            return r
    return None


# the columns of the README table: (label, row, k)
COLUMNS = [("zero-shot", "zero-shot", None), ("ICL-16 random", "icl-random", 16),
           ("ICL-16 balanced", "icl-balanced", 16), ("**M2IV**", "m2iv", None),
           ("M2IV pool 128", "m2iv-pool128", None), ("LIVE = MLP-only", "live", None),
           ("MHA-only", "mha-only", None), ("mean-act.", "mean-activation", None)]


def readme_tables(rows: list[dict]) -> str:
    """The README's fidelity table (one line per map, mean ± std over seeds) and the mean
    over each setting's maps."""
    maps = list(dict.fromkeys(r["map"] for r in rows))
    cols = [c for c in COLUMNS if any(r["row"] == c[1] for r in rows)]
    out = ["| map (setting) | " + " | ".join(c[0] for c in cols) + " | seeds |",
           "|---|" + "---:|" * len(cols) + "---:|"]

    def cell(r):
        return "–" if r is None or r["mean"] is None else f"{r['mean']:.1f} ± {r['std']:.1f}"

    for m in maps:
        rs = [_get(rows, m, row, k) for _, row, k in cols]
        n = max((r["n"] for r in rs if r is not None), default=0)
        out.append(f"| {m} ({_setting(m)}) | " + " | ".join(cell(r) for r in rs) + f" | {n} |")
    for s in ("a", "b"):
        ms = [m for m in maps if _setting(m) == s]
        if len(ms) < 2:
            continue
        cells = []
        for _, row, k in cols:
            vals = [r["mean"] for m in ms if (r := _get(rows, m, row, k)) and r["mean"] is not None]
            cells.append(f"**{statistics.fmean(vals):.1f}**" if len(vals) == len(ms) else "–")
        out.append(f"| mean of {len(ms)} maps ({s}) | " + " | ".join(cells) + " | |")
    return "\n".join(out)


def checks(rows: list[dict]) -> dict:
    """The acceptance criteria (M2IV vs its own ICL-16 per map and on average, the seed
    spread, M2IV vs LIVE and mean-activation, many-shot vs balanced ICL, setting (b)),
    evaluated on the aggregated rows."""
    maps_a = sorted({r["map"] for r in rows if r["setting"] == "a"})
    out: dict = {}

    def mean(m, row, k=None):
        r = _get(rows, m, row, k)
        return None if r is None else r["mean"]

    if maps_a and all(mean(m, "m2iv") is not None for m in maps_a):
        gap = {m: mean(m, "m2iv") - mean(m, "icl-random", 16) for m in maps_a}
        out["a_mean_m2iv"] = statistics.fmean(mean(m, "m2iv") for m in maps_a)
        out["a_mean_icl16_random"] = statistics.fmean(mean(m, "icl-random", 16) for m in maps_a)
        out["a_m2iv_ge_icl16_on_average"] = out["a_mean_m2iv"] >= out["a_mean_icl16_random"]
        out["a_gap_to_icl16_per_map"] = gap
        out["a_no_map_more_than_2_below_icl16"] = min(gap.values()) >= -2.0
        stds = {m: _get(rows, m, "m2iv")["std"] for m in maps_a if _get(rows, m, "m2iv")["n"] >= 3}
        out["a_seed_std_m2iv"] = stds
        out["a_three_seeds_std_le_3_on_3_maps"] = sum(s <= 3.0 for s in stds.values()) >= 3
        for base in ("live", "mean-activation"):
            if all(mean(m, base) is not None for m in maps_a):
                out[f"a_m2iv_above_{base}_every_map"] = all(
                    mean(m, "m2iv") > mean(m, base) for m in maps_a)
        pool = [m for m in maps_a if mean(m, "m2iv-pool128") is not None]
        if pool:
            out["manyshot_pool128_vs_icl16_balanced"] = {
                m: [mean(m, "m2iv-pool128"), mean(m, "icl-balanced", 16)] for m in pool}
            out["manyshot_pool128_ge_icl16_balanced_on_average"] = (
                statistics.fmean(mean(m, "m2iv-pool128") for m in pool)
                >= statistics.fmean(mean(m, "icl-balanced", 16) for m in pool))
            out["m2iv_default_pool_ge_icl16_balanced_on_average"] = (
                out["a_mean_m2iv"] >= statistics.fmean(mean(m, "icl-balanced", 16)
                                                       for m in maps_a))
    maps_b = sorted({r["map"] for r in rows if r["setting"] == "b"})
    if maps_b and all(mean(m, "m2iv") is not None for m in maps_b):
        out["b_m2iv_vs_icl16_random"] = {m: [mean(m, "m2iv"), mean(m, "icl-random", 16)]
                                         for m in maps_b}
        out["b_no_map_more_than_2_below_icl16"] = all(
            mean(m, "m2iv") - mean(m, "icl-random", 16) >= -2.0 for m in maps_b)
    return out


def icl_table(rows: list[dict]) -> str:
    """ICL accuracy by the number of demonstrations: per setting, the mean over its maps of the
    per-map mean over seeds, random and class-balanced demonstrations."""
    settings = [s for s in ("a", "b") if any(r["setting"] == s for r in rows)]
    ks = sorted({r["k"] for r in rows if r["row"] == "icl-random" and r["k"] is not None})
    cols = [(s, mode) for s in settings for mode in ("random", "balanced")]
    out = ["| shots | " + " | ".join(f"ICL {mode} ({s})" for s, mode in cols) + " |",
           "|---:|" + "---:|" * len(cols)]
    for k in ks:
        cells = []
        for s, mode in cols:
            vals = [r["mean"] for r in rows if r["setting"] == s and r["row"] == f"icl-{mode}"
                    and r["k"] == k and r["mean"] is not None]
            cells.append(f"{statistics.fmean(vals):.1f}" if vals else "–")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def checks_list(c: dict) -> str:
    """The acceptance criteria of :func:`checks` as a Markdown list with their numbers."""
    def yes(flag):
        return "**yes**" if flag else "**no**"
    out = []
    if "a_mean_m2iv" in c:
        gaps = c["a_gap_to_icl16_per_map"]
        worst = min(gaps, key=gaps.get)
        out.append(f"- (a) zero-shot + M2IV {c['a_mean_m2iv']:.1f} vs ICL-16 random "
                   f"{c['a_mean_icl16_random']:.1f} on average over {len(gaps)} maps: >= "
                   f"{yes(c['a_m2iv_ge_icl16_on_average'])}")
        out.append(f"- (a) no map more than 2 points below its ICL-16: "
                   f"{yes(c['a_no_map_more_than_2_below_icl16'])} (smallest gap "
                   f"{gaps[worst]:+.1f} on {worst})")
        stds = c["a_seed_std_m2iv"]
        if stds:
            out.append(f"- (a) M2IV seed std <= 3 points on >= 3 maps with 3 seeds: "
                       f"{yes(c['a_three_seeds_std_le_3_on_3_maps'])} ("
                       f"{sum(s <= 3 for s in stds.values())} of {len(stds)} maps; largest "
                       f"{max(stds.values()):.1f})")
        for base in ("live", "mean-activation"):
            if f"a_m2iv_above_{base}_every_map" in c:
                out.append(f"- (a) M2IV above {base} on every map: "
                           f"{yes(c[f'a_m2iv_above_{base}_every_map'])}")
    if "manyshot_pool128_vs_icl16_balanced" in c:
        pairs = c["manyshot_pool128_vs_icl16_balanced"]
        pool = statistics.fmean(p[0] for p in pairs.values())
        bal = statistics.fmean(p[1] for p in pairs.values())
        out.append(f"- many-shot (pool 128) {pool:.1f} vs class-balanced ICL-16 {bal:.1f} on "
                   f"{', '.join(pairs)}: >= "
                   f"{yes(c['manyshot_pool128_ge_icl16_balanced_on_average'])}")
    if "b_m2iv_vs_icl16_random" in c:
        pairs = c["b_m2iv_vs_icl16_random"]
        out.append("- (b) M2IV vs ICL-16 random: " + ", ".join(
            f"{m} {p[0]:.1f} vs {p[1]:.1f}" for m, p in pairs.items())
            + f"; none more than 2 points below: {yes(c['b_no_map_more_than_2_below_icl16'])}")
    return "\n".join(out)


def plot(rows: list[dict], path) -> None:
    """Grouped bars per map: zero-shot, ICL-16 (random, balanced), M2IV and the baselines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = list(dict.fromkeys(r["map"] for r in rows))
    cols = [c for c in COLUMNS if any(r["row"] == c[1] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(maps) * len(cols) / 4), 4.5))
    w = 0.8 / max(len(cols), 1)
    cmap = plt.get_cmap("tab10")
    for j, (label, row, k) in enumerate(cols):
        xs, ys, es = [], [], []
        for i, m in enumerate(maps):
            r = _get(rows, m, row, k)
            if r is not None and r["mean"] is not None:
                xs.append(i + (j - (len(cols) - 1) / 2) * w)
                ys.append(r["mean"])
                es.append(r["std"])
        ax.bar(xs, ys, w, yerr=es, capsize=2, color=cmap(j % 10),
               label=label.replace("*", ""), alpha=0.85)
    ax.set_xticks(range(len(maps)))
    ax.set_xticklabels([f"{m}\n({_setting(m)})" for m in maps], fontsize=8)
    ax.set_ylabel("accuracy % (359 eval queries)")
    ax.set_ylim(0, 100)
    ax.set_title("digits testbed: zero-shot + vectors vs 16-shot ICL (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=min(len(cols), 5), loc="lower center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path, date: str | None = None) -> dict:
    """Write JSON (every value), CSV (aggregates), Markdown (the README tables) and PNG."""
    date = date or _dt.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fidelity-testbed-{date}"
    rows = aggregate(result)
    Path(f"{stem}.json").write_text(json.dumps(dict(result, rows=rows, checks=checks(rows)),
                                               indent=1))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["map", "setting", "row", "k", "mean", "std", "n"])
        w.writeheader()
        w.writerows(rows)
    cmd = result.get("config", {}).get("command", "python -m benchmarks.fidelity")
    Path(f"{stem}.md").write_text(
        f"<!-- generated by `{cmd}` -->\n{readme_tables(rows)}\n\nICL accuracy (%) by shots, "
        f"mean over each setting's maps:\n\n{icl_table(rows)}\n\nAcceptance checks:\n\n"
        f"{checks_list(checks(rows))}\n")
    plot(rows, f"{stem}.png")
    return {"json": f"{stem}.json", "csv": f"{stem}.csv", "md": f"{stem}.md",
            "png": f"{stem}.png", "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run (see the module docstring)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--maps", default=",".join(HELDOUT + FAMILY))
    p.add_argument("--pool-maps", type=int, default=3,
                   help="the first N held-out maps also get the m2iv-pool128 row")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--date", default=None)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from m2iv.testbed import load_testbed
    from m2iv.testbed.prompts import TestbedPromptBuilder

    if a.quick:
        a.seeds, a.maps, a.pool_maps = 1, "heldout0,succ", 0
    maps = a.maps.split(",")
    out = Path(a.out)
    work = out / "work-fidelity"
    work.mkdir(parents=True, exist_ok=True)
    date = a.date or _dt.date.today().isoformat()
    partial = out / f"fidelity-testbed-{date}.json"
    cmd = "python -m benchmarks.fidelity " + " ".join(argv if argv is not None
                                                      else sys.argv[1:])
    result = {"config": dict(vars(a), maps=maps, command=cmd.strip()), "maps": {}}
    if partial.exists() and not a.quick:  # resume: keep finished maps
        old = json.loads(partial.read_text())
        result["maps"] = {m: v for m, v in old["maps"].items() if m in maps}
        result["wall_s"] = old.get("wall_s", 0.0)
    model, _ = load_testbed("1tok")
    builder = TestbedPromptBuilder(model)
    t0 = time.time()

    def log(msg):
        print(f"[fidelity] {msg}", flush=True)

    held = [m for m in maps if _setting(m) == "a"]
    for m in maps:
        if m in result["maps"]:
            continue
        result["maps"][m] = run_map(model, builder, m, list(range(a.seeds)), work,
                                    quick=a.quick, pool_rows=m in held[:a.pool_maps], log=log)
        result["wall_s"] = result.get("wall_s", 0.0) + time.time() - t0
        t0 = time.time()
        files = write(result, out, date)
    files = write(result, out, date)
    print(readme_tables(files["rows"]))
    print(json.dumps(checks(files["rows"]), indent=1))
    print(f"wall {result.get('wall_s', 0):.0f} s; wrote {files['json']} {files['csv']} "
          f"{files['md']} {files['png']}")


if __name__ == "__main__":
    main()
