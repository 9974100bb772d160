"""patch_model on every supported family (tiny random-weight models, CPU).

The reference is :class:`m2iv.testing.HookReference`: DESIGN.md section 1 applied literally
with plain PyTorch forward hooks. It never calls ``m2iv_kernels`` and locates the modules on
its own (it does not use m2iv.families).
"""
from __future__ import annotations

import functools

import pytest
import torch

import m2iv
from m2iv import M2IV, UnsupportedModelError, VectorsMismatchError, patch_model, unpatch_model
from m2iv.patch import rebind
from m2iv.testing import FAMILIES, IMAGE_TOKEN, HookReference, build, decoder_layers, text_inputs
from tests.helpers import assert_norm_close

ATOL = 2e-5  # fp32 logits: fused ops round once, the reference per op
_MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def model_for(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    key = (family, dtype)
    if key not in _MODELS:
        model = build(family, dtype=dtype)
        model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
        model.generation_config.pad_token_id = 0
        _MODELS[key] = model
    return _MODELS[key]


@pytest.fixture(autouse=True)
def _unpatch_everything():
    yield
    for model in _MODELS.values():
        unpatch_model(model)


def layer(model, i: int) -> torch.nn.Module:
    """Decoder layer ``i``, found by the reference (not by m2iv)."""
    return decoder_layers(model)[i][0]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def forward_attrs(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, forward_attrs(model))


def assert_untouched(model, snap, ids, base):
    state, attrs = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert forward_attrs(model) == attrs
    assert not any(isinstance(m.__dict__.get("forward"), type(snapshot)) for m in model.modules())
    assert torch.equal(logits(model, ids), base)


# ---------------------------------------------------------------------- per-family tests

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


# ---------------------------------------------------------------------- handle behaviour

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
        # placed at patch time, before any forward
        assert all(x.device.type == "meta" for x in h._states[1]._cached.values())
        assert all(x.device.type == "cpu" for x in h._states[0]._cached.values())
        t = h.layer_tensors(1, h._states[1].device)
        assert all(x.device.type == "meta" for x in t.values())
        t0 = h.layer_tensors(0, h._states[0].device)
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


# ---------------------------------------------------------------------- positions

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
    with m2iv.steer(model, v, positions=positions, backend="torch"):
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        seqs = gen.sequences
        for k, step in enumerate(gen.logits):
            full = logits(model, seqs[:, : 6 + k], use_cache=False)[:, -1]
            torch.testing.assert_close(step, full, rtol=0, atol=1e-4)
        out = logits(model, seqs)
    # and it is the reference with the same mask over the whole sequence
    if kind == "mask":
        m = torch.ones(seqs.shape, dtype=torch.bool)
        m[:, :6] = positions
    else:
        m = positions(seqs)
    with HookReference(model, v, mask=m):
        ref = logits(model, seqs)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------- bf16, training

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
