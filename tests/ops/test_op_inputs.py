"""The ops' answers to unusual or bad input: in-place writes into memory that aliases itself,
non-finite gates, a negative eps, empty feature dimensions, fp64 under ``auto``, Python-number
gates, in-place residual ops. Each gives a clear error naming the problem and the fix, with the
inputs untouched, or the reference's result."""
from __future__ import annotations

import pytest
import torch

import m2iv_kernels as mk
from m2iv_kernels import reference as ref

from ..helpers import assert_close

ALL = ["torch", "triton", "ext"]


@pytest.fixture(params=ALL)
def any_backend(request):
    """Every backend that runs here, the reference included."""
    why = mk.available_backends("cpu")[request.param]
    if why is not True:
        pytest.skip(f"{request.param} unavailable: {why}")
    return request.param


def _overlapping(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a view whose elements share memory, its storage before the call)."""
    base = torch.randn(64 + 3 * 16)
    if kind == "expand":
        t = base[:64].expand(4, 64)
    else:  # rows 16 elements apart, 64 wide: each row overlaps the next
        t = base.as_strided((4, 64), (16, 1))
    return t, base.clone()


@pytest.mark.parametrize("kind", ["expand", "as_strided"])
def test_inplace_on_self_overlapping_memory_refused(any_backend, kind):
    x, before = _overlapping(kind)
    with pytest.raises(ValueError, match=r"x cannot be written in place: some of its elements "
                                         r"share memory.*clone\(\)"):
        mk.head_steer(x, torch.randn(2, 32), torch.rand(2), inplace=True, backend=any_backend)
    assert torch.equal(torch.as_strided(x, (before.numel(),), (1,), 0), before)
    res, before = _overlapping(kind)
    for call in (lambda: mk.steer_add(res, torch.randn(4, 64), torch.randn(64), 1.0,
                                      inplace=True, backend=any_backend),
                 lambda: mk.steer_add_rmsnorm(res, torch.randn(4, 64), torch.randn(64), 1.0,
                                              torch.ones(64), inplace=True,
                                              backend=any_backend)):
        with pytest.raises(ValueError, match="residual cannot be written in place"):
            call()
        assert torch.equal(torch.as_strided(res, (before.numel(),), (1,), 0), before)


def test_inplace_partially_overlapping_an_input_refused(any_backend):
    buf = torch.randn(5, 64)
    res, x = buf[:4], buf[1:]  # x starts one row into the residual
    with pytest.raises(ValueError, match="partially overlaps another input"):
        mk.steer_add(res, x, torch.randn(64), 1.0, inplace=True, backend=any_backend)


@pytest.mark.parametrize("op", ["steer_add", "steer_add_rmsnorm"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "same_tensor"])
def test_residual_ops_in_place(any_backend, op, layout):
    res = torch.randn(3, 5, 80) if layout != "strided" else torch.randn(3, 5, 96)[..., :80]
    x = res if layout == "same_tensor" else torch.randn(3, 5, 80)
    v, g, w = torch.randn(2, 80), torch.rand(2), torch.rand(80) + 0.5
    mask, index = torch.rand(3, 5) > 0.4, torch.tensor([1, 0, 1])
    kw = dict(mask=mask, index=index)
    if op == "steer_add":
        expect = ref.steer_add(res.clone(), x.clone(), v, g, **kw)
        got = mk.steer_add(res, x, v, g, inplace=True, backend=any_backend, **kw)
        assert got is res
        assert_close(res, expect)
    else:
        normed_e, new_e = ref.steer_add_rmsnorm(res.clone(), x.clone(), v, g, w, 1e-6, **kw)
        normed, new = mk.steer_add_rmsnorm(res, x, v, g, w, 1e-6, inplace=True,
                                           backend=any_backend, **kw)
        assert new is res
        assert_close(res, new_e)
        assert_close(normed, normed_e)


def test_residual_ops_in_place_autograd(any_backend):
    x0 = torch.randn(2, 3, 64, requires_grad=True)
    v, g = torch.randn(64, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    w = torch.rand(64) + 0.5
    res = x0 * 1.0
    normed, new = mk.steer_add_rmsnorm(res, torch.ones(2, 3, 64), v, g, w, inplace=True,
                                       backend=any_backend)
    (normed.square().sum() + new.sum()).backward()
    x1, v1, g1 = (t.detach().requires_grad_() for t in (x0, v, g))
    n1, r1 = ref.steer_add_rmsnorm(x1 * 1.0, torch.ones(2, 3, 64), v1, g1, w)
    (n1.square().sum() + r1.sum()).backward()
    for a, b in ((x0, x1), (v, v1), (g, g1)):
        assert_close(a.grad, b.grad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gate_refused(any_backend, bad):
    x = torch.randn(2, 3, 64)
    gates = torch.tensor([0.5, bad])
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)gate.*(nan|inf).*finite gates"):
        mk.head_steer(x, torch.randn(2, 32), gates, backend=any_backend)
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)gate.*finite gates"):
        mk.steer_add(x, x, torch.randn(64), bad, backend=any_backend)


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf")])
def test_bad_eps_refused(any_backend, eps):
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
        mk.steer_add_rmsnorm(x, x, torch.randn(64), 1.0, torch.ones(64), eps,
                             backend=any_backend)


def test_zero_width_features(any_backend):
    """D = 0: an empty result of the right shape (not a reshape error)."""
    x = torch.randn(3, 4, 0)
    assert mk.head_steer(x, torch.randn(2, 0), torch.rand(2),
                         backend=any_backend).shape == (3, 4, 0)
    assert mk.steer_add(x, x, torch.randn(0), 1.0, backend=any_backend).shape == (3, 4, 0)
    normed, new = mk.steer_add_rmsnorm(x, x, torch.randn(0), 1.0, torch.ones(0),
                                       backend=any_backend)
    assert normed.shape == new.shape == (3, 4, 0)


def test_fp64_auto_takes_the_reference(monkeypatch):
    monkeypatch.delenv("M2IV_BACKEND", raising=False)
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    v, g = torch.randn(2, 32, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    torch.testing.assert_close(mk.head_steer(x, v, g), ref.head_steer(x, v, g), rtol=0, atol=0)
    w = torch.rand(64, dtype=torch.float64)
    got = mk.steer_add_rmsnorm(x, x, v.flatten(), g[0], w)
    want = ref.steer_add_rmsnorm(x, x, v.flatten(), g[0], w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_python_number_gate(any_backend):
    res, x, v = torch.randn(2, 5, 64), torch.randn(2, 5, 64), torch.randn(64)
    assert_close(mk.steer_add(res, x, v, 0.25, backend=any_backend),
                 ref.steer_add(res, x, v, torch.tensor(0.25)))
    normed, new = mk.steer_add_rmsnorm(res, x, v, 2, torch.ones(64), backend=any_backend)
    assert_close(new, ref.steer_add(res, x, v, torch.tensor(2.0)))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        mk.steer_add(res, x, v, True, backend=any_backend)
