"""What only a GPU can show: the ops inside CUDA-graph captures and Inductor-compiled graphs,
for each kernel backend built for CUDA. (The parity suite runs on CUDA through the ``device``
fixture; these tests skip without a GPU.)"""
from __future__ import annotations

import pytest
import torch

import m2iv_kernels as mk
from m2iv_kernels import backends
from m2iv_kernels import reference as ref

from ..helpers import assert_close

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(params=["triton", "ext"])
def cuda_backend(request):
    why = mk.available_backends(DEV)[request.param]
    if why is not True:
        pytest.skip(f"{request.param} unavailable on CUDA: {why}")
    return request.param


def _inputs(dtype, b=2, t=16, d=256, heads=4, n=3):
    kw = dict(device=DEV, dtype=dtype)
    return dict(res=torch.randn(b, t, d, **kw), x=torch.randn(b, t, d, **kw),
                v=torch.randn(n, d, device=DEV), g=torch.rand(n, device=DEV),
                hv=torch.randn(n, heads, d // heads, device=DEV),
                hg=torch.rand(n, heads, device=DEV), w=torch.rand(d, **kw) + 0.5,
                mask=torch.rand(b, t, device=DEV) > 0.3,
                index=torch.tensor([2, 0], device=DEV))


def _layer(backend, res, x, v, g, hv, hg, w, mask, index):
    normed, new = mk.steer_add_rmsnorm(res, x, v, g, w, mask=mask, index=index,
                                       backend=backend)
    h = mk.head_steer(normed, hv, hg, mask=mask, index=index, backend=backend)
    return mk.steer_add(new, h, v, g, mask=mask, index=index, backend=backend)


def _reference(res, x, v, g, hv, hg, w, mask, index):
    normed, new = ref.steer_add_rmsnorm(res, x, v, g, w, mask=mask, index=index)
    h = ref.head_steer(normed, hv, hg, mask=mask, index=index)
    return ref.steer_add(new, h, v, g, mask=mask, index=index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_replays_with_new_inputs(cuda_backend, dtype):
    """A captured steered layer replays on new activations, vectors, gates and bank index
    written into its static inputs (how a serving loop uses it)."""
    inp = _inputs(dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (compiles, allocates)
        _layer(cuda_backend, **inp)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _layer(cuda_backend, **inp)
    for _ in range(2):
        fresh = _inputs(dtype)
        fresh["index"] = torch.tensor([1, 2], device=DEV)
        for name, t in fresh.items():
            inp[name].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, _reference(**inp), dtype)


def test_auto_inside_a_capture_never_measures(monkeypatch):
    """``backend="auto"`` first met inside a capture keeps the default (no timing, which
    would break the capture) and decides for good on the next plain call."""
    from m2iv_kernels import autochoice

    monkeypatch.setattr(backends, "_DECIDED", {})
    monkeypatch.setattr(autochoice, "_KNOWN", {})
    monkeypatch.setattr(autochoice, "_read_disk", lambda: {})
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    measured = []
    real = autochoice.compare
    monkeypatch.setattr(autochoice, "compare",
                        lambda device, rivals: measured.append(rivals) or real(device, rivals))
    inp = _inputs(torch.bfloat16)
    for name in ("triton", "ext"):  # compile / load outside the capture
        if mk.available_backends(DEV)[name] is True:
            _layer(name, **inp)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _layer("auto", **inp)
    graph.replay()
    torch.cuda.synchronize()
    assert measured == []
    assert_close(out, _reference(**inp), torch.bfloat16)
    backends.resolve("auto", torch.device(DEV))  # plain call: measures if there is a rival
    assert all(r[1] == "triton" for r in measured)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiles_the_ops_forward_and_backward(cuda_backend, dtype, mode):
    inp = _inputs(dtype)
    params = {k: inp[k].clone().requires_grad_() for k in ("v", "g", "hv", "hg")}
    eager = {k: t.clone().detach().requires_grad_() for k, t in params.items()}
    compiled = torch.compile(lambda **kw: _layer(cuda_backend, **kw), fullgraph=True,
                             mode=mode)
    out = compiled(**{**inp, **params})
    expect = _layer(cuda_backend, **{**inp, **eager})
    assert_close(out, expect, dtype)
    assert_close(out, _reference(**inp), dtype)
    out.float().square().sum().backward()
    expect.float().square().sum().backward()
    for k in params:
        torch.testing.assert_close(params[k].grad, eager[k].grad, rtol=1e-4, atol=1e-4)


def test_launch_plans_size_reductions_to_the_machine():
    """On a real GPU the partial-sum chunks follow the SM count (the CPU tests see one)."""
    from m2iv_kernels import triton_backend as tb
    from m2iv_kernels._checks import row_meta

    t = tb.target_of(torch.device(DEV))
    assert not t.interpret and t.n_sm == torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.empty(4096, 4096, dtype=torch.bfloat16, device=DEV)
    part = tb.steer_colsum_plan(x, row_meta(x, None, None, 1), t)[0][0].args["PART"]
    assert 1 < part.shape[1] <= 8 * t.n_sm
