"""Bad input to the patcher (issue 16): each is refused with an error naming the problem and
the fix, and the model (weights, forwards, hooks, logits) or the live patch is exactly as
before."""
from __future__ import annotations

import inspect

import pytest
import torch

import m2iv
from m2iv import M2IV, VectorsFormatError, VectorsMismatchError, patch_model
from m2iv.testing import text_inputs

from .common import assert_untouched, logits, model_for, snapshot


def _forward_cached(model, ids, cache=None):
    """``(logits, cache)`` of a forward with the KV cache (either spelling of transformers')."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits, out.get("cache", None) or out.get("past_key_values", None)


@pytest.fixture
def qwen2():
    model = model_for("qwen2")
    ids = text_inputs(2, 8, seed=11)
    return model, ids, logits(model, ids), snapshot(model)


@pytest.mark.parametrize("where", ["mha", "mha_gates", "mlp", "mlp_gates"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_written_after_construction_refused(qwen2, where, value):
    model, ids, base, snap = qwen2
    v = M2IV.random_like(model, seed=1)  # finite when built
    getattr(v, where).view(-1)[-1] = value  # then written in place
    with pytest.raises(VectorsFormatError, match=f"{where} holds NaN or inf .*layer .*"
                       "refusing to steer"):
        patch_model(model, v)
    assert_untouched(model, snap, ids, base)


def test_non_finite_refused_by_set_vectors_patch_unchanged(qwen2):
    model, ids, base, _ = qwen2
    good = M2IV.random_like(model, seed=1)
    with patch_model(model, good, backend="torch") as handle:
        steered = logits(model, ids)
        bad = M2IV.random_like(model, seed=2)
        bad.mlp[0, 0] = float("nan")
        with pytest.raises(VectorsFormatError, match="mlp holds NaN"):
            handle.set_vectors(bad)
        assert handle.vectors is good
        assert torch.equal(logits(model, ids), steered)
    assert torch.equal(logits(model, ids), base)


def test_meta_device_vectors_refused(qwen2):
    model, ids, base, snap = qwen2
    v = M2IV.zeros_like(model, device="meta")
    with pytest.raises(VectorsFormatError, match="meta device.*no values"):
        patch_model(model, v)
    assert_untouched(model, snap, ids, base)


@pytest.mark.parametrize("strength", ["2", True, None, [1.0], torch.ones(2), 1j])
def test_strength_must_be_a_real_number(qwen2, strength):
    model, ids, base, snap = qwen2
    v = M2IV.random_like(model)
    with pytest.raises(TypeError, match="strength must be a real number"):
        patch_model(model, v, strength=strength)
    assert_untouched(model, snap, ids, base)
    with patch_model(model, v, strength=0.5, backend="torch") as handle:
        with pytest.raises(TypeError, match="strength must be a real number"):
            handle.set_strength(strength)
        assert handle.strength == 0.5


def test_strength_accepts_numbers_and_one_element_tensors(qwen2):
    model, ids, _, _ = qwen2
    v = M2IV.random_like(model)
    with patch_model(model, v, strength=2, backend="torch") as handle:
        two = logits(model, ids)
        handle.set_strength(torch.tensor(2.0))
        assert handle.strength == 2.0 and torch.equal(logits(model, ids), two)


def test_prompt_mask_shorter_than_the_prompt_refused(qwen2):
    """5 of 8 prompt tokens covered: refused, instead of steering the other 3."""
    model, ids, base, snap = qwen2
    v = M2IV.random_like(model, seed=3)
    mask = torch.tensor([True, False, True, True, False])
    with patch_model(model, v, positions=mask, backend="torch"):
        with pytest.raises(ValueError, match=r"covers 5 tokens but this forward feeds tokens "
                           r"0..7.*at least 8 columns"):
            logits(model, ids)
        # chunked prompt: the second chunk starts inside the mask and ends beyond it
        with torch.no_grad():
            cache = _forward_cached(model, ids[:, :4])[1]
            with pytest.raises(ValueError, match="covers 5 tokens"):
                _forward_cached(model, ids[:, 4:], cache)
    assert_untouched(model, snap, ids, base)


def test_prompt_mask_rule_tokens_after_the_mask_are_decode_steps(qwen2):
    """An exact-length mask steers generated tokens (decode steps after the mask)."""
    model, ids, _, _ = qwen2
    v = M2IV.random_like(model, seed=3)
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    with patch_model(model, v, positions=mask, backend="torch") as handle:
        with torch.no_grad():
            step = _forward_cached(model, ids[:, :1], _forward_cached(model, ids)[1])[0]
        full = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        handle.set_positions(full)
        whole = logits(model, torch.cat([ids, ids[:, :1]], 1))[:, -1:]
    torch.testing.assert_close(step, whole, rtol=0, atol=1e-4)


def test_integer_mask_must_be_zero_one(qwen2):
    model, ids, base, snap = qwen2
    with pytest.raises(ValueError, match="0 and 1 only"):
        patch_model(model, M2IV.random_like(model), positions=torch.tensor([[0, 1, 2, 1]]))
    with pytest.raises(ValueError, match="T >= 1"):
        patch_model(model, M2IV.random_like(model), positions=torch.zeros(2, 0, dtype=bool))
    assert_untouched(model, snap, ids, base)


def test_vectors_of_another_model_type_refused(qwen2):
    model, ids, base, snap = qwen2
    v = M2IV.random_like(model, seed=4)
    other = M2IV(v.mha, v.mha_gates, v.mlp, v.mlp_gates, v.layers,
                 dict(v.meta, model_type="mistral", text_model_type=None))
    with pytest.raises(VectorsMismatchError, match="made for model type 'mistral' but the "
                       "model is 'qwen2'.*allow_incompatible=True"):
        patch_model(model, other)
    assert_untouched(model, snap, ids, base)
    with patch_model(model, v, backend="torch"):
        own = logits(model, ids)
    with patch_model(model, other, backend="torch", allow_incompatible=True) as handle:
        assert torch.equal(logits(model, ids), own)  # the same numbers, now on purpose
        with pytest.raises(VectorsMismatchError):  # each patch_model call decides anew
            patch_model(model, other)
        assert handle.active and torch.equal(logits(model, ids), own)  # left as it was
    assert torch.equal(logits(model, ids), base)


def test_lvlm_vectors_fit_its_language_model():
    """An LVLM answers to its language model's type: no false refusals."""
    model = model_for("llava")
    v = M2IV.random_like(model)
    assert v.meta["model_type"] == "llava" and v.meta["text_model_type"] == "llama"
    with m2iv.steer(model.model.language_model, v, backend="torch"):
        pass
