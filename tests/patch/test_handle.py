"""PatchHandle and the public functions: swaps without re-patching, banks, double patching,
entry points, failures that restore the model, dtype/device placement, accelerate hooks."""
from __future__ import annotations

import functools

import pytest
import torch

import m2iv
from m2iv import (M2IV, UnsupportedModelError, VectorsFormatError, VectorsMismatchError,
                  patch_model, unpatch_model)
from m2iv.patch import rebind
from m2iv.testing import HookReference, build, text_inputs

from .common import (ATOL, assert_untouched, forward_attrs, layer, logits, model_for,
                     snapshot)


def test_strength_and_swaps_take_effect_without_repatching():
    model = model_for("llama")
    ids = text_inputs(2, 6)
    base = logits(model, ids)
    v1, v2 = M2IV.random_like(model, seed=1), M2IV.random_like(model, seed=2)
    only1 = M2IV.random_like(model, seed=3, layers=[1])
    refs = {}
    for name, v, s in (("v1x2.5", v1, 2.5), ("v2", v2, 1.0), ("only1", only1, 1.0)):
        with HookReference(model, v, strength=s):
            refs[name] = logits(model, ids)
    h = patch_model(model, v1, backend="torch")
    attrs = forward_attrs(model)
    h.set_strength(2.5)
    torch.testing.assert_close(logits(model, ids), refs["v1x2.5"], rtol=0, atol=ATOL)
    h.set_strength(0)
    assert torch.equal(logits(model, ids), base)  # really off: the original forwards run
    h.set_strength(1.0)
    h.set_vectors(v2)
    torch.testing.assert_close(logits(model, ids), refs["v2"], rtol=0, atol=ATOL)
    assert forward_attrs(model) == attrs  # swaps did not re-patch
    # in-place edits of the vectors are seen (the fold cache tracks tensor versions)
    with torch.no_grad():
        v2.mlp_gates.mul_(3.0)
    h.set_strength(0)  # the reference alone (hooks on the unsteered layers)
    with HookReference(model, v2):
        ref3 = logits(model, ids)
    h.set_strength(1.0)
    torch.testing.assert_close(logits(model, ids), ref3, rtol=0, atol=ATOL)
    # fewer layers: the dropped layer runs its original forward again
    h.set_vectors(only1)
    assert h.layers == (1,)
    assert "forward" not in layer(model, 0).__dict__ and "forward" in layer(model, 1).__dict__
    torch.testing.assert_close(logits(model, ids), refs["only1"], rtol=0, atol=ATOL)
    with pytest.raises(VectorsMismatchError):
        h.set_vectors(M2IV.random_like(model_for("qwen3")))
    assert h.vectors is only1
    h.remove()
    h.remove()  # idempotent
    assert torch.equal(logits(model, ids), base)
    with pytest.raises(RuntimeError, match="removed"):
        h.set_strength(1.0)


def test_select_bank_rows():
    model = model_for("qwen2")
    ids = text_inputs(2, 5)
    vs = [M2IV.random_like(model, seed=s) for s in (1, 2, 3)]
    with HookReference(model, vs[2]):
        ref2 = logits(model, ids)
    with HookReference(model, M2IV.stack(vs), index=[0, 1]):
        ref01 = logits(model, ids)
    h = patch_model(model, M2IV.stack(vs), backend="torch")
    with pytest.raises(ValueError, match="call handle.select"):
        logits(model, ids)
    h.select(2)
    torch.testing.assert_close(logits(model, ids), ref2, rtol=0, atol=ATOL)
    h.select([0, 1])
    torch.testing.assert_close(logits(model, ids), ref01, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="2 bank indices but the batch has 3"):
        logits(model, text_inputs(3, 5))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        h.select([0, 3])
    with pytest.raises(TypeError):
        h.select(torch.tensor([0.5]))
    h.set_vectors(vs[0])
    assert h.index is None
    with pytest.raises(ValueError, match="single set"):
        h.select(0)


@pytest.mark.parametrize("family, backend", [("qwen2", "torch"), ("qwen2", "triton"),
                                             ("gemma3_text", "triton")])
def test_bank_with_position_mask(family, backend):
    model = model_for(family)
    ids = text_inputs(3, 6, seed=5)
    bank = M2IV.stack([M2IV.random_like(model, seed=s) for s in (1, 2)])
    index = torch.tensor([1, 1, 0])
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    with HookReference(model, bank, index=index, mask=mask):
        ref = logits(model, ids)
    with m2iv.steer(model, bank, index=index, positions=mask, backend=backend):
        torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=ATOL)


def test_double_patch_replaces_and_steer_restores():
    model = model_for("llava")
    ids = text_inputs(2, 6)
    v1, v2 = M2IV.random_like(model, seed=1), M2IV.random_like(model, seed=2)
    with HookReference(model, v2):
        ref2 = logits(model, ids)
    h1 = patch_model(model, v1, backend="torch")
    out1 = logits(model, ids)
    h2 = patch_model(model, v2, backend="torch")
    assert not h1.active and h2.active
    with pytest.raises(RuntimeError, match="replaced"):
        h1.set_strength(2)
    torch.testing.assert_close(logits(model, ids), ref2, rtol=0, atol=ATOL)  # not v1 + v2
    # patching the language model (sharing the layers) also replaces
    lm = model.model.language_model
    h3 = patch_model(lm, v1, backend="torch")
    assert not h2.active and h3.active
    torch.testing.assert_close(logits(model, ids), out1, rtol=0, atol=ATOL)
    with m2iv.steer(model, v2, backend="torch") as h4:
        assert not h3.active
        torch.testing.assert_close(logits(model, ids), ref2, rtol=0, atol=ATOL)
    assert not h4.active and h3.active  # the earlier patch is back
    torch.testing.assert_close(logits(model, ids), out1, rtol=0, atol=ATOL)
    assert unpatch_model(model) is True
    assert unpatch_model(model) is False


def test_entry_points_lvlm_language_model_and_text_model():
    model = model_for("qwen2_vl")
    ids = text_inputs(2, 6)
    v = M2IV.random_like(model, seed=4)
    with m2iv.steer(model, v, backend="torch"):
        top = logits(model, ids)
    with m2iv.steer(model.model.language_model, v, backend="torch"):
        inner = logits(model, ids)
    with m2iv.steer(model.model, v, backend="torch"):
        mid = logits(model, ids)
    assert torch.equal(top, inner) and torch.equal(top, mid)


def test_patch_failure_halfway_restores(monkeypatch):
    model = model_for("gemma3")
    ids = text_inputs(1, 5)
    base = logits(model, ids)
    snap = snapshot(model)
    calls = {"n": 0}
    real = rebind.Rebind.install

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        real(self)

    monkeypatch.setattr(rebind.Rebind, "install", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        patch_model(model, M2IV.random_like(model))
    assert_untouched(model, snap, ids, base)
    assert not any(m in rebind.OWNER for m in model.modules())
    # a failed replacement leaves the earlier patch installed
    monkeypatch.setattr(rebind.Rebind, "install", real)
    v = M2IV.random_like(model, seed=9)
    h = patch_model(model, v, backend="torch")
    steered = logits(model, ids)
    calls["n"] = 0
    monkeypatch.setattr(rebind.Rebind, "install", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        patch_model(model, M2IV.random_like(model, seed=10))
    assert h.active
    assert torch.equal(logits(model, ids), steered)


def test_dtype_and_device_converted_not_rejected():
    model = model_for("mistral")
    ids = text_inputs(2, 5)
    v = M2IV.random_like(model, seed=1)
    with HookReference(model, v):
        ref = logits(model, ids)
    for dt in (torch.float64, torch.bfloat16):
        w = v.to(dtype=dt)
        with HookReference(model, w.to(torch.float32)):
            ref_dt = logits(model, ids)
        with m2iv.steer(model, w, backend="torch"):
            out = logits(model, ids)
        torch.testing.assert_close(out, ref_dt, rtol=0, atol=ATOL)
    torch.testing.assert_close(ref_dt, ref, rtol=0, atol=5e-2)


def test_head_mode_equals_fold_mode():
    model = model_for("qwen3")
    ids = text_inputs(2, 5)
    v = M2IV.random_like(model, seed=1)
    with m2iv.steer(model, v, backend="torch", mha_mode="fold") as h:
        assert set(h.modes.values()) == {"fold"}
        fold = logits(model, ids)
    with m2iv.steer(model, v, backend="torch", mha_mode="head") as h:
        assert set(h.modes.values()) == {"head"}
        head = logits(model, ids)
    torch.testing.assert_close(fold, head, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="sandwich"):
        patch_model(model_for("gemma3_text"), M2IV.zeros_like(model_for("gemma3_text")),
                    mha_mode="fold")


def test_per_layer_placement_uses_the_layer_device():
    """device_map sharding: each layer's vectors go to that layer's parameters' device. On a
    CPU-only machine the 'meta' device stands in for a second device."""
    model = build("llama")
    layer(model, 1).to("meta")
    v = M2IV.random_like(model_for("llama"), seed=1)
    h = patch_model(model, v, backend="torch")
    try:
        spec0, spec1 = h._states[0].spec, h._states[1].spec
        assert spec0.device == torch.device("cpu")
        assert spec1.device == torch.device("meta")
        assert h._states[1].device == torch.device("meta")
        assert h.modes == {0: "fold", 1: "head"}  # no fold through an unmaterialised o_proj
        # placed at patch time, before any forward, and the backend resolved there
        def placed(st):
            return [t.device.type for b in st.banks.values() for t in (b.vectors, b.gates)]

        assert set(placed(h._states[1])) == {"meta"} and h._states[1].entry.device.type == "meta"
        assert set(placed(h._states[0])) == {"cpu"} and h._states[0].entry.device.type == "cpu"
        t = h._states[1].public_tensors()
        assert all(x.device.type == "meta" for x in t.values())
        t0 = h._states[0].public_tensors()
        assert all(x.device.type == "cpu" for x in t0.values())
    finally:
        h.remove()


def test_accelerate_style_hook_is_kept():
    """Under accelerate's device hooks, forward wraps _old_forward: the patch must replace
    _old_forward so the hook still runs, and restore it exactly."""
    model = build("llama")
    ids = text_inputs(1, 5)
    first = layer(model, 0)
    seen = []

    class Hook:  # what accelerate's add_hook_to_module sets up, minus device moves
        pass

    old = first.forward

    def new_forward(module, *args, **kwargs):
        seen.append(1)
        return module._old_forward(*args, **kwargs)

    first._hf_hook = Hook()
    first._old_forward = old
    first.forward = functools.update_wrapper(functools.partial(new_forward, first), old)
    hooked_forward = first.forward
    base = logits(model, ids)
    v = M2IV.random_like(model, seed=2)
    with HookReference(model, v):
        ref = logits(model, ids)
    seen.clear()
    with m2iv.steer(model, v, backend="torch"):
        assert first.forward is hooked_forward and first._old_forward is not old
        torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=ATOL)
    assert seen
    assert first._old_forward is old and first.forward is hooked_forward
    assert torch.equal(logits(model, ids), base)


def test_unsupported_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64,
                                      n_positions=32))
    with pytest.raises(UnsupportedModelError, match="cannot find the text decoder layers of "
                       "GPT2LMHeadModel: .*o_proj.*GPT2Block"):
        patch_model(gpt2, None)
    assert unpatch_model(gpt2) is False
    with pytest.raises(UnsupportedModelError, match="nn.Module with .config"):
        patch_model(torch.nn.Linear(2, 2), None)


def test_readme_example(tmp_path):
    """The README's load -> patch -> generate -> unpatch example, on a tiny LLaVA."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, \
        LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=28, patch_size=14),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=256),
        image_token_index=250, image_seq_length=4)
    model = LlavaForConditionalGeneration(config).eval()  # or .from_pretrained(...)

    path = str(tmp_path / "vqa.safetensors")
    m2iv.M2IV.random_like(model, seed=0).save(path)  # stands in for trained vectors
    vectors = m2iv.M2IV.load(path)

    ids = torch.tensor([[1, 250, 250, 250, 250, 17, 42, 99]])  # <image> x4 + question
    pixels = torch.randn(1, 3, 28, 28)
    handle = m2iv.patch_model(model, vectors, positions="text")
    steered = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5,
                             do_sample=False)
    handle.set_strength(0.5)  # takes effect on the next call, no re-patching
    with m2iv.steer(model, vectors, strength=2.0):  # temporarily different settings
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    m2iv.unpatch_model(model)
    plain = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert steered.shape == plain.shape == (1, 13)
    assert not handle.active


def test_prepared_once_not_per_forward(monkeypatch):
    """Banks, folds and token rows are prepared when vectors, strength or selection are handed
    over: forwards (decode steps included) recompute nothing, set_strength refolds nothing."""
    from m2iv.patch.state import LayerState

    model = model_for("llama")
    ids = text_inputs(2, 6)
    bank = M2IV.stack([M2IV.random_like(model, seed=s) for s in (1, 2)])
    h = patch_model(model, bank, index=[1, 0])
    folds = []
    monkeypatch.setattr(LayerState, "_banks",
                        lambda self, *a, _f=LayerState._banks: folds.append(1) or _f(self, *a))
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=3, do_sample=False)
            h.set_strength(0.5)
            h.select(torch.tensor([0, 0]))
            model(input_ids=ids)
        assert folds == []
        with torch.no_grad():
            bank.mlp.mul_(2.0)  # an in-place edit: seen at the next forward, refolded once
            model(input_ids=ids)
            model(input_ids=ids)
        assert len(folds) == len(h.layers)
    finally:
        h.remove()


def test_set_vectors_leaves_every_vectors_object_as_given():
    """The patch's banks are its own copies: swapping vectors writes into those, never into
    the tensors of the vectors objects handed over."""
    model = model_for("llama")
    v1, v2 = M2IV.random_like(model, seed=1), M2IV.random_like(model, seed=2)
    before = {id(v): {k: t.clone() for k, t in v.tensors().items()} for v in (v1, v2)}
    with patch_model(model, v1) as h:
        h.set_vectors(v2)
        h.set_strength(3.0)
        h.set_vectors(v1)
    for v in (v1, v2):
        for k, t in v.tensors().items():
            assert torch.equal(t, before[id(v)][k]), k


def test_nan_written_after_patching_refused_at_the_next_forward():
    model = model_for("llama")
    ids = text_inputs(1, 5)
    v = M2IV.random_like(model, seed=1)
    with patch_model(model, v):
        with torch.no_grad():
            v.mlp[0, 0] = float("nan")
            with pytest.raises(VectorsFormatError, match="mlp holds NaN"):
                model(input_ids=ids)


def test_selection_made_under_inference_mode_can_change_later():
    model = model_for("llama")
    ids = text_inputs(2, 5)
    bank = M2IV.stack([M2IV.random_like(model, seed=s) for s in (1, 2)])
    with patch_model(model, bank, index=0) as h:
        with torch.inference_mode():
            first = model(input_ids=ids).logits
        h.select(1)  # rewrites the index buffers made under inference mode
        with torch.inference_mode():
            second = model(input_ids=ids).logits
        with HookReference(model, bank, index=[1, 1]):
            h.set_strength(0)
            ref = logits(model, ids)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, ref, rtol=0, atol=ATOL)


def test_input_norm_fused_into_the_previous_layer_sees_in_place_edits():
    """A layer's output add also computes the next layer's input RMSNorm (eager inference);
    the next layer uses it only for that very tensor, unmodified: an in-place edit between the
    layers (here a forward hook shifting the output) is honoured."""
    model = model_for("llama")
    ids = text_inputs(2, 6)
    v = M2IV.random_like(model, seed=1)

    def scale(module, args, out):  # not a uniform scale: RMSNorm would not see that
        h = out[0] if isinstance(out, tuple) else out
        h.add_(torch.linspace(-1.0, 1.0, h.shape[-1]))

    with HookReference(model, v):
        hook = layer(model, 0).register_forward_hook(scale)
        ref = logits(model, ids)
        hook.remove()
    with patch_model(model, v) as h:
        plain = logits(model, ids)
        assert h._states[0].next_input is h._states[1]  # the fusion is on
        hook = layer(model, 0).register_forward_hook(scale)
        try:
            got = logits(model, ids)
        finally:
            hook.remove()
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert not torch.allclose(got, plain)
