"""The one-screen summary of a ``make gpu-check`` run, read back from each step's files.

Each reader takes a step's directory and returns a :data:`Result`: one line for the step table
and a few detail lines. Readers only read JSON / JUnit XML / logs (no torch), tolerate
missing columns, and a reader that fails costs its step's line, never the summary.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

Result = tuple[str, list[str]]  # (one line, detail lines)


# ------------------------------------------------------------------------------ helpers

def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Left-aligned text columns."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    line = lambda cells: indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header).rstrip()] + [line(r).rstrip() for r in rows]


def result_rows(step_dir: Path) -> list[dict]:
    """The ``rows`` of every ``{"machine": ..., "rows": [...]}`` file under ``step_dir``."""
    rows: list[dict] = []
    for path in sorted(step_dir.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            rows += [r for r in data["rows"] if isinstance(r, dict)]
    if not rows:
        raise FileNotFoundError(f"no result rows under {step_dir}")
    return rows


def _span(values: list[float]) -> str:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return _fmt(lo) if _fmt(lo) == _fmt(hi) else f"{_fmt(lo)}-{_fmt(hi)}"


# ------------------------------------------------------------------------------ readers

def info(step_dir: Path) -> Result:
    """``python -m m2iv_kernels.info --json``: backends per device, the extension's build."""
    data = json.loads((step_dir / "info.json").read_text())
    devices = data["devices"]
    name = next((k for k in devices if k.startswith("cuda")), "cpu")
    dev = devices[name]
    ext = data.get("extension", {})
    why = dev["backends"].get("ext")
    if why is True:
        built = "built now" if ext.get("built_now") else "built earlier (cached)"
        state = f"ext on {name}: {built} in {_fmt(ext.get('seconds'))} s" + (
            f" (CUDA archs {','.join(ext.get('cuda_archs') or [])})" if ext.get("cuda") else "")
    else:
        state = f"ext unavailable on {name}: {why}"
    details = []
    for dname, entry in devices.items():
        title = dname + (f" ({entry['name']}, sm_{entry['capability'].replace('.', '')})"
                         if "name" in entry else "")
        parts = [f"{b} {'yes' if ok is True else 'no'}" for b, ok in entry["backends"].items()]
        details.append(f"{title}: {', '.join(parts)}; auto -> {entry.get('auto')}")
    if ext.get("cuda_reason") and name.startswith("cuda"):
        details.append(f"extension's CUDA part: {ext['cuda_reason']}")
    return f"{state}; auto -> {dev.get('auto')}", details


def _junit(path: Path) -> tuple[Counter, list[str], Counter]:
    counts: Counter = Counter()
    failed: list[str] = []
    skips: Counter = Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(test)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            skips[(case.find("skipped").get("message") or "").strip()[:110]] += 1
        else:
            counts["passed"] += 1
    return counts, failed, skips


def _pytest_log(path: Path) -> tuple[Counter, list[str], Counter]:
    """Counts from a ``pytest -v`` log (a run killed before it wrote its JUnit file)."""
    counts: Counter = Counter()
    failed = []
    for line in path.read_text(errors="replace").splitlines():
        for word, key in (("PASSED", "passed"), ("FAILED", "failed"), ("ERROR", "failed"),
                          ("SKIPPED", "skipped")):
            if f" {word} " in f" {line} " and "::" in line:
                counts[key] += 1
                if key == "failed":
                    failed.append(next((w for w in line.split() if "::" in w), line))
                break
    return counts, failed, Counter()


def parity(step_dir: Path) -> Result:
    """pytest's JUnit XML (or, for a killed run, its ``-v`` log)."""
    junit = step_dir / "junit.xml"
    partial = not junit.is_file()
    counts, failed, skips = (_pytest_log(step_dir.parent / f"{step_dir.name}.log") if partial
                             else _junit(junit))
    line = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped")) + \
        (" (before it was stopped)" if partial else "")
    details = [f"failed: {t}" for t in failed[:6]] + (
        [f"... and {len(failed) - 6} more"] if len(failed) > 6 else [])
    details += [f"skipped {n}: {why}" for why, n in skips.most_common(3)]
    return line, details


def kernels(step_dir: Path) -> Result:
    """``benchmarks.kernels`` ops rows at their largest row count: the fused op per backend,
    against the unfused sequence and the unsteered layer."""
    rows = [r for r in result_rows(step_dir) if r.get("op") in
            ("head_steer", "steer_add", "steer_add_rmsnorm") and "fused_ms" in r]
    most = max(r["rows"] for r in rows)
    rows = [r for r in rows if r["rows"] == most]
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["backend"] != "torch"))
    keys = list(dict.fromkeys((r["op"], r["D"]) for r in rows))
    by = {(r["op"], r["D"], r["backend"]): r for r in rows}
    header = ["op", "D"] + [f"{b} {c}" for b in backends for c in
                            ("GB/s", "%peak", "x unfused", "/unsteered")]
    body = []
    for op, d in keys:
        cells = [op, str(d)]
        for b in backends:
            r = by.get((op, d, b), {})
            cells += [_fmt(r.get("GB/s")), _fmt(r.get("%peak_HBM"), 2),
                      _fmt(r.get("speedup_vs_unfused")), _fmt(r.get("fused_over_unsteered"))]
        body.append(cells)
    over = [r.get("fused_over_unsteered") for r in rows if r["backend"] != "torch"]
    line = f"{most} rows, {rows[0].get('dtype')}: fused/unsteered {_span(over)}, " \
           f"x unfused {_span([r.get('speedup_vs_unfused') for r in rows])}"
    return line, [f"fused ops at {most} rows (eager calls; benchmarks.kernels):"] + \
        table(header, body)


def bandwidth(step_dir: Path) -> Result:
    """``benchmarks.bandwidth``: % of a measured copy per op, direction, D and backend, as
    ``plain/mask+bank``."""
    rows = result_rows(step_dir)
    copy = next(r for r in rows if r.get("op") == "copy")
    ok = [r for r in rows if r.get("status") == "ok"]
    down = [f"{r['backend']} {r['status']}" for r in rows if r.get("status", "ok") != "ok"
            and r.get("op") != "copy"]
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    shapes = sorted({(r["rows"], r["D"]) for r in ok})
    by = {(r["op"], r["direction"], r["rows"], r["D"], r["backend"], r["variant"]): r
          for r in ok}
    header = ["op", "dir"] + [f"{rows}x{d} {b}" for rows, d in shapes for b in backends]
    body = []
    for op, direction in dict.fromkeys((r["op"], r["direction"]) for r in ok):
        cells = [op, direction]
        for shape in shapes:
            for b in backends:
                got = [by.get((op, direction, *shape, b, v), {}).get("%copy")
                       for v in ("plain", "mask+bank")]
                cells.append("/".join(_fmt(g, 2) for g in got))
        body.append(cells)
    plain = [r["%copy"] for r in ok if r["variant"] == "plain"]
    first = ok[0] if ok else {}
    peak = f", {_fmt(copy['%peak_HBM'], 2)}% of the spec-sheet peak" \
        if copy.get("%peak_HBM") else ""
    line = f"copy {_fmt(copy.get('GB/s'))} GB/s{peak}; kernels at {_span(plain)} % of it " \
           f"(plain, {first.get('timing', '-')})"
    head = f"kernel bandwidth, {first.get('dtype', '-')}: % of the copy, plain/mask+bank"
    return line, [head] + table(header, body) + [f"  {d}" for d in down]


_KEYS = ("case", "phase", "batch", "exec", "tokens", "mode", "compiled")
_SPREAD = ("iqr", "p25", "p75")


def _ratio_keys(rows: list[dict]) -> list[str]:
    """Columns that are ratios (``a/b``), without their spread columns."""
    return list(dict.fromkeys(k for r in rows for k, v in r.items() if "/" in k
                              and isinstance(v, (int, float)) and not isinstance(v, bool)
                              and not any(w in k.lower() for w in _SPREAD)))


def patched(step_dir: Path) -> Result:
    """``benchmarks.patched``: every ratio column of every row, whatever the columns are."""
    rows = result_rows(step_dir)
    keys = _ratio_keys(rows)
    details = []
    for r in rows:
        what = " ".join(f"{k}={r[k]}" for k in _KEYS if r.get(k) not in (None, ""))
        details.append(f"{what}: " + ", ".join(f"{k} {_fmt(r[k])}" for k in keys if k in r))
    spans = ", ".join(f"{k} {_span([r.get(k) for r in rows])}" for k in keys[:3])
    return f"{rows[0].get('preset', '')} {spans} ({len(rows)} cases)", details


def _icl_rows(step_dir: Path) -> list[dict]:
    return [r for r in result_rows(step_dir) if r.get("mode") not in ("multi-task",
                                                                      "steering cost")]


def icl(step_dir: Path) -> Result:
    """``m2iv bench``: zero-shot modes and k-shot ICL, with the M2IV ratios."""
    rows = _icl_rows(step_dir)
    dec = next((k for r in rows for k in r
                if k.startswith("decode_tps_b") and k != "decode_tps_b1"), "decode_tps_b8")
    header = ["mode", "tokens", "prefill ms", "tok/s b1", f"tok/s {dec[11:]}", "peak MiB",
              "KV MiB", "M2IV prefill x", "M2IV mem x"]
    body, beyond = [], []
    for r in rows:
        if r.get("status") != "ok":
            if str(r.get("status", "")).startswith("exceeds context"):
                beyond.append(str(r.get("shots")))
            else:
                body.append([r["mode"], _fmt(r.get("prompt_tokens")), str(r.get("status"))])
            continue
        body.append([r["mode"], _fmt(r.get("prompt_tokens")), _fmt(r.get("prefill_ms")),
                     _fmt(r.get("decode_tps_b1")), _fmt(r.get(dec)), _fmt(r.get("peak_mem_MB")),
                     _fmt(r.get("kv_cache_MB")), _fmt(r.get("m2iv_prefill_speedup")),
                     _fmt(r.get("m2iv_memory_ratio"))])
    body = [b + [""] * (len(header) - len(b)) for b in body]
    details = table(header, body)
    if beyond:
        details.append(f"  {', '.join(beyond)}-shot ICL: beyond the context window")
    icl_ok = [r for r in rows if r.get("m2iv_prefill_speedup")]
    line = "no k-shot ICL row ran (see the table)"
    if icl_ok:
        top = icl_ok[-1]
        line = f"M2IV vs {top['shots']}-shot ICL: prefill {_fmt(top['m2iv_prefill_speedup'])}x " \
               f"faster, {_fmt(top.get('m2iv_memory_ratio'))}x less memory"
    return line, details


def multitask(step_dir: Path) -> Result:
    """``m2iv bench`` multi-task rows: K vectors in one batch against one shared vector and
    against one hook-steered batch per task."""
    rows = [r for r in result_rows(step_dir) if r.get("mode") == "multi-task"]
    header = ["K", "batch", "shared tok/s", "bank tok/s", "per-task tok/s", "bank/shared",
              "per-task/shared"]
    body = [[_fmt(r.get("K")), _fmt(r.get("batch")), _fmt(r.get("shared_vector_tps")),
             _fmt(r.get("bank_fused_tps")), _fmt(r.get("split_per_task_hooks_tps")),
             _fmt(r.get("bank_vs_shared")), _fmt(r.get("split_vs_shared"))]
            if r.get("status") == "ok" else [_fmt(r.get("K")), str(r.get("status"))] + [""] * 5
            for r in rows]
    top = max((r for r in rows if r.get("status") == "ok"), key=lambda r: r["K"])
    line = f"K={top['K']} in one batch: {_fmt(top['bank_vs_shared'])}x the shared-vector " \
           f"throughput (one batch per task: {_fmt(top['split_vs_shared'])}x)"
    return line, table(header, body)


# ------------------------------------------------------------------------------ the screen

def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def render(machine: dict, outcomes, steps, run_dir: Path, seconds: float, dry: bool
           ) -> tuple[str, dict]:
    """The summary text and its JSON form."""
    gpu = machine.get("gpu")
    v = machine["versions"]
    where = (f"{gpu['name']} ({gpu['memory.total']} MiB, driver "
             f"{gpu.get('driver_version', '?')})" if gpu else "no GPU")
    lines = [f"m2iv gpu-check{' DRY RUN' if dry else ''} on {where}, {machine['cpus']} CPUs; "
             f"python {machine['python']}, torch {v.get('torch')}, triton {v.get('triton')}, "
             f"transformers {v.get('transformers')}; commit {machine['commit']}",
             f"results: {run_dir} ({_duration(seconds)}); nvcc: {machine.get('nvcc') or 'none'}"]
    for when, state in (("start", gpu), ("end", machine.get("gpu_at_end"))):
        if state and "clocks.sm" in state:
            lines.append(f"GPU at {when}: SM {state['clocks.sm']}/{state['clocks.max.sm']} MHz, "
                         f"{state['temperature.gpu']} C, {state['power.draw']} W, "
                         f"{state['utilization.gpu']}% busy; other processes: "
                         f"{', '.join(state['other_processes']) or 'none'}")
    if machine.get("missing"):
        lines.append(f"MISSING modules: {', '.join(machine['missing'])} (Makefile GPU_WHEELS)")
    by_name = {s.name: s for s in steps}
    rows, blocks, data = [], [], []
    for o in outcomes:
        step = by_name[o.name]
        line, details = "", []
        if o.status != "skipped":
            try:
                line, details = step.summarize(run_dir / o.name)
            except Exception as err:  # noqa: BLE001 - one unreadable step, not the summary
                line = f"(no results: {type(err).__name__}: {err})"[:160]
        if o.status != "ok":
            line = f"{o.detail}; {line}" if line and not line.startswith("(no results") \
                else o.detail
        rows.append([o.name, o.status.upper() if o.status != "ok" else "ok",
                     f"{o.seconds:.0f} s" if o.status != "skipped" else "-",
                     f"{step.budget_s} s", line[:150]])
        if details:
            blocks += [""] + [f"{o.name}:"] + details
        data.append({**vars(o), "line": line, "details": details})
    lines += [""] + table(["step", "status", "time", "budget", "result"], rows, indent="")
    lines += blocks
    return "\n".join(lines), {"machine": machine, "dry_run": dry, "seconds": seconds,
                              "steps": data}
