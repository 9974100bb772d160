"""Tiny random-weight instances of real transformers model classes, built offline from configs:
the families of m2iv's family table (:data:`NAMED`) and architectures m2iv recognises
structurally, with no table row (:data:`STRUCTURAL`); :data:`FAMILIES` is both.

    from m2iv.testing import FAMILIES, build, text_inputs
    model = build("llava")            # eval mode, fp32, seeded weights
    ids = text_inputs(batch=2, seq=7)

Every model has hidden size 32, 2 decoder layers (Mllama: 3, one of them cross-attention), a
vocabulary of 256 whose ids 250..253 are the special image/video tokens, and where there is one
a vision tower of one layer. ``text_inputs`` never draws the special ids, so plain text runs
through every LVLM. The structural architectures get random norm weights, so that a layer body
using one norm in place of another cannot pass a test.
"""
from __future__ import annotations

import torch

VOCAB = 256
IMAGE_TOKEN = 250
VIDEO_TOKEN = 251
VISION_START = 252
VISION_END = 253
TEXT_VOCAB = 240  # text_inputs draws ids in [1, TEXT_VOCAB)

_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _text(model_type: str, **kw) -> dict:
    return dict(_TEXT, model_type=model_type, **kw)


_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14,
             projection_dim=32)
_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14)


# text-only causal LMs: name -> (config class, model class, config overrides)
_CAUSAL_LMS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),  # H*Dh = 64 != D = 32
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"])),
    # found structurally (no family-table row): one per layer shape transformers uses
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(resid_pdrop=0.0)),
    "phi3_dropout": ("Phi3Config", "Phi3ForCausalLM", dict(resid_pdrop=0.1)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM",
                dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=8)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(residual_multiplier=0.5, embedding_multiplier=2.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM",
                dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(use_bias=True)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                 dict(use_parallel_residual=True, hidden_dropout=0.1)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layer_interval=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=8, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2)),
}


def _causal_lm(name: str):
    import transformers

    config, model, overrides = _CAUSAL_LMS[name]
    return getattr(transformers, model)(getattr(transformers, config)(**_TEXT, **overrides))


def _llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    cfg = LlavaConfig(vision_config=dict(_CLIP), text_config=_text("llama"),
                      image_token_index=IMAGE_TOKEN, image_seq_length=4,
                      vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg)


def _llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    cfg = LlavaNextConfig(vision_config=dict(_CLIP), text_config=_text("llama"),
                          image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[28, 28]],
                          vision_feature_layer=-1, image_seq_length=4)
    return LlavaNextForConditionalGeneration(cfg)


def _llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    cfg = LlavaOnevisionConfig(vision_config=dict(_SIGLIP), text_config=_text("qwen2"),
                               image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                               image_grid_pinpoints=[[28, 28]], vision_feature_layer=-1)
    return LlavaOnevisionForConditionalGeneration(cfg)


_QWEN_VISION = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, in_channels=3,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
_QWEN_IDS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                 vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    text = _text("qwen2_vl_text", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision,
                                                         **_QWEN_IDS))


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    text = _text("qwen2_5_vl_text", rope_parameters={"rope_type": "default",
                                                     "rope_theta": 10000.0,
                                                     "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                  window_size=56, fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text,
                                                               vision_config=vision, **_QWEN_IDS))


def _qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    text = _text("qwen3_vl_text", head_dim=8,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision,
                                                         **_QWEN_IDS))


_IDEFICS_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, image_size=28, patch_size=14)


def _idefics(kind: str, text_type: str = "llama"):
    """Idefics3 / SmolVLM (pixel-shuffle connector) or Idefics2 (perceiver resampler)."""
    import transformers

    config, model = {"idefics2": ("Idefics2Config", "Idefics2ForConditionalGeneration"),
                     "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration"),
                     "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration")}[kind]
    extra = (dict(perceiver_config=dict(hidden_size=32, resampler_n_latents=4,
                                        resampler_depth=1, resampler_n_heads=2,
                                        resampler_head_dim=8, num_key_value_heads=1))
             if kind == "idefics2" else dict(scale_factor=2))
    cfg = getattr(transformers, config)(vision_config=dict(_IDEFICS_VISION),
                                        text_config=_text(text_type),
                                        image_token_id=IMAGE_TOKEN, **extra)
    return getattr(transformers, model)(cfg)


def _paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    text = _text("gemma", head_dim=8)
    cfg = PaliGemmaConfig(text_config=text, vision_config=dict(_SIGLIP, projection_dim=32),
                          image_token_index=IMAGE_TOKEN, projection_dim=32)
    return PaliGemmaForConditionalGeneration(cfg)


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    text = _text("gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"])
    cfg = Gemma3Config(text_config=text, vision_config=dict(_SIGLIP),
                       image_token_index=IMAGE_TOKEN, mm_tokens_per_image=4,
                       boi_token_index=VISION_START, eoi_token_index=VISION_END)
    return Gemma3ForConditionalGeneration(cfg)


def _mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    text = dict(_text("mllama_text_model", num_hidden_layers=3, cross_attention_layers=[1]),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.pop("num_key_value_heads")
    text["num_key_value_heads"] = 2
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_global_layers=1, attention_heads=4, image_size=28, patch_size=14,
                  vision_output_dim=64, intermediate_layers_indices=[0], max_num_tiles=1,
                  supported_aspect_ratios=[[1, 1]])
    cfg = MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN)
    return MllamaForConditionalGeneration(cfg)


def _internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=[28, 28], patch_size=[14, 14])
    cfg = InternVLConfig(vision_config=vision, text_config=_text("qwen2"),
                         image_token_id=IMAGE_TOKEN, image_seq_length=1, downsample_ratio=0.5)
    return InternVLForConditionalGeneration(cfg)


BUILDERS = {
    **{name: (lambda name=name: _causal_lm(name)) for name in _CAUSAL_LMS},
    "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl,
    "idefics3": lambda: _idefics("idefics3"), "smolvlm": lambda: _idefics("smolvlm"),
    "gemma3": _gemma3, "mllama": _mllama, "internvl": _internvl,
    "idefics2": lambda: _idefics("idefics2", "mistral"), "paligemma": _paligemma,
}
#: the families of m2iv's family table and earlier releases
NAMED = ("llama", "qwen2", "qwen3", "mistral", "llava", "llava_next", "llava_onevision",
         "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "gemma3_text",
         "mllama", "internvl")
#: architectures no table names: found and recognised structurally
STRUCTURAL = tuple(f for f in BUILDERS if f not in NAMED)
FAMILIES = NAMED + STRUCTURAL
TEXT_ONLY = tuple(_CAUSAL_LMS)


def _distinct_norms(model: torch.nn.Module) -> None:
    """Random norm weights (and biases): freshly initialised norms are all alike, and a layer
    body that used one norm in place of another would go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2]:
                p.add_(0.2 * torch.randn_like(p))


def build(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
          attn_implementation: str = "eager") -> torch.nn.Module:
    """A tiny random-weight ``family`` model in eval mode (deterministic for a seed)."""
    if family not in BUILDERS:
        raise KeyError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BUILDERS[family]()
        if family in STRUCTURAL:
            _distinct_norms(model)
    finally:
        torch.random.set_rng_state(state)
    model.config._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        cfg = getattr(model.config, sub, None)
        if cfg is not None:
            cfg._attn_implementation = attn_implementation
    return model.to(dtype).eval()


def text_inputs(batch: int = 2, seq: int = 7, *, seed: int = 0) -> torch.Tensor:
    """Random text token ids ``[batch, seq]`` (no special image/video ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TEXT_VOCAB, (batch, seq), generator=g)
