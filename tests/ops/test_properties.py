"""Property test: every op on every kernel backend equals the reference over random shapes,
memory layouts (expanded, sliced, strided rows, transposed), dtypes, masks (bool or float,
broadcast) and banks, forward and (fp32) vector/gate gradients.

Hypothesis draws the cases; ``derandomize`` makes a CI run reproducible, and the example count
keeps the file well under a minute with Triton in its CPU interpreter.
"""
from __future__ import annotations

import pytest
import torch

import m2iv_kernels as mk
from m2iv_kernels import reference as ref

from ..helpers import assert_close, assert_rel

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "sliced", "strided_rows", "transposed", "expanded")
OPS = ("head_steer", "steer_add", "steer_add_rmsnorm")


def _activation(layout: str, b: int, t: int, c: int, dtype: torch.dtype,
                g: torch.Generator) -> torch.Tensor:
    """A ``[b, t, c]`` tensor in ``layout`` (values drawn from ``g``)."""
    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if layout == "sliced":  # row stride c + 3, a one-element offset
        return randn(b, t, c + 3)[..., 1:c + 1]
    if layout == "strided_rows":
        return randn(b, 2 * t, c)[:, ::2]
    if layout == "transposed":  # no [R, C] view: the ops copy
        return randn(t, b, c).transpose(0, 1)
    if layout == "expanded":  # stride 0 over the batch
        return randn(1, t, c).expand(b, t, c)
    return randn(b, t, c)


@st.composite
def cases(draw):
    op = draw(st.sampled_from(OPS))
    dtype = draw(st.sampled_from(DTYPES))
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    h, dh = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    n = draw(st.sampled_from([None, 1, 3]))  # bank rows (None: a single vector)
    mask = draw(st.sampled_from([None, "bool", "float", "bool_over_t", "float_over_b"]))
    return dict(op=op, dtype=dtype, b=b, t=t, h=h, dh=dh, n=n, mask=mask,
                x_layout=draw(st.sampled_from(LAYOUTS)),
                res_layout=draw(st.sampled_from(LAYOUTS)),
                vec_fp32=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _mask(kind, b, t, g):
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(b, t, generator=g) > 0.4
    if kind == "float":
        return (torch.rand(b, t, generator=g) > 0.4).float()
    if kind == "bool_over_t":  # [t]: broadcast over the batch
        return torch.rand(t, generator=g) > 0.4
    return (torch.rand(b, 1, generator=g) > 0.4).half()  # [b, 1]: over the tokens


def _check(backend: str, c: dict) -> None:
    g = torch.Generator().manual_seed(c["seed"])
    dtype, b, t = c["dtype"], c["b"], c["t"]
    heads = c["op"] == "head_steer"
    width = c["h"] * c["dh"]
    vdtype = torch.float32 if c["vec_fp32"] else dtype
    vshape = ((c["h"], c["dh"]) if heads else (width,))
    gshape = (c["h"],) if heads else ()
    if c["n"] is not None:
        vshape, gshape = (c["n"], *vshape), (c["n"], *gshape)
    v = torch.randn(vshape, generator=g).to(vdtype).requires_grad_(dtype == torch.float32)
    gate = torch.rand(gshape, generator=g).to(vdtype).requires_grad_(dtype == torch.float32)
    index = None if c["n"] is None else torch.randint(0, c["n"], (b,), generator=g)
    mask = _mask(c["mask"], b, t, g)
    x = _activation(c["x_layout"], b, t, width, dtype, g)
    kw = dict(mask=mask, index=index)
    if heads:
        got = (mk.head_steer(x, v, gate, backend=backend, **kw),)
        want = (ref.head_steer(x, v, gate, **kw),)
    else:
        res = _activation(c["res_layout"], b, t, width, dtype, g)
        if c["op"] == "steer_add":
            got = (mk.steer_add(res, x, v, gate, backend=backend, **kw),)
            want = (ref.steer_add(res, x, v, gate, **kw),)
        else:
            w = (torch.rand(width, generator=g) + 0.5).to(dtype)
            got = mk.steer_add_rmsnorm(res, x, v, gate, w, 1e-6, backend=backend, **kw)
            want = ref.steer_add_rmsnorm(res, x, v, gate, w, 1e-6, **kw)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a, e, dtype)
    if dtype == torch.float32:  # the column sums of the backward, over the same layouts
        go = [torch.randn(e.shape, generator=g) for e in want]
        dg, dw = (torch.autograd.grad(list(o), (v, gate), go) for o in (got, want))
        truth = [d.double() for d in dw]
        for a, e, tr in zip(dg, dw, truth):
            assert_rel(a, e, tr, torch.float32)


@pytest.fixture(params=["triton", "ext"])
def kernel_backend(request):
    why = mk.available_backends("cpu")[request.param]
    if why is not True:
        pytest.skip(f"{request.param} unavailable: {why}")
    return request.param


def test_ops_equal_the_reference(kernel_backend):
    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(cases())
    def prop(case):
        _check(kernel_backend, case)

    prop()
