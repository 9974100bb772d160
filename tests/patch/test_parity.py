"""Every tested architecture against the independent hook reference: logits, zero vectors
and bit-exact unpatch, KV-cache ``generate()``, banks, bad vectors, save/load."""
from __future__ import annotations

import pytest
import torch

import m2iv
from m2iv import M2IV, VectorsMismatchError, patch_model, unpatch_model
from m2iv.testing import FAMILIES, HookReference, text_inputs

from .common import ATOL, assert_untouched, logits, model_for, snapshot


def _ext_or_skip():
    import m2iv_kernels as mk
    why = mk.available_backends(torch.device("cpu"))["ext"]
    if why is not True:
        pytest.skip(f"ext backend unavailable: {why}")


@pytest.mark.parametrize("backend", ["torch", "triton", "ext"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hook_reference(family, backend):
    if backend == "ext":
        _ext_or_skip()
    model = model_for(family)
    ids = text_inputs(2, 7)
    v = M2IV.random_like(model, seed=1)
    base = logits(model, ids)
    with HookReference(model, v):
        ref = logits(model, ids)
    assert (ref - base).abs().max() > 1e-2, "random_like must visibly change the outputs"
    with m2iv.steer(model, v, backend=backend):
        out = logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_vectors_and_unpatch(family):
    model = model_for(family)
    ids = text_inputs(2, 6, seed=1)
    snap = snapshot(model)
    base = logits(model, ids)
    h = patch_model(model, M2IV.zeros_like(model), backend="torch")
    assert any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=ATOL)
    h.set_vectors(M2IV.random_like(model, seed=2))
    assert not torch.allclose(logits(model, ids), base, atol=1e-3)
    unpatch_model(model)
    assert not h.active
    assert_untouched(model, snap, ids, base)


@pytest.mark.parametrize("family, backend", [(f, "torch") for f in FAMILIES]
                         + [("llava", "triton"), ("gemma3", "triton")])
def test_generate_kv_cache_equals_full_recompute(family, backend):
    model = model_for(family)
    ids = text_inputs(2, 5, seed=2)
    v = M2IV.random_like(model, seed=3)
    with m2iv.steer(model, v, backend=backend):
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        seq = gen.sequences
        assert seq.shape == (2, 8)
        for k, step_logits in enumerate(gen.logits):
            full = logits(model, seq[:, : 5 + k], use_cache=False)[:, -1]
            torch.testing.assert_close(step_logits, full, rtol=0, atol=1e-4)
            assert torch.equal(full.argmax(-1), seq[:, 5 + k])
        # and the steered continuation differs from the unsteered one's logits
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=1, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert not torch.allclose(plain.logits[0], gen.logits[0], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_bank_index_equals_one_by_one(family):
    model = model_for(family)
    ids = text_inputs(3, 6, seed=4)
    vs = [M2IV.random_like(model, seed=s) for s in (5, 6)]
    bank = M2IV.stack(vs)
    index = torch.tensor([1, 0, 1])
    with m2iv.steer(model, bank, index=index, backend="torch"):
        out = logits(model, ids)
    for b in range(3):
        with m2iv.steer(model, vs[int(index[b])], backend="torch"):
            one = logits(model, ids[b: b + 1])
        torch.testing.assert_close(out[b: b + 1], one, rtol=0, atol=ATOL)
    with HookReference(model, bank, index=index):
        ref = logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_mismatch_and_corrupt_vectors_leave_model_untouched(family, tmp_path):
    model = model_for(family)
    ids = text_inputs(1, 5)
    base = logits(model, ids)
    snap = snapshot(model)
    good = M2IV.zeros_like(model)
    L = good.num_layers
    wrong_heads = M2IV(torch.zeros(L, good.num_heads * 2, good.head_dim // 2),
                       torch.ones(L, good.num_heads * 2), good.mlp, good.mlp_gates, good.layers)
    with pytest.raises(VectorsMismatchError, match=f"layer {good.layers[0]}: .*"
                       rf"\({good.num_heads * 2}, {good.head_dim // 2}\)"):
        patch_model(model, wrong_heads)
    wrong_hidden = M2IV(good.mha, good.mha_gates, torch.zeros(L, good.hidden_size + 8),
                        good.mlp_gates, good.layers)
    with pytest.raises(VectorsMismatchError, match=rf"\({good.hidden_size + 8},\)"):
        patch_model(model, wrong_hidden)
    too_deep = M2IV(good.mha[:1], good.mha_gates[:1], good.mlp[:1], good.mlp_gates[:1], (40,))
    with pytest.raises(VectorsMismatchError, match="layer 40"):
        patch_model(model, too_deep)
    path = tmp_path / "v.safetensors"
    M2IV.random_like(model).save(path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(m2iv.VectorsFormatError):
        patch_model(model, M2IV.load(path))
    with pytest.raises(TypeError, match="m2iv.M2IV"):
        patch_model(model, {"mha": good.mha})
    with pytest.raises(ValueError, match="strength must be finite"):
        patch_model(model, good, strength=float("nan"))
    with pytest.raises(ValueError, match="positions must be"):
        patch_model(model, good, positions="image")
    with pytest.raises(ValueError, match="unknown backend"):
        patch_model(model, good, backend="cuda")
    assert_untouched(model, snap, ids, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip_steers_identically(family, tmp_path):
    model = model_for(family)
    ids = text_inputs(2, 5, seed=7)
    v = M2IV.random_like(model, seed=8)
    v.save(tmp_path / "v.safetensors")
    w = M2IV.load(tmp_path / "v.safetensors")
    assert w.meta["model_type"] == model.config.model_type
    with m2iv.steer(model, v, backend="torch"):
        a = logits(model, ids)
    with m2iv.steer(model, w, backend="torch"):
        b = logits(model, ids)
    assert torch.equal(a, b)
