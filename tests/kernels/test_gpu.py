"""What only a GPU can show: Inductor-compiled graphs and the registered ops on CUDA."""
from __future__ import annotations

import pytest
import torch

import m2iv_kernels as mk
from m2iv_kernels import reference as ref

from ..helpers import assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_traces_the_ops(dtype):
    dev = "cuda"
    res, x = torch.randn(2, 16, 256, device=dev, dtype=dtype), torch.randn(2, 16, 256, device=dev,
                                                                         dtype=dtype)
    v = torch.randn(3, 256, device=dev, requires_grad=True)
    g = torch.rand(3, device=dev, requires_grad=True)
    w, index = torch.rand(256, device=dev, dtype=dtype), torch.tensor([2, 0], device=dev)

    def layer(res, x, v, g):
        normed, new = mk.steer_add_rmsnorm(res, x, v, g, w, index=index, backend="triton")
        return mk.steer_add(new, normed, v, g, index=index, backend="triton")

    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(res, x, v, g)
    expect = ref.steer_add(*ref.steer_add_rmsnorm(res, x, v, g, w, index=index)[::-1], v, g,
                           index=index)
    assert_close(out, expect, dtype)
    out.float().sum().backward()
    assert v.grad is not None and g.grad is not None
