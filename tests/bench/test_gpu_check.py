"""``make gpu-check``: the dry run exercises every step end to end on the CPU, so the script
cannot rot without a GPU; the runner records failures and overruns and goes on; the GPU
commands still parse against the scripts they call."""
from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks import gpu_check as gc
from benchmarks import gpu_summary as gs


def test_dry_run_runs_every_step_and_writes_results_and_summary(tmp_path):
    import m2iv_kernels as mk

    mk.available_backends("cpu")  # build the extension here if needed, not in a timed step
    run_dir, dest = tmp_path / "run", tmp_path / "out"
    rc = gc.main(["--dry-run", "--out", str(run_dir), "--archive", str(dest)])
    status = json.loads((run_dir / "status.json").read_text())
    steps = {s["name"]: s for s in status["steps"]}
    assert list(steps) == [s.name for s in gc.STEPS]
    assert all(s["status"] == "ok" for s in steps.values()), {
        n: (s["status"], s["detail"]) for n, s in steps.items()}
    assert rc == 0
    for step in gc.STEPS:  # each step left its own results and a log
        assert any((run_dir / step.name).iterdir()), step.name
        assert (run_dir / f"{step.name}.log").read_text().startswith("$ ")
    text = (run_dir / "summary.txt").read_text()
    data = json.loads((run_dir / "summary.json").read_text())
    for step in data["steps"]:  # every reader found its step's results
        assert step["line"] and not step["line"].startswith("(no results"), step
        assert step["line"] in text
    assert "passed" in next(s["line"] for s in data["steps"] if s["name"] == "parity")
    with tarfile.open(dest / "run.tar.gz") as tar:
        names = tar.getnames()
    assert "run/summary.txt" in names and "run/bandwidth.log" in names
    assert (dest / "summary.txt").read_text() == text


def test_make_targets_run_the_script():
    """``make gpu-check`` uses the machine's python3 (its CUDA torch), ``DRY_RUN=1`` the
    CPU environment of ``make setup``."""
    def dry(*args):
        env = {k: v for k, v in os.environ.items()
               if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # as if run outside make
        out = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", *args],
                             capture_output=True, text=True, cwd=gc.ROOT, check=True,
                             env=env).stdout
        return " ".join(out.replace("\\\n", " ").split())

    assert dry("DRY_RUN=1").endswith(".venv/bin/python -m benchmarks.gpu_check --dry-run")
    assert dry("GPU_CHECK_ARGS=--only icl") == "python3 -m benchmarks.gpu_check --only icl"


def _step(name, *argv, expected=5, budget=30):
    return gc.Step(name, argv, argv, expected, budget, lambda d: ("read", []))


def test_failing_overrunning_and_late_steps_are_recorded_and_the_run_goes_on(
        tmp_path, monkeypatch):
    probe = tmp_path / "probe_env.py"
    probe.write_text("import os, sys\nopen(sys.argv[1], 'w').write(os.environ.get("
                     "'M2IV_EXT', 'unset'))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    steps = [
        _step("fails", "json.tool", str(bad)),
        _step("info", "timeit", "-n", "1", "import time; time.sleep(60)", budget=2),
        _step("after", "probe_env", str(tmp_path / "ext.txt")),
        _step("late", "json.tool", "--help", expected=100),
    ]
    t0 = time.monotonic()
    outcomes = gc.run(steps, tmp_path / "run", dry=True, deadline_s=40,
                      info=gc.machine(), say=lambda text: None)
    assert time.monotonic() - t0 < 30  # the sleeping step was killed at its budget
    assert [o.status for o in outcomes] == ["failed", "timeout", "ok", "skipped"]
    assert outcomes[0].detail.startswith("exit 1")
    assert "M2IV_EXT=0" in outcomes[1].detail
    assert (tmp_path / "ext.txt").read_text() == "0"  # a killed build must not stall the rest
    assert "needs ~100 s" in outcomes[3].detail
    recorded = json.loads((tmp_path / "run" / "status.json").read_text())
    assert [s["status"] for s in recorded["steps"]] == [o.status for o in outcomes]
    text, _ = gs.render(gc.machine(), outcomes, steps, tmp_path / "run", 1.0, True)
    assert "TIMEOUT" in text and "FAILED" in text and "SKIPPED" in text


def test_step_timeouts_protect_the_steps_after_them():
    a, b, c = (_step(n, "x", expected=e, budget=bud)
               for n, e, bud in (("a", 60, 150), ("b", 90, 150), ("c", 100, 200)))
    assert gc.timeout_for(a, 570, [b, c]) == 150  # slack: the whole budget
    assert gc.timeout_for(a, 300, [b, c]) == 110  # only what the later steps leave
    assert gc.timeout_for(a, 160, [b, c]) == 60  # never under its own expected time
    assert gc.timeout_for(c, 70, []) == 70  # the last step gets what is left
    assert gc.timeout_for(c, 40, []) is None  # under half its expected time: skipped


def test_multitask_batch_fits_the_gpu():
    assert gc.values(gc.ROOT, 139.8)["tasks"] == ["1", "4", "32", "256"]
    assert gc.values(gc.ROOT, 79.6)["batch"] == ["128"]  # 256 sequences' KV cache: ~82 GB


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("step", [s for s in gc.STEPS if s.argv[0] != "pytest"],
                         ids=lambda s: s.name)
def test_gpu_commands_parse(step, tmp_path, monkeypatch):
    """Each GPU command's arguments are accepted by the script it calls (the dry run runs
    other arguments): renamed flags fail here, not in a GPU hour."""
    real = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    cmd = gc.command(step, False, tmp_path, 139.8)[2:]
    monkeypatch.setattr(sys, "argv", cmd)
    monkeypatch.delitem(sys.modules, cmd[0], raising=False)  # run it afresh, as python -m does
    with pytest.raises(_Parsed):
        runpy.run_module(cmd[0], run_name="__main__", alter_sys=True)


def test_gpu_parity_selection_finds_the_cuda_tests(tmp_path):
    step = next(s for s in gc.STEPS if s.name == "parity")
    cmd = [a for a in gc.command(step, False, tmp_path, None) if a not in ("-v", "-rfEs")]
    out = subprocess.run(cmd + ["--collect-only", "-q"], capture_output=True, text=True,
                         cwd=gc.ROOT, env=gc.child_env(dry=True), timeout=300)
    collected = [ln for ln in out.stdout.splitlines() if "::" in ln]
    assert len(collected) >= 250, out.stdout[-2000:] + out.stderr[-2000:]
    parity = [ln for ln in collected if ln.startswith("tests/ops/test_ops.py")]
    assert len(parity) >= 200 and all("-cuda" in ln for ln in parity)


def _gpu_rows(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / f"{name}.json").write_text(json.dumps({"machine": {}, "rows": rows}))
    return d


def test_summary_of_gpu_kernel_results_compares_backends(tmp_path):
    """What only a GPU run produces (two kernel backends, % of peak) reads back right."""
    bw = [{"op": "copy", "GB/s": 4300.0, "%peak_HBM": 4300 / 48}]
    for d in (4096, 8192):
        for backend in ("triton", "ext"):
            for variant, pct in (("plain", 90.0), ("mask+bank", 80.0)):
                bw.append({"op": "steer_add", "direction": "fwd", "variant": variant, "rows": 4096,
                           "D": d, "dtype": "bfloat16", "backend": backend, "status": "ok",
                           "timing": "cuda-graph", "GB/s": 43 * pct, "%copy": pct,
                           "%peak_HBM": 43 * pct / 48})
    line, details = gs.bandwidth(_gpu_rows(tmp_path, "bandwidth", bw))
    assert line.startswith("copy 4300 GB/s, 90% of the spec-sheet peak; kernels at 90 %")
    assert "4096x4096 triton" in details[1] and "4096x8192 ext" in details[1]
    assert details[2].split()[2:] == ["90/80"] * 4
    ops = [{"op": "steer_add", "rows": r, "D": 4096, "dtype": "bfloat16", "backend": b,
            "fused_ms": 0.03, "GB/s": 3000.0, "%peak_HBM": 62.5, "speedup_vs_unfused": 2.0,
            "fused_over_unsteered": 1.01} for r in (1, 4096) for b in ("triton", "ext", "torch")]
    line, details = gs.kernels(_gpu_rows(tmp_path, "kernels", ops))
    assert line.startswith("4096 rows, bfloat16: fused/unsteered 1.01")
    assert "triton GB/s" in details[1] and "ext /unsteered" in details[1]
    assert "torch" not in details[1] and len(details) == 3


def test_summary_records_the_extension_missing_on_cuda(tmp_path):
    d = tmp_path / "info"
    d.mkdir()
    why = "the CUDA build failed: build failed: nvcc fatal : Unsupported gpu architecture"
    (d / "info.json").write_text(json.dumps({"devices": {
        "cpu": {"backends": {"triton": "interpreter only", "ext": True, "torch": True},
                "auto": "ext"},
        "cuda:0": {"name": "NVIDIA H200", "capability": "9.0", "auto": "triton",
                   "backends": {"triton": True, "ext": why, "torch": True}}},
        "extension": {"available": True, "cuda": False, "cuda_reason": why}}))
    line, details = gs.info(d)
    assert line == f"ext unavailable on cuda:0: {why}; auto -> triton"
    assert "cuda:0 (NVIDIA H200, sm_90): triton yes, ext no, torch yes; auto -> triton" in details


def test_summary_of_a_parity_run_stopped_before_its_junit_file(tmp_path):
    (tmp_path / "parity").mkdir()
    (tmp_path / "parity.log").write_text(
        "[gw0] [ 1%] PASSED tests/ops/test_ops.py::test_a[triton-cuda]\n"
        "[gw1] [ 2%] FAILED tests/ops/test_ops.py::test_b[ext-cuda]\n"
        "[gw1] [ 3%] SKIPPED tests/ops/test_gpu.py::test_c\n")
    line, details = gs.parity(tmp_path / "parity")
    assert line == "1 passed, 1 failed, 1 skipped (before it was stopped)"
    assert details == ["failed: tests/ops/test_ops.py::test_b[ext-cuda]"]


def test_summary_of_patched_results_takes_whatever_ratios_there_are(tmp_path):
    rows = [{"preset": "llava-1.5-7b", "phase": phase, "batch": 8, "compiled": True,
             "fused/unsteered": 1.01, "fused/unsteered IQR": 0.02, "hooks/unsteered": 1.2,
             "flagged/noisy": False} for phase in ("prefill", "decode")]
    line, details = gs.patched(_gpu_rows(tmp_path, "patched", rows))
    assert line == "llava-1.5-7b fused/unsteered 1.01, hooks/unsteered 1.2 (2 cases)"
    assert details[1] == "phase=decode batch=8 compiled=True: fused/unsteered 1.01, " \
                         "hooks/unsteered 1.2"
