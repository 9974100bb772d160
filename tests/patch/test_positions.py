"""``positions=``: image tokens skipped, explicit masks and callables, also under ``generate()``."""
from __future__ import annotations

import pytest
import torch

import m2iv
from m2iv import M2IV
from m2iv.testing import IMAGE_TOKEN, HookReference, text_inputs

from .common import ATOL, logits, model_for


def _llava_image_batch():
    ids = torch.tensor([[1, 5, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 7, 8],
                        [1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 9, 10, 11]])
    pix = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return ids, pix


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_positions_text_skips_image_tokens(backend):
    model = model_for("llava")
    ids, pix = _llava_image_batch()
    v = M2IV.random_like(model, seed=1)
    mask = ids != IMAGE_TOKEN
    with HookReference(model, v, mask=mask):
        ref = logits(model, ids, pixel_values=pix)
    with HookReference(model, v):
        ref_all = logits(model, ids, pixel_values=pix)
    assert not torch.allclose(ref, ref_all, atol=1e-3)
    with m2iv.steer(model, v, positions="text", backend=backend):
        out = logits(model, ids, pixel_values=pix)
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, pixel_values=pix, max_new_tokens=3,
                                 do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        for k, step in enumerate(gen.logits):
            full = logits(model, gen.sequences[:, : 8 + k], pixel_values=pix,
                          use_cache=False)[:, -1]
            torch.testing.assert_close(step, full, rtol=0, atol=1e-4)
    # the same through the explicit mask and the callable forms
    with m2iv.steer(model, v, positions=mask, backend="torch"):
        torch.testing.assert_close(logits(model, ids, pixel_values=pix), ref, rtol=0, atol=ATOL)
    with m2iv.steer(model, v, positions=lambda x: x != IMAGE_TOKEN, backend="torch"):
        torch.testing.assert_close(logits(model, ids, pixel_values=pix), ref, rtol=0, atol=ATOL)


def test_positions_text_needs_the_top_level_model():
    model = model_for("llava")
    ids, pix = _llava_image_batch()
    v = M2IV.random_like(model, seed=1)
    with m2iv.steer(model.model.language_model, v, positions="text"):
        with pytest.raises(ValueError, match="needs input_ids"):
            logits(model, ids, pixel_values=pix)
    with m2iv.steer(model, v, positions="text"):
        with pytest.raises(RuntimeError, match="outside"):
            with torch.no_grad():
                model.model.language_model(inputs_embeds=torch.randn(1, 3, 32))


@pytest.mark.parametrize("kind", ["mask", "callable"])
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_explicit_positions_under_generate(family, kind):
    """A mask over the prompt (generated tokens steered) and a causal callable: decode steps
    with the KV cache are steered as a full no-cache forward over the same sequence."""
    model = model_for(family)
    ids = text_inputs(2, 6, seed=3)
    v = M2IV.random_like(model, seed=2)
    if kind == "mask":
        positions = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    else:
        positions = lambda x: (x % 3) != 0  # noqa: E731 - depends on each token only
    with m2iv.steer(model, v, positions=positions, backend="torch") as handle:
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        seqs = gen.sequences
        # the same mask over the whole sequence: generated tokens steered
        if kind == "mask":
            m = torch.ones(seqs.shape, dtype=torch.bool)
            m[:, :6] = positions
            handle.set_positions(m)  # a no-cache forward over prompt + generated tokens
        else:
            m = positions(seqs)
        for k, step in enumerate(gen.logits):
            full = logits(model, seqs[:, : 6 + k], use_cache=False)[:, -1]
            torch.testing.assert_close(step, full, rtol=0, atol=1e-4)
        out = logits(model, seqs)
    # and it is the reference with that mask
    with HookReference(model, v, mask=m):
        ref = logits(model, seqs)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["paligemma", "idefics2"])
def test_positions_text_on_lvlms_found_structurally(family):
    """No family-table row: the image tokens come from the config, the layers from structure."""
    model = model_for(family)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[IMAGE_TOKEN] * 4 + [1, 5, 7, 8], [IMAGE_TOKEN] * 4 + [1, 9, 10, 11]])
    images = {"paligemma": dict(pixel_values=torch.randn(2, 3, 28, 28, generator=g),
                                token_type_ids=torch.zeros_like(ids)),
              "idefics2": dict(pixel_values=torch.randn(2, 1, 3, 28, 28, generator=g))}[family]
    v = M2IV.random_like(model, seed=1)
    with HookReference(model, v, mask=ids != IMAGE_TOKEN):
        ref = logits(model, ids, **images)
    with HookReference(model, v):
        assert not torch.allclose(ref, logits(model, ids, **images), atol=1e-3)
    with m2iv.steer(model, v, positions="text", backend="torch"):
        torch.testing.assert_close(logits(model, ids, **images), ref, rtol=0, atol=ATOL)
