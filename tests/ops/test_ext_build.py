"""The C++/CUDA extension: CUDA sources compile with nvcc, the CPU build loads and registers
its ops, and every way it can be missing leaves ``m2iv_kernels`` working.

Parity with the reference (every op x dtype x mask/bank, forward and backward) is in
``test_ops.py``, parametrized over the kernel backends including ``ext``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import m2iv_kernels as mk

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
# torch passes these to nvcc for extensions; the kernels must not rely on implicit conversions
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------- CUDA sources

@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    cmd = [nvcc, "-c", "-arch=sm_90", "-std=c++17", "-O3", *TORCH_NVCC_FLAGS,
           str(CSRC / source), "-o", str(tmp_path / (source + ".o"))]
    out = _run(cmd, cwd=tmp_path)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    assert "warning" not in out.stderr.lower(), out.stderr


def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """The torch side of the CUDA build (m2iv_cuda_bind.cpp), syntax-checked with the host
    compiler: CPU-only torch wheels ship the c10/cuda headers, nvcc's toolkit cuda_runtime.h."""
    nvcc, cxx = _nvcc(), shutil.which("c++") or shutil.which("g++")
    if nvcc is None or cxx is None:
        pytest.skip("needs nvcc's CUDA headers and a C++ compiler")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    cuda_inc = next((Path(h) / "include" for h in homes
                     if h and (Path(h) / "include" / "cuda_runtime.h").is_file()), None)
    torch_inc = Path(torch.__file__).parent / "include"
    if cuda_inc is None or not (torch_inc / "c10" / "cuda").is_dir():
        pytest.skip("CUDA or torch c10/cuda headers not found")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DM2IV_WITH_CUDA",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{CSRC}", "-isystem", str(torch_inc),
           "-isystem", str(torch_inc / "torch" / "csrc" / "api" / "include"),
           "-isystem", str(cuda_inc), "-isystem", sysconfig.get_paths()["include"],
           str(CSRC / "m2iv_cuda_bind.cpp")]
    out = _run(cmd, cwd=tmp_path)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"


# ----------------------------------------------------------------------------- CPU build

@pytest.fixture(scope="module")
def ext():
    if os.environ.get("M2IV_EXT", "1").lower() in ("0", "false", "no", "off"):
        pytest.skip("M2IV_EXT=0 in the environment")
    from m2iv_kernels import ext as module
    assert module.UNAVAILABLE is None, module.UNAVAILABLE
    return module


def test_extension_loads_on_cpu(ext):
    from m2iv_kernels.ext_build import cpu_flags

    assert mk.available_backends("cpu")["ext"] is True
    assert ext.BUILD["cuda"] in (True, False)
    assert ext.BUILD["cpu_capability"] == cpu_flags()[0]
    assert Path(ext.BUILD["dir"], "build.json").is_file()
    if sys.platform.startswith("linux"):
        assert ext.BUILD["openmp"], "at::parallel_for would run on one thread without OpenMP"
    if not ext.BUILD["cuda"]:
        assert isinstance(ext.supports(torch.device("cuda")), str)


def test_registered_ops_and_fake_kernels(ext):
    """``torch.ops.m2iv_kernels`` with ``backend="ext"`` matches the launchers, and its fake
    kernels give the shapes and dtypes on meta tensors."""
    from m2iv_kernels._checks import Rows

    ops = torch.ops.m2iv_kernels
    x, r = torch.randn(6, 64, dtype=torch.bfloat16), torch.randn(6, 64, dtype=torch.bfloat16)
    v, g = torch.randn(2, 1, 64), torch.rand(2, 1, dtype=torch.float16)
    w, mask, index = torch.rand(64), torch.rand(6), torch.tensor([1, 0])
    meta = Rows(mask, index, 3, 2)
    out = ext.steer_fwd(x, r, v, g, meta)
    assert torch.equal(out, ops.steer_fwd(x, r, v, g, mask, index, 3, "ext"))
    got = ops.rmsnorm_fwd(r, x, v, g, w, 1e-6, 1.0, mask, index, 3, "ext")
    for a, b in zip(got, ext.rmsnorm_fwd(r, x, v, g, w, 1e-6, 1.0, meta)):
        assert torch.equal(a, b)
    m = torch.device("meta")
    normed, new, rstd = ops.rmsnorm_fwd(r.to(m), x.to(m), v.to(m), g.to(m), w.to(m), 1e-6, 0.0,
                                        None, None, 6, "ext")
    assert normed.shape == new.shape == (6, 64) and rstd.shape == (6,)
    dy, dw, gs = ops.rmsnorm_bwd(x.to(m), None, new, rstd, w.to(m), 0.0, None, None, 6, 1, True,
                                 "ext")
    assert dy.dtype == torch.bfloat16 and dw.shape == (64,) and gs.shape == (1, 64)
    assert ops.steer_colsum(x.to(m), None, None, 6, 3, "ext").shape == (3, 64)


def test_launchers_reject_bad_layouts(ext):
    from m2iv_kernels._checks import Rows

    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="vectors"):
        ext.steer_fwd(x, None, torch.randn(1, 2, 3), torch.randn(1, 2), Rows(None, None, 4, 1), x)
    with pytest.raises(RuntimeError, match="index covers"):
        ext.steer_colsum(x, Rows(None, torch.tensor([0]), 2, 1))


def test_auto_choice_is_measured_and_cached(ext, tmp_path, monkeypatch):
    from m2iv_kernels import autochoice

    monkeypatch.setenv("M2IV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autochoice, "_KNOWN", {})
    verdict = autochoice.faster("ext", "torch", torch.device("cpu"))
    assert isinstance(verdict, bool)
    saved = json.loads((tmp_path / "auto.json").read_text())
    (key, record), = saved.items()
    assert key.startswith(f"cpu/threads={torch.get_num_threads()}/{ext.FINGERPRINT}<")
    assert record["faster"] == verdict and record["seconds"]
    monkeypatch.setattr(autochoice, "compare", lambda *a: pytest.fail("measured twice"))
    monkeypatch.setattr(autochoice, "_KNOWN", {})
    assert autochoice.faster("ext", "torch", torch.device("cpu")) == verdict  # from disk


# ----------------------------------------------------------------------------- unavailable

_CHECK_FALLBACK = """
import torch, m2iv_kernels as mk
from m2iv_kernels import reference as ref
why = mk.available_backends('cpu')['ext']
assert isinstance(why, str) and why, why
x, v, g = torch.randn(2, 3, 64), torch.randn(2, 32), torch.randn(2)
assert torch.equal(mk.head_steer(x, v, g), ref.head_steer(x, v, g))
try:
    mk.head_steer(x, v, g, backend='ext')
except RuntimeError as err:
    assert "'ext' is unavailable" in str(err), err
else:
    raise AssertionError('backend=ext should be refused')
print(why)
"""


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    out = _run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_disabled_by_env_var():
    out = _python(_CHECK_FALLBACK, {"M2IV_EXT": "0", "M2IV_BACKEND": ""})
    assert "M2IV_EXT=0" in out.stdout
    assert "building" not in out.stderr


def test_build_failure_leaves_import_working(tmp_path):
    """A failing build is reported (one line, cached) and everything falls back to torch."""
    code = ("import torch.utils.cpp_extension as ce\n"
            "def boom(*a, **k):\n    raise RuntimeError('Error building extension: '\n"
            "                       '\\nfoo.cpp:1:1: error: simulated failure')\n"
            "ce.load = boom\n" + _CHECK_FALLBACK)
    env = {"M2IV_CACHE_DIR": str(tmp_path), "M2IV_EXT": "1", "M2IV_BACKEND": "",
           "M2IV_EXT_REBUILD": "0"}
    out = _python(code, env)
    assert "simulated failure" in out.stdout
    assert out.stderr.count("building the C++ extension") == 1
    assert list(tmp_path.glob("*/FAILED"))
    # the failure is cached: the next process does not try again
    again = _python(code, env)
    assert "cached failure" in again.stdout and "building" not in again.stderr


def test_info_command_reports_backends():
    env = {"M2IV_BACKEND": ""}
    out = _run([sys.executable, "-m", "m2iv_kernels.info", "--json"], cwd=ROOT,
               env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__
    assert set(info["devices"]["cpu"]["backends"]) == {"triton", "ext", "torch"}
    assert info["devices"]["cpu"]["auto"] in ("ext", "torch")
    assert "available" in info["extension"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_outputs_stream(ext, dtype):
    """Outputs of >= 8 MB (16 MB for the two RMSNorm outputs) take the streaming-store path;
    they must match the reference."""
    from m2iv_kernels import reference as ref

    rows = (16 << 20) // (4096 * torch.finfo(dtype).bits // 8) + 3  # odd count of full rows
    x, res = torch.randn(rows, 4096, dtype=dtype), torch.randn(rows, 4096, dtype=dtype)
    v, g, w = torch.randn(32, 128, dtype=dtype), torch.randn(32, dtype=dtype), torch.rand(4096)
    mask = torch.rand(rows) > 0.3
    torch.testing.assert_close(mk.head_steer(x, v, g, mask=mask, backend="ext"),
                               ref.head_steer(x, v, g, mask=mask), rtol=0, atol=0)
    vd, gd = v.reshape(-1), g[0]
    torch.testing.assert_close(mk.steer_add(res, x, vd, gd, backend="ext"),
                               ref.steer_add(res, x, vd, gd), rtol=0, atol=0)
    got = mk.steer_add_rmsnorm(res, x, vd, gd, w.to(dtype), backend="ext")
    want = ref.steer_add_rmsnorm(res, x, vd, gd, w.to(dtype))
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    # strided input rows (row stride of 4097 elements)
    wide = torch.randn(rows, 4097, dtype=dtype)[:, 1:]
    torch.testing.assert_close(mk.head_steer(wide, v, g, backend="ext"),
                               ref.head_steer(wide, v, g), rtol=0, atol=0)
