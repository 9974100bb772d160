"""Parity of every kernel backend with the PyTorch reference, forward and backward.

Covers every op x dtype x mask/bank variant, odd and real shapes, decode (T=1) and long T,
non-contiguous inputs and in-place updates. Triton runs under the CPU interpreter here.
"""
from __future__ import annotations

import pytest
import torch

import m2iv_kernels as mk
from m2iv_kernels import reference as ref

from ..helpers import assert_close, assert_rel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mask(kind: str | None, lead: tuple[int, ...]) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(lead) > 0.4
    # float 0/1 mask over the last token dimension only: broadcast over the batch
    return (torch.rand(lead[-1:]) > 0.5).float()


def _bank(kind: str | None, lead: tuple[int, ...]) -> tuple[int | None, torch.Tensor | None]:
    if kind is None:
        return None, None
    n = 3
    return n, torch.randint(0, n, (lead[0],))


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _grads(out, inputs, grad_out):
    outs = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad(outs, inputs, grad_out, allow_unused=True)


def _truth(fn, inputs, grad_out, **kw):
    """Reference grads in fp64 from the same inputs: the yardstick for reductions."""
    up = [_leaf(t.double()) for t in inputs]
    out = fn(*up, **kw)
    return _grads(out, up, tuple(g.double() for g in grad_out) if isinstance(grad_out, tuple)
                  else grad_out.double())


# ----------------------------------------------------------------------------- head_steer

HEAD_SHAPES = [  # (leading dims, H, Dh)
    ((5,), 1, 123),          # odd sizes
    ((1, 1), 32, 128),       # decode, T = 1, D = 4096
    ((2, 7), 3, 80),
    ((3, 2), 64, 64),        # H = 64
    ((1, 1), 64, 128),       # D = 8192
    ((2, 3), 5, 96),
    ((1, 1024), 2, 64),      # long T
]


def _check_head(backend, dtype, lead, h, dh, mask_kind=None, bank_kind=None, vec_dtype=None):
    n, index = _bank(bank_kind, lead)
    vshape = (h, dh) if n is None else (n, h, dh)
    x = _leaf(torch.randn(*lead, h * dh, dtype=dtype))
    v = _leaf(torch.randn(vshape, dtype=vec_dtype or dtype))
    g = _leaf(torch.randn(vshape[:-1], dtype=vec_dtype or dtype))
    mask = _mask(mask_kind, lead)
    out = mk.head_steer(x, v, g, mask=mask, index=index, backend=backend)
    expect = ref.head_steer(x, v, g, mask=mask, index=index)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, expect, dtype)
    go = torch.randn_like(out)
    got, want = _grads(out, (x, v, g), go), _grads(expect, (x, v, g), go)
    truth = _truth(ref.head_steer, (x, v, g), go, mask=mask, index=index)
    assert_close(got[0], want[0], dtype)
    assert_rel(got[1], want[1], truth[1], dtype)
    assert_rel(got[2], want[2], truth[2], dtype)


@pytest.mark.parametrize("lead,h,dh", HEAD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_steer_shapes(backend, dtype, lead, h, dh):
    _check_head(backend, dtype, lead, h, dh)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("bank_kind", [None, "bank"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_steer_variants(backend, dtype, mask_kind, bank_kind):
    _check_head(backend, dtype, (4, 9), 4, 80, mask_kind, bank_kind)


def test_head_steer_fp32_vectors_on_bf16_activations(backend):
    _check_head(backend, torch.bfloat16, (2, 5), 4, 64, "bool", "bank", vec_dtype=torch.float32)


# ----------------------------------------------------------------------------- steer_add

ADD_SHAPES = [((5,), 123), ((1, 1), 4096), ((2, 7), 80), ((1, 1), 8192), ((1, 1024), 256),
              ((3, 2, 4), 96)]


def _residual_inputs(dtype, lead, d, mask_kind, bank_kind):
    """(residual, x, vector(s), gate(s), mask, index) leaves for the residual ops."""
    n, index = _bank(bank_kind, lead)
    vshape = (d,) if n is None else (n, d)
    res = _leaf(torch.randn(*lead, d, dtype=dtype))
    x = _leaf(torch.randn(*lead, d, dtype=dtype))
    v = _leaf(torch.randn(vshape, dtype=dtype))
    g = _leaf(torch.randn(vshape[:-1], dtype=dtype))
    return res, x, v, g, _mask(mask_kind, lead), index


def _check_add(backend, dtype, lead, d, mask_kind=None, bank_kind=None):
    res, x, v, g, mask, index = _residual_inputs(dtype, lead, d, mask_kind, bank_kind)
    out = mk.steer_add(res, x, v, g, mask=mask, index=index, backend=backend)
    expect = ref.steer_add(res, x, v, g, mask=mask, index=index)
    assert_close(out, expect, dtype)
    go = torch.randn_like(out)
    got, want = _grads(out, (res, x, v, g), go), _grads(expect, (res, x, v, g), go)
    truth = _truth(ref.steer_add, (res, x, v, g), go, mask=mask, index=index)
    assert_close(got[0], want[0], dtype)
    assert_close(got[1], want[1], dtype)
    assert_rel(got[2], want[2], truth[2], dtype)
    assert_rel(got[3], want[3], truth[3], dtype)


@pytest.mark.parametrize("lead,d", ADD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_steer_add_shapes(backend, dtype, lead, d):
    _check_add(backend, dtype, lead, d)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("bank_kind", [None, "bank"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_steer_add_variants(backend, dtype, mask_kind, bank_kind):
    _check_add(backend, dtype, (4, 9), 160, mask_kind, bank_kind)


# ----------------------------------------------------------------------------- + RMSNorm

def _check_rms(backend, dtype, lead, d, mask_kind=None, bank_kind=None, offset=0.0,
               use_normed=True, use_residual=True):
    res, x, v, g, mask, index = _residual_inputs(dtype, lead, d, mask_kind, bank_kind)
    w = _leaf(torch.randn(d, dtype=dtype) * 0.5 + 1.0)
    kw = dict(weight_offset=offset, mask=mask, index=index)
    out = mk.steer_add_rmsnorm(res, x, v, g, w, 1e-6, backend=backend, **kw)
    expect = ref.steer_add_rmsnorm(res, x, v, g, w, 1e-6, **kw)
    assert_close(out[1], expect[1], dtype)
    assert_close(out[0], expect[0], dtype)
    gn = torch.randn_like(out[0]) if use_normed else torch.zeros_like(out[0])
    gr = torch.randn_like(out[1]) if use_residual else torch.zeros_like(out[1])
    inputs = (res, x, v, g, w)
    pick = lambda o: tuple(t for t, use in zip(o, (use_normed, use_residual)) if use)  # noqa: E731
    grad_out = pick((gn, gr))
    got, want = _grads(pick(out), inputs, grad_out), _grads(pick(expect), inputs, grad_out)
    truth = _truth(lambda *a, **k: pick(ref.steer_add_rmsnorm(*a, **k)), inputs, grad_out,
                   eps=1e-6, **kw)
    assert_close(got[0], want[0], dtype)
    assert_close(got[1], want[1], dtype)
    for a, b, t in zip(got[2:], want[2:], truth[2:]):
        if b is None:  # weight unused when only new_residual feeds the loss
            assert a is None or not a.any()
        else:
            assert_rel(a, b, t, dtype)


RMS_SHAPES = [((5,), 123), ((1, 1), 4096), ((2, 7), 80), ((1, 1), 8192), ((1, 512), 256),
              ((2, 3), 5120)]


@pytest.mark.parametrize("lead,d", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_steer_add_rmsnorm_shapes(backend, dtype, lead, d):
    _check_rms(backend, dtype, lead, d)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("bank_kind", [None, "bank"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_steer_add_rmsnorm_variants(backend, dtype, mask_kind, bank_kind):
    _check_rms(backend, dtype, (4, 9), 160, mask_kind, bank_kind)


@pytest.mark.parametrize("dtype", DTYPES)
def test_steer_add_rmsnorm_gemma_offset(backend, dtype):
    _check_rms(backend, dtype, (2, 5), 96, "bool", None, offset=1.0)


@pytest.mark.parametrize("use_normed,use_residual", [(True, False), (False, True)])
def test_steer_add_rmsnorm_one_output_used(backend, use_normed, use_residual):
    _check_rms(backend, torch.float32, (2, 5), 64, "bool", "bank", use_normed=use_normed,
               use_residual=use_residual)


# ----------------------------------------------------------------------------- layouts

def test_non_contiguous_inputs(backend):
    base = torch.randn(6, 2, 4 * 32 + 8)
    x = base[..., :128].transpose(0, 1)  # [2, 6, 128]: no [R, C] view exists -> copied
    sliced = torch.randn(2, 6, 200)[..., 10:138]  # row stride 200: used as a strided view
    v, g = torch.randn(4, 32), torch.randn(4)
    for t in (x, sliced):
        assert not t.is_contiguous()
        assert_close(mk.head_steer(t, v, g, backend=backend), ref.head_steer(t, v, g))
    res = torch.randn(6, 2, 128).transpose(0, 1)
    w = torch.rand(128)
    got = mk.steer_add_rmsnorm(res, sliced, v.flatten(), g[0], w, backend=backend)
    want = ref.steer_add_rmsnorm(res, sliced, v.flatten(), g[0], w)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("strided", [False, True])
def test_head_steer_inplace(backend, strided):
    x = torch.randn(2, 6, 200)[..., :128] if strided else torch.randn(3, 128)
    if strided:
        x = x.transpose(0, 1)
    v, g, mask = torch.randn(4, 32), torch.randn(4), torch.rand(x.shape[:-1]) > 0.5
    expect = ref.head_steer(x, v, g, mask=mask)
    out = mk.head_steer(x, v, g, mask=mask, inplace=True, backend=backend)
    assert out is x
    assert_close(x, expect)


def test_inplace_autograd(backend):
    x0 = torch.randn(3, 64, requires_grad=True)
    v = torch.randn(2, 32, requires_grad=True)
    g = torch.randn(2, requires_grad=True)
    out = mk.head_steer(x0 * 1.0, v, g, inplace=True, backend=backend)
    out.square().sum().backward()
    x1 = x0.detach().requires_grad_(True)
    v1, g1 = v.detach().requires_grad_(True), g.detach().requires_grad_(True)
    ref.head_steer(x1, v1, g1).square().sum().backward()
    for a, b in ((x0, x1), (v, v1), (g, g1)):
        assert_close(a.grad, b.grad)


def test_empty_input(backend):
    x = torch.randn(0, 4, 64)
    assert mk.head_steer(x, torch.randn(2, 32), torch.randn(2), backend=backend).shape == x.shape
    n, r = mk.steer_add_rmsnorm(x, x, torch.randn(64), torch.tensor(1.0), torch.ones(64),
                                backend=backend)
    assert n.shape == r.shape == x.shape


# ----------------------------------------------------------------------------- reference

def test_reference_gradcheck_fp64():
    d = dict(dtype=torch.float64, requires_grad=True)
    x, res = torch.randn(2, 3, 8, **d), torch.randn(2, 3, 8, **d)
    vh, gh = torch.randn(3, 2, 4, **d), torch.randn(3, 2, **d)
    v, g, w = torch.randn(3, 8, **d), torch.randn(3, **d), torch.randn(8, **d)
    mask, index = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64), torch.tensor([2, 0])
    assert torch.autograd.gradcheck(
        lambda x, v, g: ref.head_steer(x, v, g, mask=mask, index=index), (x, vh, gh))
    assert torch.autograd.gradcheck(
        lambda r, x, v, g: ref.steer_add(r, x, v, g, mask=mask, index=index), (res, x, v, g))
    assert torch.autograd.gradcheck(
        lambda r, x, v, g, w: ref.steer_add_rmsnorm(r, x, v, g, w, 1e-6, weight_offset=1.0,
                                                     mask=mask, index=index),
        (res, x, v, g, w))


def test_reference_semantics_by_hand():
    x = torch.zeros(2, 2, 4)
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # [N=2, H=2, Dh=2]
    g = torch.tensor([[1.0, 0.5], [2.0, 0.0]])
    mask = torch.tensor([[True, False], [True, True]])
    out = mk.head_steer(x, v, g, mask=mask, index=torch.tensor([1, 0]), backend="torch")
    assert out[0, 0].tolist() == [10.0, 12.0, 0.0, 0.0]
    assert out[0, 1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert out[1, 1].tolist() == [1.0, 2.0, 1.5, 2.0]
    y = torch.tensor([[3.0, 4.0]])
    normed, new = mk.steer_add_rmsnorm(y, torch.zeros_like(y), torch.zeros(2), torch.tensor(0.0),
                                       torch.ones(2), 0.0, backend="torch")
    assert torch.allclose(normed, y / (12.5 ** 0.5)) and torch.equal(new, y)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", DTYPES)
def test_bank_reductions_are_bit_identical(backend, dtype):
    """Vector, gate and weight gradients are column sums over many rows into a bank shared
    by several sequences: two-stage, fixed-order reductions (no atomics), so two runs give
    the same bits on every backend and device."""
    lead, d, n = (6, 96), 256, 3
    index = torch.tensor([2, 0, 2, 1, 2, 0])
    mask = torch.rand(lead) > 0.3
    res, x = torch.randn(*lead, d, dtype=dtype), torch.randn(*lead, d, dtype=dtype)
    v, g = torch.randn(n, d), torch.rand(n)
    w, go = torch.rand(d, dtype=dtype) + 0.5, torch.randn(*lead, d, dtype=dtype)

    def grads():
        vv, gg, ww = (t.clone().requires_grad_() for t in (v, g, w))
        normed, new = mk.steer_add_rmsnorm(res, x, vv, gg, ww, mask=mask, index=index,
                                           backend=backend)
        out = mk.steer_add(new, normed, vv, gg, mask=mask, index=index, backend=backend)
        return torch.autograd.grad(out, (vv, gg, ww), go)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_masks_reach_the_kernels_in_their_own_dtype():
    """No conversion kernel per call: bool and float masks are handed over as they are."""
    from m2iv_kernels._checks import row_meta

    x = torch.randn(2, 5, 64)
    for dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32):
        mask = torch.ones(2, 5, dtype=dtype)
        meta = row_meta(x, mask, None, 1)
        assert meta.mask.dtype == dtype
        assert meta.mask.data_ptr() == mask.data_ptr()  # a view, not a copy
    assert row_meta(x, torch.ones(2, 5, dtype=torch.int64), None, 1).mask.dtype == torch.float32
