"""Backend choice, availability reports and input validation."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import m2iv_kernels as mk
from m2iv_kernels import backends


def test_available_backends_reports_every_backend():
    avail = mk.available_backends("cpu")
    assert set(avail) == {"triton", "ext", "torch"}
    assert avail["torch"] is True
    for name, value in avail.items():
        assert value is True or (isinstance(value, str) and value), name


def test_triton_needs_interpreter_on_cpu():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None); import m2iv_kernels as mk; "
            "print(mk.available_backends('cpu')['triton'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TRITON_INTERPRET=1" in out.stdout


def test_import_does_not_import_triton_or_transformers():
    code = ("import sys, m2iv_kernels; "
            "print('triton' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_auto_on_cpu_never_picks_the_interpreter(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("auto", torch.device("cpu")) in ("torch", "ext")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert backends.resolve("auto", torch.device("cpu")) == "triton"
    assert backends.resolve("torch", torch.device("cpu")) == "torch"  # explicit wins
    monkeypatch.setenv(backends.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match="M2IV_BACKEND='cuda-magic'"):
        backends.resolve("auto", torch.device("cpu"))


def test_unknown_and_unavailable_backends():
    x, v, g = torch.randn(2, 8), torch.randn(2, 4), torch.randn(2)
    with pytest.raises(ValueError, match="unknown backend='cuda'.*'triton'"):
        mk.head_steer(x, v, g, backend="cuda")
    if mk.available_backends("cpu")["ext"] is not True:
        with pytest.raises(RuntimeError, match="'ext' is unavailable"):
            mk.head_steer(x, v, g, backend="ext")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shape_errors_name_the_expected_shape(backend):
    x = torch.randn(2, 3, 100)
    with pytest.raises(ValueError, match=r"needs H\*Dh = 128"):
        mk.head_steer(x, torch.randn(4, 32), torch.randn(4), backend=backend)
    x = torch.randn(2, 3, 128)
    with pytest.raises(ValueError, match=r"gates must have shape \(4,\)"):
        mk.head_steer(x, torch.randn(4, 32), torch.randn(3), backend=backend)
    with pytest.raises(ValueError, match="pass index="):
        mk.head_steer(x, torch.randn(2, 4, 32), torch.randn(2, 4), backend=backend)
    with pytest.raises(ValueError, match=r"index must have shape \(2,\)"):
        mk.head_steer(x, torch.randn(2, 4, 32), torch.randn(2, 4), index=torch.tensor([0]),
                      backend=backend)
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 2\)"):
        mk.head_steer(x, torch.randn(2, 4, 32), torch.randn(2, 4), index=torch.tensor([0, 2]),
                      backend=backend)
    with pytest.raises(ValueError, match="without a leading bank"):
        mk.head_steer(x, torch.randn(4, 32), torch.randn(4), index=torch.tensor([0, 0]),
                      backend=backend)
    with pytest.raises(ValueError, match=r"mask of shape \(4,\) does not broadcast"):
        mk.head_steer(x, torch.randn(4, 32), torch.randn(4), mask=torch.ones(4),
                      backend=backend)
    with pytest.raises(ValueError, match=r"residual must have the shape of x"):
        mk.steer_add(torch.randn(2, 128), x, torch.randn(128), torch.tensor(1.0),
                     backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(128,\)"):
        mk.steer_add_rmsnorm(x, x, torch.randn(128), torch.tensor(1.0), torch.ones(64),
                             backend=backend)


def test_dtype_and_device_errors():
    x = torch.randn(2, 128)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        mk.head_steer(x.long(), torch.randn(4, 32), torch.randn(4))
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        mk.head_steer(x, torch.randn(2, 4, 32), torch.randn(2, 4), index=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="dtype torch.float16 but x has torch.float32"):
        mk.steer_add(x.half(), x, torch.randn(128), torch.tensor(1.0))
    with pytest.raises(ValueError, match="vectors is on meta but x is on cpu"):
        mk.head_steer(x, torch.randn(4, 32, device="meta"), torch.randn(4))
    with pytest.raises(TypeError, match="use backend='torch' for torch.float64"):
        mk.head_steer(x.double(), torch.randn(4, 32), torch.randn(4), backend="triton")
