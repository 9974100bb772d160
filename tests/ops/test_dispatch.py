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


def test_public_resolve_backend_names_what_the_ops_run(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert mk.resolve_backend("auto", "cpu") == backends.resolve("auto", torch.device("cpu"))
    assert mk.resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert mk.resolve_backend(device="cpu") == "triton"
    with pytest.raises(ValueError, match="unknown backend='tpu'"):
        mk.resolve_backend("tpu", "cpu")


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


# ----------------------------------------------------------------------------- registry

def test_auto_is_not_measured_while_compiling_and_not_cached(monkeypatch):
    """Inside a torch.compile trace (or a CUDA-graph capture) ``auto`` keeps the default
    without measuring, and decides for good on the next plain call."""
    from m2iv_kernels import autochoice

    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_DECIDED", {})
    monkeypatch.setattr(autochoice, "_KNOWN", {})
    monkeypatch.setattr(autochoice, "_read_disk", lambda: {})
    monkeypatch.setattr(autochoice, "_write_disk", lambda key, record: None)
    calls = []
    monkeypatch.setattr(autochoice, "compare",
                        lambda device, rivals: calls.append(rivals) or {"faster": True})
    monkeypatch.setattr(backends, "unavailable", lambda name, device: None)  # ext "available"
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backends.resolve("auto", cpu) == "torch" and not calls
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert backends.resolve("auto", cpu) == "ext" and calls == [("ext", "torch")]
    assert backends.resolve("auto", cpu) == "ext" and len(calls) == 1  # now cached


def test_failed_measurement_is_retried_not_cached(monkeypatch):
    from m2iv_kernels import autochoice

    monkeypatch.setattr(autochoice, "_KNOWN", {})
    monkeypatch.setattr(autochoice, "_FAILED", {})
    monkeypatch.setattr(autochoice, "_read_disk", lambda: {})
    written = []
    monkeypatch.setattr(autochoice, "_write_disk", lambda key, record: written.append(record))

    def broken(device, rivals):
        raise RuntimeError("timer broke")

    monkeypatch.setattr(autochoice, "compare", broken)
    monkeypatch.setattr(autochoice, "_fingerprint", lambda name: name)
    cpu = torch.device("cpu")
    assert autochoice.faster("ext", "torch", cpu) is None
    monkeypatch.setattr(autochoice, "compare", lambda device, rivals: {"faster": False})
    assert autochoice.faster("ext", "torch", cpu) is None  # backing off, not re-measuring yet
    monkeypatch.setattr(autochoice, "RETRY_S", 0.0)
    assert autochoice.faster("ext", "torch", cpu) is False
    assert written == [{"faster": False}]  # only the successful measurement reaches disk


_FAKE = '''
"""A launcher module over PyTorch ops: the whole of a new backend, for the registry test."""
import torch
from m2iv_kernels import reference

def _term(vectors, gates, meta, rows):
    steer = (gates.float()[..., None] * vectors.float()).reshape(-1, vectors.shape[-1] *
                                                                 (vectors.dim() == 3 and
                                                                  vectors.shape[1] or 1))
    if meta.index is not None:
        steer = steer[meta.index.repeat_interleave(meta.rows_per_seq)[:rows]]
    else:
        steer = steer.expand(rows, -1)
    return steer if meta.mask is None else steer * meta.mask.float()[:, None]

def steer_fwd(x, residual, vectors, gates, meta, out=None):
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    res = 0 if residual is None else residual.reshape(-1, c).float()
    y = (x2.float() + res + _term(vectors, gates, meta, x2.shape[0])).view(x.shape)
    return y.to(x.dtype) if out is None else out.copy_(y)
'''


def test_a_new_backend_is_one_table_entry(monkeypatch):
    import sys
    import types

    module = types.ModuleType("fake_launchers")
    exec(_FAKE, module.__dict__)
    monkeypatch.setitem(sys.modules, "fake_launchers", module)
    entry = backends.Backend("fake", "fake_launchers", ("cpu",), {})
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS + (entry,))
    assert mk.available_backends("cpu")["fake"] is True
    assert "fake has no kernels for meta" in backends.unavailable("fake", torch.device("meta"))
    x, v, g = torch.randn(2, 3, 64), torch.randn(2, 4, 16), torch.randn(2, 4)
    index, mask = torch.tensor([1, 0]), torch.rand(2, 3) > 0.5
    out = mk.head_steer(x, v, g, mask=mask, index=index, backend="fake")
    from m2iv_kernels import reference as ref
    torch.testing.assert_close(out, ref.head_steer(x, v, g, mask=mask, index=index))
    assert backends.resolve("auto", torch.device("cpu")) != "fake"  # no auto rule: never picked
