"""The ahead-of-time compile report (``python -m m2iv_kernels.info --compile sm_90``).

CI runs the CI table (D = 8192, where registers run out first, at T = 1 and 4096 rows, every
dtype, every mask and bank variant, every backward flag: ~180 Triton binaries, ~1.5 min on 2
cores) and the ``.cu`` files, and fails on any compile error, spill, atomic instruction or
bulk access narrower than 128 bits. The full table (D = 4096 too) is the command without
``--table ci``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from m2iv_kernels import compile_report as cr

ROOT = Path(__file__).resolve().parents[2]


def _python(args: list[str], code: str | None = None, timeout: int = 1200):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, *(["-c", code] if code else args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_ci_table_compiles_without_spills_atomics_or_narrow_accesses():
    args = ["-m", "m2iv_kernels.info", "--compile", "sm_90", "--table", "ci", "--check",
            "--json"] + ([] if shutil.which("nvcc") else ["--no-cu"])
    out = _python(args)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    report = json.loads(out.stdout)
    assert report["problems"] == []
    kernels = {r["kernel"] for r in report["triton"]}
    assert kernels == {"steer_fwd", "colsum", "reduce_parts", "rmsnorm_fwd", "rmsnorm_bwd"}
    assert len(report["triton"]) > 100 and all("regs" in r for r in report["triton"])
    # every dtype and variant of the table was compiled
    cases = " ".join(r["case"] for r in report["triton"])
    for word in ("fp32", "fp16", "bf16", "mask:bool", "mask:fp32", "bank", "R=1 ", "R=4096"):
        assert word in cases, word
    if shutil.which("nvcc"):
        assert {r["kernel"] for r in report["cuda"]} >= {"steer_fwd_kernel", "colsum_kernel",
                                                         "rmsnorm_fwd_kernel",
                                                         "rmsnorm_bwd_kernel"}


_STRIDED = """
import json, torch
from m2iv_kernels import compile_report as cr, triton_backend as tb
from m2iv_kernels._checks import row_meta
t = tb.Target(False, 132)
x = torch.empty(64, 4104, dtype=torch.bfloat16, device="meta")[:, :4096]  # stride 8 * 513
v, g = torch.empty(1, 32, 128, dtype=torch.bfloat16, device="meta"), torch.empty(
    1, 32, dtype=torch.bfloat16, device="meta")
launches = tb.steer_fwd_plan(x, None, v, g, row_meta(x, None, None, 1), None, t)[0]
rows = cr.compile_triton(90, table=[cr.Case("head_steer", 4096, 64, "bf16", "stride 4104",
                                            launches)], jobs=1)
print(json.dumps(rows[0]["accesses"]["X"]))
"""


def test_row_stride_not_a_multiple_of_16_still_moves_128_bits():
    """Triton proves alignment only for multiples of 16 elements; the launchers pass strides
    in units of the widest aligned vector, so a bf16 row stride of 8 * 513 stays 128-bit."""
    out = _python([], _STRIDED, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    widths = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(widths["ld"]) == {"128"}


def test_vec_width():
    from m2iv_kernels.triton_backend import vec_width

    assert vec_width(2, 4096, 4104) == 8  # bf16: 8 elements = 16 bytes
    assert vec_width(2, 4096, 4100) == 4
    assert vec_width(4, 4096, 0) == 4
    assert vec_width(2, 123) == 1


_PTX = """
.visible .entry k(
    .param .u64 .ptr .global .align 1 k_param_0,
    .param .u64 .ptr .global .align 1 k_param_1,
    .param .u32 k_param_2
)
{
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    mad.wide.s32 %rd3, %r1, 2, %rd1;
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd3 + 0 ];
    add.s64 %rd4, %rd2, %rd3;
    ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    @%p1 st.global.v2.b32 [ %rd4 + 0 ], { %r2, %r3 };
    red.global.add.f32 [ %rd2 ], %f1;
}
"""


def test_ptx_accesses_trace_addresses_to_parameters():
    acc, atomics = cr.ptx_accesses(_PTX, ["X", "OUT", "R"])
    assert acc["X"]["ld"] == {128: 1}
    assert acc["OUT"]["ld"] == {16: 1}
    assert acc["OUT"]["st"] == {64: 1} and acc["X"]["st"] == {64: 1}  # derived from both
    assert atomics == 1


def test_problems_name_what_breaks_the_rules():
    ok = {"regs": 40, "spill_st": 0, "spill_ld": 0, "atomics": 0, "wide_bits": [16, 128],
          "d_max": 8192}
    assert cr.problems(ok) == []
    assert cr.problems({**ok, "spill_st": 36}) == ["spills 36 B"]
    assert cr.problems({**ok, "spill_st": 36, "d_max": 16384}) == []  # outside the range
    assert cr.problems({**ok, "atomics": 2}) == ["2 atomic instructions"]
    assert "no 128-bit" in cr.problems({**ok, "wide_bits": [16, 64]})[0]
    assert cr.problems({**ok, "wide_bits": [64], "expect_wide": False}) == []
    assert cr.problems({"error": "CompilationError: boom"}) == ["CompilationError: boom"]
