"""Tiny random-weight instances of every supported model family, built offline from configs.

    from m2iv.testing import FAMILIES, build, text_inputs
    model = build("llava")            # eval mode, fp32, seeded weights
    ids = text_inputs(model, batch=2, seq=7)

Every model has hidden size 32 (Gemma 3: 32), 2 decoder layers (Mllama: 3, one of them
cross-attention), a vocabulary of 256 whose ids 250..253 are the special image/video tokens,
and where there is one a vision tower of one layer. ``text_inputs`` never draws the special
ids, so plain text runs through every LVLM.
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


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**{k: v for k, v in _TEXT.items()}))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**_TEXT))


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(**_TEXT, head_dim=16))  # H*Dh = 64 != D = 32


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(**_TEXT, head_dim=8))


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


def _idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=28, patch_size=14)
    cfg = Idefics3Config(vision_config=vision, text_config=_text("llama"),
                         image_token_id=IMAGE_TOKEN, scale_factor=2)
    return Idefics3ForConditionalGeneration(cfg)


def _smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=28, patch_size=14)
    cfg = SmolVLMConfig(vision_config=vision, text_config=_text("llama"),
                        image_token_id=IMAGE_TOKEN, scale_factor=2)
    return SmolVLMForConditionalGeneration(cfg)


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    text = _text("gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"])
    cfg = Gemma3Config(text_config=text, vision_config=dict(_SIGLIP),
                       image_token_index=IMAGE_TOKEN, mm_tokens_per_image=4,
                       boi_token_index=VISION_START, eoi_token_index=VISION_END)
    return Gemma3ForConditionalGeneration(cfg)


def _gemma3_text():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(**dict(_TEXT, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"]))
    return Gemma3ForCausalLM(cfg)


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
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral,
    "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl,
    "idefics3": _idefics3, "smolvlm": _smolvlm, "gemma3": _gemma3, "gemma3_text": _gemma3_text,
    "mllama": _mllama, "internvl": _internvl,
}
FAMILIES = tuple(BUILDERS)
TEXT_ONLY = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")


def build(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
          attn_implementation: str = "eager") -> torch.nn.Module:
    """A tiny random-weight ``family`` model in eval mode (deterministic for a seed)."""
    if family not in BUILDERS:
        raise KeyError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BUILDERS[family]()
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
