"""Steered models under ``torch.compile``: ``model.forward = torch.compile(model.forward,
fullgraph=True)`` with transformers' static cache (how transformers users get fast decoding)
generates what eager steered ``generate()`` does, and vectors, strength and bank selection
changed after compilation take effect without recompiling (any recompile raises here:
``torch._dynamo.config.error_on_recompile``). The CUDA-graph test (``mode="reduce-overhead"``)
runs on a GPU only.

``aot_eager`` traces exactly what Inductor receives (Dynamo's graph, functionalised); one test
compiles with Inductor itself.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import m2iv
from m2iv import M2IV
from m2iv.testing import build, text_inputs

FAMILIES = ["llava", "qwen2_vl", "gemma3"]


def _model(family: str, device: str = "cpu") -> torch.nn.Module:
    model = build(family).to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _generate(model, ids):
    """Greedy tokens and per-step scores with a static cache."""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                         do_sample=False, cache_implementation="static", output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def _same(got, want, atol=1e-4):
    assert torch.equal(got[0], want[0]), "compiled tokens differ from eager"
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=atol)


def _moved(a, b) -> bool:
    return float((a[1] - b[1]).abs().max()) > 1e-3


@contextlib.contextmanager
def _compiled(model, **kwargs):
    """``model.forward`` compiled (fullgraph) meanwhile; Dynamo's caches reset afterwards."""
    import torch._dynamo

    torch._dynamo.reset()
    saved = model.__dict__.get("forward")  # the patch's rebound forward
    model.forward = torch.compile(model.forward, fullgraph=True, **kwargs)
    try:
        yield
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved
        torch._dynamo.reset()


@contextlib.contextmanager
def _no_recompiles():
    import torch._dynamo

    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_steered_generate_follows_changes_without_recompiling(family):
    model = _model(family)
    ids = text_inputs(2, 7)
    v1, v2 = M2IV.random_like(model, seed=1), M2IV.random_like(model, seed=2)
    unsteered = _generate(model, ids)
    with m2iv.steer(model, v1) as handle:
        eager = {"v1": _generate(model, ids)}
        handle.set_strength(2.5)
        eager["v1 x2.5"] = _generate(model, ids)
        handle.set_strength(1.0)
        handle.set_vectors(v2)
        eager["v2"] = _generate(model, ids)
        handle.set_vectors(v1)
        assert _moved(eager["v1"], unsteered) and _moved(eager["v1 x2.5"], eager["v1"])
        assert _moved(eager["v2"], eager["v1"])
        with _compiled(model, backend="aot_eager"):
            _same(_generate(model, ids), eager["v1"])  # compiles prefill and decode graphs
            with _no_recompiles():
                handle.set_strength(2.5)
                _same(_generate(model, ids), eager["v1 x2.5"])
                handle.set_strength(1.0)
                handle.set_vectors(v2)
                _same(_generate(model, ids), eager["v2"])
                handle.set_strength(0.0)  # compiled: the fused ops add zeros
                _same(_generate(model, ids), unsteered)


def test_compiled_bank_selection_without_recompiling():
    model = _model("llava")
    ids = text_inputs(2, 7)
    bank = M2IV.stack([M2IV.random_like(model, seed=s) for s in (1, 2, 3)])
    with m2iv.steer(model, bank, index=torch.tensor([0, 2])) as handle:
        eager = {}
        for sel in ([0, 2], [1, 1], 2):
            handle.select(torch.tensor(sel) if isinstance(sel, list) else sel)
            eager[str(sel)] = _generate(model, ids)
        assert _moved(eager["[0, 2]"], eager["[1, 1]"])
        handle.select(torch.tensor([0, 2]))
        with _compiled(model, backend="aot_eager"):
            _same(_generate(model, ids), eager["[0, 2]"])
            with _no_recompiles():
                handle.select(torch.tensor([1, 1]))
                _same(_generate(model, ids), eager["[1, 1]"])
                handle.select(2)
                _same(_generate(model, ids), eager["2"])


def test_compiled_positions_text_skips_image_tokens():
    model = _model("llava")
    ids = text_inputs(2, 9)
    ids[:, 1:4] = model.config.image_token_id  # as if an image sat there (no pixels needed:
    # the mask decides which tokens are steered, the embeddings are the token ids')
    with m2iv.steer(model, M2IV.random_like(model, seed=1), positions="text"):
        with torch.no_grad():
            eager = model(input_ids=ids).logits
        with _compiled(model, backend="aot_eager"), torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, eager, rtol=0, atol=1e-4)


def test_compiled_kernels_as_opaque_ops(monkeypatch):
    """``M2IV_COMPILED_OPS=kernels``: the graph calls the registered kernel ops instead of
    the reference's aten ops (the launcher of the patch's backend)."""
    monkeypatch.setenv("M2IV_COMPILED_OPS", "kernels")
    model = _model("llava")
    ids = text_inputs(2, 7)
    with m2iv.steer(model, M2IV.random_like(model, seed=1)):
        eager = _generate(model, ids)
        with _compiled(model, backend="aot_eager"):
            _same(_generate(model, ids), eager)


def test_inductor_compiled_steered_generate():
    model = _model("llava")
    ids = text_inputs(1, 6)
    v = M2IV.random_like(model, seed=1)
    with m2iv.steer(model, v) as handle:
        eager = _generate(model, ids)
        handle.set_strength(2.0)
        eager2 = _generate(model, ids)
        handle.set_strength(1.0)
        with _compiled(model):
            _same(_generate(model, ids), eager)
            with _no_recompiles():
                handle.set_strength(2.0)
                _same(_generate(model, ids), eager2)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphs_reduce_overhead(family):
    """CUDA-graph capture of the compiled steered model: replays follow strength and vector
    changes (the banks are read by the captured kernels) and the backend was chosen before
    capture."""
    model = _model(family, "cuda")
    ids = text_inputs(2, 7).cuda()
    v1, v2 = M2IV.random_like(model, seed=1), M2IV.random_like(model, seed=2)
    with m2iv.steer(model, v1) as handle:
        eager = _generate(model, ids)
        handle.set_vectors(v2)
        eager2 = _generate(model, ids)
        handle.set_vectors(v1)
        with _compiled(model, mode="reduce-overhead"):
            for _ in range(3):  # record, then replay
                _same(_generate(model, ids), eager, atol=1e-3)
            with _no_recompiles():
                handle.set_vectors(v2)
                _same(_generate(model, ids), eager2, atol=1e-3)
