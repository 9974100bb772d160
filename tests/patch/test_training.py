"""bf16 models and training: gradients reach the vectors (also under gradient
checkpointing) and equal the hook reference's."""
from __future__ import annotations

import pytest
import torch

import m2iv
from m2iv import M2IV
from m2iv.testing import HookReference, build, text_inputs
from tests.helpers import assert_norm_close

from .common import layer, logits, model_for


@pytest.mark.parametrize("family", ["llava", "gemma3", "glm4", "cohere", "granite",
                                    "phi3_dropout"])
def test_bf16(family):
    model = model_for(family, torch.bfloat16)
    ids = text_inputs(2, 7)
    v = M2IV.random_like(model, seed=1)  # fp32 vectors on a bf16 model
    with HookReference(model, v):
        ref = logits(model, ids)
    with m2iv.steer(model, v, backend="torch"):
        out = logits(model, ids)
    with m2iv.steer(model, v, backend="triton"):
        out_t = logits(model, ids)
    assert_norm_close(out, ref, 2e-2)
    assert_norm_close(out_t, ref, 2e-2)


def _grads(model, v, ids, use_patch, backend="torch"):
    params = [t.detach().clone().requires_grad_(True) for t in v.tensors().values()]
    w = M2IV(*params, v.layers, v.meta)
    ctx = m2iv.steer(model, w, backend=backend) if use_patch else HookReference(model, w)
    with ctx:
        out = model(input_ids=ids).logits
        loss = (out.float().pow(2)).mean()
        loss.backward()
    return loss.detach(), [p.grad for p in params]


@pytest.mark.parametrize("family, backend", [("llama", "torch"), ("llama", "triton"),
                                             ("gemma3_text", "torch"), ("cohere", "torch"),
                                             ("granite", "torch")])
def test_training_gradients_reach_the_vectors(family, backend):
    model = model_for(family)
    ids = text_inputs(2, 5)
    v = M2IV.random_like(model, seed=1)
    ref_loss, ref_grads = _grads(model, v, ids, use_patch=False)
    loss, grads = _grads(model, v, ids, use_patch=True, backend=backend)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        assert g is not None and g.abs().sum() > 0
        assert_norm_close(g, r, 1e-5)


def test_training_with_gradient_checkpointing():
    model = build("llama")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = text_inputs(2, 5)
    mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    v = M2IV.random_like(model, seed=1)
    params = [t.detach().clone().requires_grad_(True) for t in v.tensors().values()]
    w = M2IV(*params, v.layers, v.meta)
    calls = []
    first = layer(model, 0)
    orig = first.input_layernorm.forward
    with m2iv.steer(model, w, positions=mask, backend="torch"):
        first.input_layernorm.forward = lambda x: (calls.append(1), orig(x))[1]
        model(input_ids=ids).logits.pow(2).mean().backward()
    del first.input_layernorm.forward
    assert len(calls) == 2  # forward + checkpoint replay in backward
    (getattr(model, "activation_checkpointing_disable", None)
     or model.gradient_checkpointing_disable)()
    model.eval()
    ref_params = [t.detach().clone().requires_grad_(True) for t in v.tensors().values()]
    with HookReference(model, M2IV(*ref_params, v.layers, v.meta), mask=mask):
        model(input_ids=ids).logits.pow(2).mean().backward()
    for p, r in zip(params, ref_params):
        assert_norm_close(p.grad, r.grad, 1e-5)
