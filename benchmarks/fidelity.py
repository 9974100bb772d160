"""Method-fidelity table on the shipped digits testbed (issue 9): zero-shot + M2IV vs k-shot
ICL (random / class-balanced) vs baselines, per setting, several seeds.

    python -m benchmarks.fidelity [--quick] [--seeds N] [--maps heldout0,succ] [--steps 300] [--out DIR]

Only orchestrates the existing APIs/CLI (``m2iv data make-digits``, ``m2iv train``,
``m2iv eval``, ``m2iv.testbed.icl.evaluate_icl``), aggregates, prints a table and plots.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KS = (0, 1, 2, 4, 8, 16)
# name -> (method, shots, pool_size)
TRAINED = {
    "m2iv-8shot": ("m2iv", 8, None),
    "m2iv-16shot": ("m2iv", 16, None),
    "m2iv-manyshot128": ("m2iv", 16, 128),
    "live": ("live", 16, None),
    "mha-only": ("mha-only", 16, None),
    "mlp-only": ("mlp-only", 16, None),
}
SETTING = {"heldout": "a (novel map)", "family": "b (task id)"}


def _setting(map_name: str) -> str:
    return "a" if map_name.startswith("heldout") else "b"


def _m2iv_bin() -> str:
    cand = Path(sys.executable).with_name("m2iv")
    return str(cand) if cand.exists() else "m2iv"


def _run(cmd, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t


def _vector_accs(eval_json: dict) -> dict[str, float]:
    """Pull {row name: accuracy (0..100)} out of an ``m2iv eval`` JSON, whatever its nesting."""
    out = {}
    rows = eval_json.get("rows", eval_json.get("results", eval_json))
    if isinstance(rows, dict):
        rows = [dict(v, name=k) if isinstance(v, dict) else {"name": k, "accuracy": v}
                for k, v in rows.items()]
    for r in rows if isinstance(rows, list) else []:
        if not isinstance(r, dict):
            continue
        name = r.get("name") or r.get("method") or r.get("row")
        acc = r.get("accuracy", r.get("acc", r.get("exact_match")))
        if name is None or not isinstance(acc, (int, float)):
            continue
        out[str(name)] = float(acc) * (100.0 if acc <= 1.0 else 1.0)
    return out


def run_icl(maps, seeds, n_queries=None, contexts=4):
    import torch
    torch.set_num_threads(1)
    from m2iv.testbed import load_testbed
    from m2iv.testbed.icl import evaluate_icl
    model, task = load_testbed("1tok")
    res = {}
    for m in maps:
        res[m] = {"icl-random": {}, "icl-balanced": {}, "ceiling-8shot-x4": []}
        for s in seeds:
            for mode in ("random", "balanced"):
                r = evaluate_icl(model, task, m, ks=KS, balanced=mode == "balanced",
                                 n_queries=n_queries, seed=1000 * s + 17)
                for k, v in r.items():
                    res[m][f"icl-{mode}"].setdefault(str(k), []).append(100 * v)
            c = evaluate_icl(model, task, m, ks=(8,), n_queries=n_queries,
                             seed=1000 * s + 29, contexts=contexts)
            res[m]["ceiling-8shot-x4"].append(100 * c[8])
    return res


def run_trained(maps, seeds, out: Path, steps: int, lr: float, workers: int = 2,
                eval_queries: int | None = None, methods=None):
    """Distil every method for each (map, seed) via the CLI, evaluate with ``m2iv eval``."""
    methods = methods or list(TRAINED)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = str(out / "fidelity-run.log")
    exe = _m2iv_bin()
    for m in maps:
        d = work / f"data-{m}"
        if not (d / "task.json").exists():
            _run([exe, "data", "make-digits", str(d), "--map", m], log)
    results: dict = {m: {} for m in maps}
    partial = out / "fidelity-partial.json"

    def train(job):
        m, s, name = job
        method, shots, pool = TRAINED[name]
        f = work / f"{m}-s{s}-{name}.safetensors"
        if not f.exists():
            cmd = [exe, "train", "--data", str(work / f"data-{m}"), "--model", "testbed-1tok",
                   "--method", method, "--shots", str(shots), "--steps", str(steps),
                   "--lr", str(lr), "--seed", str(s), "--threads", "1", "--no-progress",
                   "--eval-every", "0", "--out", str(f)]
            if pool:
                cmd += ["--pool-size", str(pool)]
            _run(cmd, log)
        return job, f

    for s in seeds:
        for m in maps:
            t0 = time.time()
            jobs = [(m, s, n) for n in methods]
            with ThreadPoolExecutor(workers) as ex:
                files = dict((j[2], f) for j, f in ex.map(train, jobs))
            ej = work / f"{m}-s{s}-eval.json"
            cmd = [exe, "eval", "--data", str(work / f"data-{m}"), "--model", "testbed-1tok",
                   "--threads", "1", "--shots", "0", "--baselines", "mean-activation",
                   "--baseline-shots", "16", "--seed", str(s), "--out", str(ej),
                   "--vectors"] + [f"{n}={f}" for n, f in files.items()]
            if eval_queries:
                cmd += ["--eval-queries", str(eval_queries)]
            _run(cmd, log)
            accs = _vector_accs(json.loads(ej.read_text()))
            for name, v in accs.items():
                results[m].setdefault(name, []).append(v)
            results[m].setdefault("_wall_s", []).append(time.time() - t0)
            partial.write_text(json.dumps(results, indent=1))
            print(f"[fidelity] {m} seed {s}: " + ", ".join(f"{k} {v:.1f}" for k, v in accs.items()),
                  flush=True)
    return results


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
    lines = ["| map | setting | row | k | accuracy % (mean ± std) | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        k = "" if r["k"] is None else str(r["k"])
        acc = "–" if r["mean"] is None else f"{r['mean']:.1f} ± {r['std']:.1f}"
        lines.append(f"| {r['map']} | {r['setting']} | {r['row']} | {k} | {acc} | {r['n']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    maps = sorted({r["map"] for r in rows})
    fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 4.2), squeeze=False)
    for ax, m in zip(axes[0], maps):
        rr = [r for r in rows if r["map"] == m and r["mean"] is not None]
        for name, c in (("icl-random", "k"), ("icl-balanced", "tab:gray")):
            pts = sorted((r["k"], r["mean"], r["std"]) for r in rr if r["row"] == name)
            if pts:
                x = [max(p[0], 0.5) for p in pts]
                y = [p[1] for p in pts]
                sd = [p[2] for p in pts]
                ax.plot(x, y, "o-", color=c, label=name)
                ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                                color=c, alpha=0.2)
        flat = [r for r in rr if r["k"] is None]
        cmap = plt.get_cmap("tab10")
        for i, r in enumerate(flat):
            ax.axhline(r["mean"], color=cmap(i % 10), ls="--" if "m2iv" in r["row"] else ":",
                       lw=1.3, label=f"{r['row']} {r['mean']:.1f}±{r['std']:.1f}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.5, 1, 2, 4, 8, 16])
        ax.set_xticklabels(["0", "1", "2", "4", "8", "16"])
        ax.set_xlabel("ICL shots (0 = zero-shot)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.set_title(f"{m} (setting {_setting(m)})")
        ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path, date: str | None = None) -> dict:
    date = date or _dt.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fidelity-testbed-{date}"
    rows = aggregate(result)
    Path(f"{stem}.json").write_text(json.dumps(dict(result, rows=rows), indent=1))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["map", "setting", "row", "k", "mean", "std", "n"])
        w.writeheader()
        w.writerows(rows)
    plot(rows, f"{stem}.png")
    return {"json": f"{stem}.json", "csv": f"{stem}.csv", "png": f"{stem}.png", "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 map per setting, 1 seed, 60 steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--maps", default="heldout0,succ")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", default=",".join(TRAINED))
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps = 1, 60
    maps = a.maps.split(",")
    seeds = list(range(a.seeds))
    out = Path(a.out)
    t0 = time.time()
    result = {"config": dict(vars(a), maps=maps, seeds=seeds,
                             command="python -m benchmarks.fidelity " + " ".join(argv or sys.argv[1:])),
              "maps": {m: {} for m in maps}}
    icl = run_icl(maps, seeds)
    for m in maps:
        result["maps"][m].update(icl[m])
    files = write(result, out)
    print(format_table(files["rows"]), flush=True)
    tr = run_trained(maps, seeds, out, a.steps, a.lr, a.workers, methods=a.methods.split(","))
    for m in maps:
        for k, v in tr[m].items():
            result["maps"][m][k] = v
    result["wall_s"] = time.time() - t0
    files = write(result, out)
    print(format_table(files["rows"]))
    print(f"wall {result['wall_s']:.0f}s; wrote {files['json']} {files['csv']} {files['png']}")


if __name__ == "__main__":
    main()
