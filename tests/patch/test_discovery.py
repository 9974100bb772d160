"""Structural discovery and verification: the text decoder's layers are found in any LVLM or
LM, each layer's style is recognised from its modules and checked against its forward, and a
layer of any other shape is refused with a clear error, the model untouched.

(The hook-reference parity of every architecture listed here is in ``test_patch.py``, which
runs over ``m2iv.testing.FAMILIES``.)"""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import m2iv
from m2iv import M2IV, UnsupportedModelError, patch_model
from m2iv.families import FAMILIES as TABLE
from m2iv.families import describe
from m2iv.patch import rebind
from m2iv.testing import FAMILIES, build, decoder_layers, text_inputs
from m2iv.testing.models import STRUCTURAL

from .common import assert_untouched, snapshot

# architecture -> (layer class, style, mode in mha_mode="auto")
EXPECTED = {
    "llama": ("LlamaDecoderLayer", "pre_norm", "fold"),
    "qwen2": ("Qwen2DecoderLayer", "pre_norm", "fold"),
    "qwen3": ("Qwen3DecoderLayer", "pre_norm", "fold"),
    "mistral": ("MistralDecoderLayer", "pre_norm", "fold"),
    "llava": ("LlamaDecoderLayer", "pre_norm", "fold"),
    "llava_next": ("LlamaDecoderLayer", "pre_norm", "fold"),
    "llava_onevision": ("Qwen2DecoderLayer", "pre_norm", "fold"),
    "qwen2_vl": ("Qwen2VLDecoderLayer", "pre_norm", "fold"),
    "qwen2_5_vl": ("Qwen2_5_VLDecoderLayer", "pre_norm", "fold"),
    "qwen3_vl": ("Qwen3VLTextDecoderLayer", "pre_norm", "fold"),
    "idefics3": ("LlamaDecoderLayer", "pre_norm", "fold"),
    "smolvlm": ("LlamaDecoderLayer", "pre_norm", "fold"),
    "gemma3": ("Gemma3DecoderLayer", "sandwich", "head"),
    "gemma3_text": ("Gemma3DecoderLayer", "sandwich", "head"),
    "mllama": ("MllamaSelfAttentionDecoderLayer", "pre_norm", "fold"),
    "internvl": ("Qwen2DecoderLayer", "pre_norm", "fold"),
    "gemma2": ("Gemma2DecoderLayer", "sandwich", "head"),
    "phi3": ("Phi3DecoderLayer", "pre_norm", "fold"),
    "phi3_dropout": ("Phi3DecoderLayer", "pre_norm", "head"),  # dropout after o_proj: no fold
    "cohere": ("CohereDecoderLayer", "parallel", "fold"),
    "cohere2": ("Cohere2DecoderLayer", "parallel", "fold"),
    "glm4": ("Glm4DecoderLayer", "sandwich", "head"),
    "granite": ("GraniteDecoderLayer", "pre_norm", "fold"),
    "olmo2": ("Olmo2DecoderLayer", "sandwich", "head"),
    "exaone4": ("Exaone4DecoderLayer", "sandwich", "head"),
    "starcoder2": ("Starcoder2DecoderLayer", "pre_norm", "fold"),
    "stablelm": ("StableLmDecoderLayer", "parallel", "fold"),
    "smollm3": ("SmolLM3DecoderLayer", "pre_norm", "fold"),
    "qwen3_moe": ("Qwen3MoeDecoderLayer", "pre_norm", "fold"),
    "mixtral": ("MixtralDecoderLayer", "pre_norm", "fold"),
    "idefics2": ("MistralDecoderLayer", "pre_norm", "fold"),
    "paligemma": ("GemmaDecoderLayer", "pre_norm", "fold"),
}


def test_every_test_architecture_has_an_expectation():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_and_styles_are_found(family):
    model = build(family)
    info = describe(model)
    layer_class, style, mode = EXPECTED[family]
    # the language model's layers (not a vision tower's): the reference finds them by name
    ref = decoder_layers(model)
    assert len(info.layers) == model.config.get_text_config().num_hidden_layers
    for i in info.steerable_layers:
        assert info.layers[i] is ref[i][0]
        assert type(info.layers[i]).__name__ == layer_class
        assert info.layer(i).style == style
    with m2iv.steer(model, M2IV.zeros_like(model), backend="torch") as h:
        assert set(h.modes.values()) == {mode}
        assert set(h.styles.values()) == {style}


def test_structural_architectures_need_no_table_row():
    named = {t for f in TABLE for t in f.model_types}
    for family in STRUCTURAL:
        model = build(family)
        types = {model.config.model_type, model.config.get_text_config().model_type}
        assert not types & named, family


def _refused(model, match):
    ids = text_inputs(2, 5)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=match):
        patch_model(model, M2IV.random_like(build("llama"), seed=1), backend="torch")
    assert_untouched(model, snap, ids, base)


def test_a_layer_of_unknown_shape_is_refused_untouched():
    model = build("llama")
    model.model.layers[1].adapter = torch.nn.Linear(32, 32)  # a child no style explains
    _refused(model, r"(?s)layer 1 \(LlamaDecoderLayer\) of llama matches no layer style m2iv "
                    r"knows: its other children \['adapter', .*pre_norm.*sandwich.*parallel")


class _ScaledOutput(LlamaDecoderLayer):
    """Llama's modules, but a forward that halves the layer's output: a shape the modules do
    not show."""

    def forward(self, hidden_states, *args, **kwargs):
        return super().forward(hidden_states, *args, **kwargs) * 0.5


class _MlpOnInput(LlamaDecoderLayer):
    """Llama's modules, but the MLP reads the normed *input* (a parallel layer in disguise)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        h = self.input_layernorm(hidden_states)
        a, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask,
                              position_ids=position_ids, cache=cache, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        return hidden_states + a + self.mlp(self.post_attention_layernorm(hidden_states))


@pytest.mark.parametrize("cls", [_ScaledOutput, _MlpOnInput])
def test_a_forward_the_modules_do_not_show_is_refused_untouched(cls):
    model = build("llama")
    model.model.layers[0].__class__ = cls  # this instance only
    _refused(model, r"layer 0 \(.*\) of llama has the modules of the 'pre_norm' style .* but "
                    r"its forward computes something else: .*x the tolerance in fold mode, "
                    r".*x the tolerance in head mode")


def test_fold_is_refused_where_a_dropout_follows_o_proj():
    model = build("phi3_dropout")
    v = M2IV.random_like(model, seed=1)
    with m2iv.steer(model, v, backend="torch") as h:
        assert set(h.modes.values()) == {"head"}
    with pytest.raises(UnsupportedModelError, match="Phi3DecoderLayer.*fold mode"):
        patch_model(model, v, backend="torch", mha_mode="fold")
    assert not any(m in rebind.OWNER for m in model.modules())


def test_verification_runs_once_per_layer():
    model = build("cohere")
    calls = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: calls.append(1),
                                                 with_kwargs=True)
    try:
        v = M2IV.random_like(model, seed=1)
        with m2iv.steer(model, v, backend="torch"):
            pass
        assert len(calls) == 1  # one probe forward of the text model
        with m2iv.steer(model, v, backend="torch", positions="text"):
            pass
        assert len(calls) == 1  # verified layers are not checked again
    finally:
        hook.remove()


def test_gpt2_has_no_layers_with_an_o_proj():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64,
                                      n_positions=32, bos_token_id=0, eos_token_id=0))
    with pytest.raises(UnsupportedModelError, match=r"cannot find the text decoder layers of "
                       r"GPT2LMHeadModel: .*o_proj; transformer \(GPT2Model\) holds h "
                       r"\(1 x GPT2Block\)"):
        describe(gpt2)
