"""The registered ops (``torch.ops.m2iv_kernels.*``) and ``torch.compile`` tracing.

The launchers are opaque custom ops with fake implementations, so the graph machinery can be
checked here: ``opcheck`` runs the schema/fake-tensor/autograd-registration checks, and a
steered layer compiles with ``fullgraph=True`` and matches eager forward and backward.
"""
from __future__ import annotations

import pytest
import torch

import m2iv_kernels as mk

OPS = torch.ops.m2iv_kernels


def test_opcheck(backend):
    import m2iv_kernels.custom_ops  # noqa: F401  - registers the ops

    x, y = torch.randn(4, 64), torch.randn(4, 64)
    heads, head_gates = torch.randn(1, 2, 32), torch.randn(1, 2)
    bank, bank_gates = torch.randn(2, 1, 64), torch.randn(2, 1)
    mask, index, w = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([1, 0]), torch.rand(64)
    torch.library.opcheck(OPS.steer_fwd, (x, None, heads, head_gates, None, None, 4, backend))
    torch.library.opcheck(OPS.steer_fwd, (x, y, bank, bank_gates, mask, index, 2, backend))
    torch.library.opcheck(OPS.steer_colsum, (x, mask, index, 2, 2, backend))
    torch.library.opcheck(OPS.rmsnorm_fwd, (x, y, bank, bank_gates, w, 1e-6, 1.0, mask, index,
                                            2, backend))
    _, new, rstd = OPS.rmsnorm_fwd(x, y, bank, bank_gates, w, 1e-6, 0.0, mask, index, 2, backend)
    torch.library.opcheck(OPS.rmsnorm_bwd, (x, y, new, rstd, w, 0.0, mask, index, 2, 2, True,
                                            backend))


def test_compiled_layer_matches_eager(backend):
    res, x = torch.randn(2, 16, 256), torch.randn(2, 16, 256)
    w, index, mask = torch.rand(256), torch.tensor([2, 0]), torch.rand(2, 16) > 0.3

    def layer(res, x, v, g, heads, head_gates):
        normed, new = mk.steer_add_rmsnorm(res, x, v, g, w, mask=mask, index=index,
                                           backend=backend)
        h = mk.head_steer(normed, heads, head_gates, index=index, backend=backend)
        return mk.steer_add(new, h, v, g, index=index, backend=backend)

    params = [torch.randn(3, 256), torch.rand(3), torch.randn(3, 4, 64), torch.rand(3, 4)]
    eager_p = [p.clone().requires_grad_() for p in params]
    comp_p = [p.clone().requires_grad_() for p in params]
    expect = layer(res, x, *eager_p)
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(res, x, *comp_p)
    torch.testing.assert_close(got, expect)
    expect.square().sum().backward()
    got.square().sum().backward()
    for a, b in zip(comp_p, eager_p):
        torch.testing.assert_close(a.grad, b.grad)


def test_inplace_head_steer_compiles_fullgraph(backend):
    v, g, mask = torch.randn(4, 32), torch.rand(4), torch.rand(3, 5) > 0.4

    def steer(x):
        y = x * 2.0
        mk.head_steer(y, v, g, mask=mask, inplace=True, backend=backend)
        return y

    x = torch.randn(3, 5, 128)
    got = torch.compile(steer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, steer(x))
