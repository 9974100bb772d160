"""``make gpu-check``: what the first GPU hour must measure, in one command, under 10 minutes.

    python3 -m benchmarks.gpu_check [--out DIR] [--deadline S] [--only STEP ...] [--archive DIR]
    python3 -m benchmarks.gpu_check --dry-run      # the same plumbing, tiny shapes, on the CPU
    python3 -m benchmarks.gpu_check --list         # the steps, their commands and times
    make gpu-check  |  make gpu-check DRY_RUN=1

The steps of :data:`STEPS` run in order, each as its own process with its own timeout, on the
machine's own Python stack (written for Python 3.12, torch 2.11, triton 3.6, transformers
5.17 and no network; ``make gpu-wheels`` prepares the few packages that stack lacks). A step
that fails or overruns is recorded and the next one starts. Everything goes to one directory,
``benchmarks/results/gpu-check-<gpu>-<date>/`` (a dry run: ``runs/gpu-check-dry-run-<date>/``):
each step's result files and log, ``status.json`` (rewritten after every step), and
``summary.txt`` / ``summary.json``, the one-screen summary printed at the end. ``--archive
DIR`` also packs that directory as ``DIR/<name>.tar.gz`` and copies ``summary.txt`` there
(how results leave a lent GPU machine: README, "On a GPU").

Time. Each step has an expected time and a budget (its timeout), and the run a deadline
(``--deadline``, 550 s on a GPU): a step may run for its budget as far as the time left
allows after reserving the expected times of the steps after it, and at least for its own
expected time while the deadline allows; a step left with under half its expected time is
skipped. Steps are ordered by value, so a slow machine loses the last ones, never the run.
If the extension's build (``info``) overruns, the later steps run without it
(``M2IV_EXT=0``), since a killed build leaves a lock that would stall them.

Expected runtime on an H200: about 8.6 minutes (515 s of steps), estimated from the work each
step does (no step has run on a GPU yet; the first run's summary prints each step's time).
Rates used: a 7B LLaVA's eager decode step is bound by the host, ~15-20 ms a token for 32
layers (``m2iv.bench.icl.decode_seconds`` on the llava-1.5-7b preset shrunk to width 64 took
15 ms a step of Python and dispatch on the 2-core development CPU), not by reading its 14 GB
of weights (3.3 ms at 4.3 TB/s); a 7B prefill of N tokens costs 2 x 6.7e9 x N FLOPs at ~600
TFLOP/s (14 ms at 601 tokens, ~25 ms with the host); ``triton.testing.do_bench`` makes at
least 8 calls per timing.

* ``info`` (60 s): builds the C++/CUDA extension just in time (4 translation units compiled in
  parallel: the torch-free ``m2iv_cuda.cu`` took 22 s with nvcc for sm_90 here, each
  torch-header C++ unit ~35 s), then times ``auto``'s choice once.
* ``parity`` (105 s): the 273 ``gpu``-marked tests (252 kernel parity cases on tiny tensors,
  CUDA-graph capture, 12 Inductor compiles, 3 steered tiny HF models compiled with Inductor
  and captured as CUDA graphs), 8 pytest-xdist workers. The cost is compiling: the Triton
  half of these tests launches 262 distinct kernel specializations (counted on the CPU run of
  the same tests), each JIT-compiled once per worker that meets it first, at ~1 core-second
  each (the CI compile report builds 180 binaries in 1.5 min on 2 cores): ~400 core-seconds
  over 8 workers; Inductor ~10 s a test; a steered model's prefill and decode graphs with
  ``mode="reduce-overhead"`` ~20-30 s on one worker beside the others (+15 s of wall time).
* ``kernels`` (40 s): ``benchmarks.kernels`` ops part, bf16, 7 shapes x 3 ops, each case
  timing its variants (unfused, unsteered, triton, ext, torch) interleaved for a 0.4 s budget
  (5 to 41 repetitions of ~2 ms samples): ~0.5 s a case = 11 s; the traffic model; ~20 new
  Triton specializations at ~1 s each; start-up ~8 s.
* ``bandwidth`` (45 s): ``benchmarks.bandwidth``, 7 cases x 2 variants x 2 shapes x 2
  backends = 56 graph-timed cases of ~0.2 s, plus ~36 Triton specializations at these shapes.
* ``patched`` (60 s): ``benchmarks.patched --batch 1 8 --reps 5 --steps 16 --eager-only`` on
  LLaVA-1.5-7B (random bf16 weights, 7.06B parameters, built on the GPU in ~10 s): unsteered,
  fused and hooks interleaved. Prefill (601 tokens): 6 rounds x 3 modes of >= 50 ms samples
  at batch 1 (~30 ms a forward) and batch 8 (~150 ms) = ~5 s with the warm-up; decode: 7
  lockstep rounds (2 warm-up) x 3 modes of a 17-token ``generate`` (~0.4 s at batch 1, ~0.5 s
  at batch 8 with its prefill) = ~20 s; ~8 Triton specializations of the steering kernels;
  start-up ~8 s. Compiled mode is left out: each mode's twin compiles its own prefill and
  decode graphs per batch size (12 Inductor compiles of a 32-layer model, minutes), which
  would not fit; ``--compiled-only --batch 1 --phases decode`` measures it in its own call.
* ``icl`` (60 s): ``m2iv bench --overhead none`` (the steering cost is the ``patched``
  step's) on LLaVA-1.5-7B, 16 decode steps: per mode a prefill timing
  (0.5 s budget) and 3+3 generations at batch 1 and 8; modes a, b, c (601 tokens, ~3 s each)
  and 1-, 2-, 4-shot ICL (1,209 / 1,817 / 3,033 tokens, 3.5-6.5 s); 8 to 128 shots exceed the
  4,096-token context and are recorded as such; build and warm-up ~20 s.
* ``multitask`` (145 s): ``m2iv bench`` multi-task decode at batch 256 (128 on a GPU under
  120 GiB: 256 sequences of 605 tokens hold 82 GB of KV cache), K = 1, 4, 32, 256, 4 decode
  steps. Each measurement at batch 256 first prefills 256 x 601 tokens (2.5e15 FLOPs, ~4 s):
  4 for the shared vector, 3 per K for the bank = 16 (~70 s); one batch per task is 256
  generations of ~0.12 s for K = 256 (~32 s) and ~13 s for K = 1, 4, 32 together; the
  a/b/c/1-shot modes and the build ~30 s.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import gpu_summary

ROOT = Path(__file__).resolve().parents[1]
GPU_DEADLINE_S = 550  # a device command is stopped at 600 s: room for installs, kills, archive
DRY_DEADLINE_S = 1800  # generous: the steps' expected times are a GPU's


@dataclass(frozen=True)
class Step:
    """One command of the check: ``python -m <argv>`` on a GPU, ``python -m <dry>`` in a dry
    run. ``{name}`` arguments are filled in by :func:`values` (``{out}``: the step's own
    directory). ``optional`` arguments are added only where their module is installed."""

    name: str
    argv: tuple[str, ...]
    dry: tuple[str, ...]
    expected_s: int
    budget_s: int
    summarize: Callable[[Path], gpu_summary.Result]
    optional: dict[str, tuple[str, ...]] = field(default_factory=dict)
    stdout: str | None = None  # file in the step's directory that gets stdout (else the log)


_PYTEST = ("-v", "-rfEs", "-p", "no:cacheprovider", "--junitxml", "{out}/junit.xml")
# the steering cost is the patched step's: m2iv bench without its own (--overhead none)
_LLAVA = ("m2iv.cli", "bench", "--preset", "llava-1.5-7b", "--overhead", "none")
_TINY_BENCH = ("m2iv.cli", "bench", "--preset", "cpu-tiny", "--smoke", "--overhead", "none",
               "--out", "{out}")

# THE table: every command the check runs (see the module docstring for the times).
STEPS: tuple[Step, ...] = (
    Step("info", ("m2iv_kernels.info", "--json"), ("m2iv_kernels.info", "--json"),
         60, 150, gpu_summary.info, stdout="info.json"),
    Step("parity", ("pytest", "tests", "-m", "gpu", *_PYTEST),
         ("pytest", "tests/ops/test_ops.py", "tests/ops/test_gpu.py",
          "-k", "bit_identical or capture", *_PYTEST),
         105, 150, gpu_summary.parity,
         optional={"xdist": ("-n", "8"), "pytest_timeout": ("--timeout", "240")}),
    Step("kernels", ("benchmarks.kernels", "--dtype", "bf16", "--only", "ops", "traffic",
                     "--out", "{out}"),
         ("benchmarks.kernels", "--device", "cpu", "--quick", "--dtype", "fp32", "--only", "ops",
          "traffic", "--out", "{out}"),
         40, 90, gpu_summary.kernels),
    Step("bandwidth", ("benchmarks.bandwidth", "--shapes", "4096x4096", "4096x8192",
                       "--dtype", "bf16", "--out", "{out}"),
         ("benchmarks.bandwidth", "--device", "cpu", "--shapes", "64x256", "--budget", "0.02",
          "--copy-mb", "4", "--out", "{out}"),
         45, 90, gpu_summary.bandwidth),
    Step("patched", ("benchmarks.patched", "--preset", "llava-1.5-7b", "--batch", "1", "8",
                     "--reps", "5", "--steps", "16", "--eager-only", "--out", "{out}"),
         ("benchmarks.patched", "--preset", "cpu-tiny", "--device", "cpu", "--smoke",
          "--eager-only", "--out", "{out}"),
         60, 120, gpu_summary.patched),
    Step("icl", (*_LLAVA, "--set", "decode_steps=16", "--budget", "0.5", "--tasks", "1",
                 "--multitask-batch", "1", "--out", "{out}"),
         (*_TINY_BENCH, "--set", "text.num_hidden_layers=2"), 60, 150, gpu_summary.icl),
    Step("multitask", (*_LLAVA, "--set", "decode_steps=4", "--budget", "0.2", "--shots", "1",
                       "--tasks", "{tasks}", "--multitask-batch", "{batch}", "--out", "{out}"),
         (*_TINY_BENCH, "--no-plots", "--set", "text.num_hidden_layers=1"), 145, 210,
         gpu_summary.multitask),
)


def values(out: Path, gpu_mem_gib: float | None) -> dict[str, list[str]]:
    """What each ``{name}`` argument of :data:`STEPS` stands for."""
    batch = 256 if gpu_mem_gib is None or gpu_mem_gib >= 120 else 128
    return {"out": [str(out)], "batch": [str(batch)], "tasks": ["1", "4", "32", str(batch)]}


def command(step: Step, dry: bool, out: Path, gpu_mem_gib: float | None) -> list[str]:
    """The full command line of ``step``."""
    vals = values(out, gpu_mem_gib)
    argv: list[str] = []
    for arg in step.dry if dry else step.argv:
        key = arg[1:-1] if arg.startswith("{") and arg.endswith("}") else None
        if key in vals:
            argv += vals[key]
        else:
            argv.append(arg.replace("{out}", str(out)))
    for module, extra in step.optional.items():
        if importlib.util.find_spec(module) is not None:
            argv += extra
    return [sys.executable, "-m", *argv]


# ------------------------------------------------------------------------------ the machine

REQUIRED = ("torch", "triton", "transformers", "safetensors", "tqdm", "numpy", "pytest")
OPTIONAL = {"ninja": "the C++/CUDA extension's build", "matplotlib": "the plots",
            "xdist": "parallel parity tests", "pytest_timeout": "per-test timeouts"}
VERSIONS = ("torch", "triton", "transformers", "numpy", "safetensors", "pytest", "pytest-xdist",
            "matplotlib", "ninja", "gguf")


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _commit() -> str:
    """The commit of the checkout; where no ``.git`` travelled, the stamp ``make gpu-wheels``
    left in ``.whl/commit``."""
    head = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if head:
        dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
        return head + (" (uncommitted changes)" if dirty else "")
    stamp = ROOT / ".whl" / "commit"
    return (stamp.read_text().strip() + " (stamped by make gpu-wheels)") if stamp.is_file() \
        else "unknown"


_SMI_FIELDS = ("name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
               "temperature.gpu,power.draw,utilization.gpu")


def gpu_state(ask_torch: bool = False) -> dict | None:
    """The first GPU as nvidia-smi sees it now (clocks, temperature, load, other processes),
    or None without one. Read, never set: the card is measured as found. With an nvidia-smi
    that knows fewer fields, or none (then, with ``ask_torch``, torch), what they tell."""
    fields = _SMI_FIELDS
    smi = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if not smi:
        fields = "name,memory.total"
        smi = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if not smi and ask_torch:
        smi = _run([sys.executable, "-c", "import torch; p = torch.cuda.get_device_properties(0)"
                    "; print(p.name, p.total_memory // 2**20, sep=',')"], timeout=120)
    if not smi:
        return None
    gpu = dict(zip(fields.split(","), (v.strip() for v in smi.splitlines()[0].split(","))))
    apps = _run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"])
    gpu["other_processes"] = apps.splitlines() if apps else []
    gpu["count"] = len(smi.splitlines())
    return gpu


def machine(ask_torch: bool = False) -> dict:
    """What runs here (without importing torch, unless ``ask_torch`` and nvidia-smi is
    missing): the GPU, nvcc, the Python stack, and which modules the steps need are missing."""
    gpu = gpu_state(ask_torch)
    nvcc = _run(["nvcc", "--version"])
    versions = {}
    for dist in VERSIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    release = [ln.strip() for ln in (nvcc or "").splitlines() if "release" in ln]
    return {"gpu": gpu, "nvcc": release[0] if release else None,
            "python": platform.python_version(),
            "host": platform.node(), "cpus": os.cpu_count(), "versions": versions,
            "missing": [m for m in REQUIRED if importlib.util.find_spec(m) is None],
            "missing_optional": {m: why for m, why in OPTIONAL.items()
                                 if importlib.util.find_spec(m) is None},
            "commit": _commit(), "started": dt.datetime.now().isoformat(timespec="seconds")}


def gpu_tag(info: dict) -> str:
    """``h200`` for an 'NVIDIA H200' (the name ``m2iv.bench.common.device_tag`` gives)."""
    name = info["gpu"]["name"] if info.get("gpu") else "cpu"
    return name.replace("NVIDIA ", "").replace(" ", "-").lower()


def gpu_mem_gib(info: dict) -> float | None:
    try:
        return float(info["gpu"]["memory.total"]) / 1024  # MiB
    except (TypeError, KeyError, ValueError):
        return None


# ------------------------------------------------------------------------------ running

@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    timeout_s: float = 0.0
    detail: str = ""  # exit status, why skipped, or the last line of the log
    command: list[str] = field(default_factory=list)


def _last_line(log: Path) -> str:
    try:
        text = log.read_bytes()[-4000:].decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def run_step(cmd: list[str], step_dir: Path, log: Path, stdout: str | None, timeout: float,
             env: dict) -> tuple[str, float, str]:
    """Run one command in its own process group; (status, seconds, detail)."""
    step_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("w") as log_file:
        log_file.write("$ " + " ".join(cmd) + "\n")
        log_file.flush()
        out = (step_dir / stdout).open("w") if stdout else log_file
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=log_file,
                                    start_new_session=True)
            rc = proc.wait(timeout=timeout)
        except OSError as err:
            return "failed", time.monotonic() - t0, f"could not start: {err}"
        except subprocess.TimeoutExpired:
            _kill(proc)
            return "timeout", time.monotonic() - t0, f"killed after {timeout:.0f} s"
        except KeyboardInterrupt:  # its own session does not see the terminal's Ctrl-C
            _kill(proc)
            raise
        finally:
            if out is not log_file:
                out.close()
    seconds = time.monotonic() - t0
    if rc == 0:
        return "ok", seconds, ""
    return "failed", seconds, f"exit {rc}: {_last_line(log)}"


def _kill(proc: subprocess.Popen) -> None:
    """The step and everything it started (pytest workers, ninja, nvcc)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child_env(dry: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests set it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    env.update(PYTHONUNBUFFERED="1", M2IV_DEBUG="1", TQDM_MININTERVAL="10")
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run checks the CPU plumbing, GPU or not
    return env


def timeout_for(step: Step, left: float, later: list[Step]) -> float | None:
    """Seconds ``step`` may run with ``left`` seconds to the deadline, or None: skip it."""
    if left < step.expected_s / 2:
        return None
    reserve = sum(s.expected_s for s in later)
    return min(step.budget_s, max(left - reserve, min(step.expected_s, left)))


def unique_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``...: never write into an earlier run."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def run(steps: list[Step], run_dir: Path, dry: bool, deadline_s: float, info: dict,
        say: Callable[[str], None] = lambda text: print(text, flush=True)
        ) -> list[Outcome]:
    run_dir.mkdir(parents=True)
    end = time.monotonic() + deadline_s
    env = child_env(dry)
    outcomes: list[Outcome] = []
    for i, step in enumerate(steps):
        left = end - time.monotonic()
        cmd = command(step, dry, run_dir / step.name, gpu_mem_gib(info))
        timeout = timeout_for(step, left, steps[i + 1:])
        if timeout is None:
            outcome = Outcome(step.name, "skipped", command=cmd,
                              detail=f"{left:.0f} s left before the deadline; it needs "
                                     f"~{step.expected_s} s")
        else:
            say(f"[{i + 1}/{len(steps)}] {step.name}: up to {timeout:.0f} s "
                f"(expected ~{step.expected_s} s)")
            status, seconds, detail = run_step(cmd, run_dir / step.name,
                                               run_dir / f"{step.name}.log", step.stdout,
                                               timeout, env)
            outcome = Outcome(step.name, status, seconds, timeout, detail, cmd)
            if step.name == "info" and status == "timeout":
                env["M2IV_EXT"] = "0"
                outcome.detail += "; later steps run without the extension (M2IV_EXT=0)"
        say(f"    {outcome.name}: {outcome.status}"
            + (f" in {outcome.seconds:.0f} s" if outcome.status != "skipped" else "")
            + (f" ({outcome.detail})" if outcome.detail else ""))
        outcomes.append(outcome)
        _write_json(run_dir / "status.json", {"machine": info, "dry_run": dry,
                                              "steps": [vars(o) for o in outcomes]})
    return outcomes


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def archive(run_dir: Path, dest: Path) -> Path:
    """``dest/<run name>.tar.gz`` of the run directory (extract it in benchmarks/results/),
    and ``dest/summary.txt``."""
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / f"{run_dir.name}.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(run_dir, arcname=run_dir.name)
    shutil.copy2(run_dir / "summary.txt", dest / "summary.txt")
    return tgz


def list_steps(dry: bool) -> None:
    out = Path("{out}")
    total = 0
    for step in STEPS:
        total += step.expected_s
        extra = "".join(f" [{' '.join(args)} with {module}]"
                        for module, args in step.optional.items())
        print(f"{step.name:10s} expected {step.expected_s:4d} s, budget {step.budget_s:4d} s: "
              + " ".join(command(step, dry, out / step.name, None)[1:]) + extra)
    print(f"{'':10s} expected {total:4d} s in all")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="every step on tiny shapes on the CPU (CI runs this)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default benchmarks/results/gpu-check-<gpu>-<date>, "
                        "a dry run runs/gpu-check-dry-run-<date>; never an existing one)")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds for all steps (default {GPU_DEADLINE_S}; dry run "
                        f"{DRY_DEADLINE_S})")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], default=None,
                   help="run only these steps")
    p.add_argument("--archive", type=Path, default=None, metavar="DIR",
                   help="also write DIR/<run>.tar.gz and DIR/summary.txt")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    args = p.parse_args(argv)
    if args.list:
        list_steps(args.dry_run)
        return 0
    info = machine(ask_torch=not args.dry_run)
    if not args.dry_run and info["gpu"] is None:
        print("gpu-check: no NVIDIA GPU here (neither nvidia-smi nor torch sees one); on a "
              "machine without one run the dry run: make gpu-check DRY_RUN=1 (python -m "
              "benchmarks.gpu_check --dry-run)", file=sys.stderr)
        return 2
    date = dt.date.today().isoformat()
    default = (ROOT / "runs" / f"gpu-check-dry-run-{date}" if args.dry_run else
               ROOT / "benchmarks" / "results" / f"gpu-check-{gpu_tag(info)}-{date}")
    run_dir = unique_dir(args.out or default)
    steps = [s for s in STEPS if args.only is None or s.name in args.only]
    deadline = args.deadline or (DRY_DEADLINE_S if args.dry_run else GPU_DEADLINE_S)
    print(f"m2iv gpu-check{' (dry run)' if args.dry_run else ''}: {len(steps)} steps, "
          f"deadline {deadline:.0f} s, results in {run_dir}", flush=True)
    if info["missing"]:
        print(f"  missing modules: {', '.join(info['missing'])} (add their wheels to GPU_WHEELS "
              "in the Makefile; see README, On a GPU)")
    t0 = time.monotonic()
    outcomes = run(steps, run_dir, args.dry_run, deadline, info)
    info["gpu_at_end"] = gpu_state()
    text, data = gpu_summary.render(info, outcomes, steps, run_dir, time.monotonic() - t0,
                                args.dry_run)
    (run_dir / "summary.txt").write_text(text + "\n")
    _write_json(run_dir / "summary.json", data)
    print("\n" + text, flush=True)
    if args.archive:
        print(f"\narchived to {archive(run_dir, args.archive)}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
