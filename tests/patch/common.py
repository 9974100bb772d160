"""What the patcher tests share: one tiny model per architecture and dtype for the whole
session, and comparisons. The reference is :class:`m2iv.testing.HookReference` (DESIGN.md
section 1 with plain forward hooks; it never calls ``m2iv_kernels`` and finds the modules on
its own, not through m2iv.families)."""
from __future__ import annotations

import torch

from m2iv.patch import rebind
from m2iv.testing import build, decoder_layers

ATOL = 2e-5  # fp32 logits: fused ops round once, the reference per op
MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def model_for(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The session's tiny ``family`` model (built once; unpatched after every test)."""
    key = (family, dtype)
    if key not in MODELS:
        model = build(family, dtype=dtype)
        model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
        model.generation_config.pad_token_id = 0
        MODELS[key] = model
    return MODELS[key]


def layer(model, i: int) -> torch.nn.Module:
    """Decoder layer ``i``, found by the reference (not by m2iv)."""
    return decoder_layers(model)[i][0]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def forward_attrs(model) -> dict:
    """Every module's instance-level ``forward`` (None where the class's runs)."""
    return {n: m.__dict__.get("forward") for n, m in model.named_modules()}


def snapshot(model):
    """Weights, instance forwards and hooks of every module."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, forward_attrs(model),
            {n: len(m._forward_hooks) + len(m._forward_pre_hooks)
             for n, m in model.named_modules()})


def assert_untouched(model, snap, ids, base):
    """Nothing of ``model`` changed since ``snap``: weights, forwards, hooks, outputs."""
    state, forwards, hooks = snapshot(model)
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k])
                                                  for k in state)
    assert forwards == snap[1] and hooks == snap[2]
    assert not any(m in rebind.OWNER for m in model.modules())
    assert torch.equal(logits(model, ids), base)
