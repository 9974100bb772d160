"""Model presets for the ICL-vs-M2IV benchmark: real architectures with random weights.

Latency and memory do not depend on weight values, so a preset builds the real model class
from a config (no download) and sets what shapes the cost: image tokens per demonstration,
question/answer lengths, the context window. ``cpu-tiny`` finishes in minutes on 2 cores; the
7B/8B presets are for a GPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

__all__ = ["Preset", "PRESETS", "build_model", "make_inputs", "apply_overrides"]


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "llava" | "llava_next" | "qwen2_vl" | "idefics3"
    text: dict
    vision: dict
    image_size: tuple[int, int]  # pixels (H, W) of every image
    question_tokens: int = 24
    answer_tokens: int = 8
    dtype: str = "bfloat16"
    decode_steps: int = 32
    decode_batch: int = 8
    extra: dict = field(default_factory=dict)  # family-specific top-level config keys
    description: str = ""


_LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                  max_position_embeddings=4096, rms_norm_eps=1e-5)
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
_TINY_TEXT = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                  max_position_embeddings=2048)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("cpu-tiny", "llava", _TINY_TEXT,
           dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, image_size=112, patch_size=14, projection_dim=64),
           (112, 112), question_tokens=16, answer_tokens=4, dtype="float32", decode_steps=16,
           decode_batch=8,
           description="LLaVA architecture, 4 layers x 256, 64 image tokens per image, "
                       "2,048-token context: minutes on 2 CPU cores"),
    Preset("llava-1.5-7b", "llava", _LLAMA2_7B, _CLIP_L_336, (336, 336),
           description="LLaVA-1.5-7B: Vicuna-7B + CLIP ViT-L/14-336, 576 image tokens, 4K ctx"),
    Preset("llava-next-7b", "llava_next", _LLAMA2_7B, _CLIP_L_336, (672, 672),
           extra=dict(image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                            [336, 1008]]),
           description="LLaVA-NeXT-7B (anyres 672x672: 2,928 image tokens), 4K ctx"),
    Preset("qwen2-vl-7b", "qwen2_vl",
           dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
           dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
           (476, 644), description="Qwen2-VL-7B, a 476x644 image = 391 tokens, 32K ctx"),
    Preset("idefics3-8b", "idefics3",
           dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128259, max_position_embeddings=10240, rms_norm_eps=1e-5),
           dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                num_attention_heads=16, image_size=364, patch_size=14),
           (364, 364), extra=dict(scale_factor=2),
           description="Idefics3-8B (Llama-3.1-8B + SigLIP), one 364px tile = 169 tokens "
                       "per image (no image splitting), 10K ctx"),
]}


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """``key=value`` overrides: ``text.hidden_size=512``, ``vision.image_size=224``,
    ``decode_steps=8``, ``image_size=224x224`` ... (values parsed as Python literals)."""
    import ast

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key == "image_size" and isinstance(value, str):
            value = tuple(int(v) for v in value.split("x"))
        section, _, sub = key.partition(".")
        if sub and section in ("text", "vision", "extra"):
            preset = dataclasses.replace(preset, **{section: {**getattr(preset, section),
                                                              sub: value}})
        elif section in {f.name for f in dataclasses.fields(Preset)}:
            preset = dataclasses.replace(preset, **{section: value})
        else:
            raise ValueError(f"unknown preset field {key!r}")
    return preset


# ------------------------------------------------------------------------------- models

def _config(preset: Preset):
    import transformers as tf

    vocab = preset.text["vocab_size"]
    ids = dict(image_token_id=vocab - 1)
    text = dict(preset.text)
    if preset.family == "llava":
        return tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**preset.vision),
                              text_config=tf.LlamaConfig(**text), **ids, **preset.extra)
    if preset.family == "llava_next":
        return tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**preset.vision),
                                  text_config=tf.LlamaConfig(**text), **ids, **preset.extra)
    if preset.family == "qwen2_vl":
        return tf.Qwen2VLConfig(text_config=text, vision_config=dict(preset.vision),
                                vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 2,
                                **ids, **preset.extra)
    if preset.family == "idefics3":
        return tf.Idefics3Config(text_config=text, vision_config=dict(preset.vision), **ids,
                                 **preset.extra)
    raise ValueError(f"unknown family {preset.family!r}")


def build_model(preset: Preset, device: torch.device) -> torch.nn.Module:
    """The preset's model class with random weights, on ``device`` in the preset's dtype."""
    import transformers as tf

    cls = {"llava": tf.LlavaForConditionalGeneration,
           "llava_next": tf.LlavaNextForConditionalGeneration,
           "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
           "idefics3": tf.Idefics3ForConditionalGeneration}[preset.family]
    config = _config(preset)
    dtype = getattr(torch, preset.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _llava_next_tokens(model: torch.nn.Module, h: int, w: int) -> int:
    """Measured from the model: anyres tiling plus unpadding make a formula fragile."""
    pixels, sizes = _llava_next_pixels(model, 1, (h, w), model.device)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels.to(model.dtype),
                                               image_sizes=sizes)
    feats = getattr(feats, "pooler_output", feats)
    return int(feats[0].shape[0])


def _llava_next_pixels(model, n: int, size: tuple[int, int], device):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    tile = model.config.vision_config.image_size
    rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, tile)
    pixels = torch.randn(n, 1 + rows * cols, 3, tile, tile, device=device)
    return pixels, torch.tensor([list(size)] * n, device=device)


def tokens_per_image(preset: Preset, model: torch.nn.Module) -> int:
    """How many placeholder tokens one image occupies in the prompt."""
    h, w = preset.image_size
    cfg = model.config
    if preset.family == "llava":
        n = (h // cfg.vision_config.patch_size) ** 2
        return n + (cfg.vision_feature_select_strategy == "full")
    if preset.family == "llava_next":
        if not hasattr(model, "_m2iv_bench_image_tokens"):
            model._m2iv_bench_image_tokens = _llava_next_tokens(model, h, w)
        return model._m2iv_bench_image_tokens
    if preset.family == "qwen2_vl":
        p, m = cfg.vision_config.patch_size, cfg.vision_config.spatial_merge_size
        return (h // p) * (w // p) // (m * m)
    if preset.family == "idefics3":
        return (h // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor ** 2
    raise ValueError(preset.family)


def _pixels(preset: Preset, model, n_images: int, batch: int, device) -> dict:
    """Random pixel inputs for ``n_images`` images per sequence, ``batch`` sequences."""
    h, w = preset.image_size
    dtype = model.dtype
    total = n_images * batch
    if preset.family == "llava":
        return {"pixel_values": torch.randn(total, 3, h, w, device=device, dtype=dtype)}
    if preset.family == "llava_next":
        pixels, sizes = _llava_next_pixels(model, total, (h, w), device)
        return {"pixel_values": pixels.to(dtype), "image_sizes": sizes}
    if preset.family == "qwen2_vl":
        vc = model.config.vision_config
        gh, gw = h // vc.patch_size, w // vc.patch_size
        dim = 3 * vc.temporal_patch_size * vc.patch_size ** 2
        return {"pixel_values": torch.randn(total * gh * gw, dim, device=device, dtype=dtype),
                "image_grid_thw": torch.tensor([[1, gh, gw]] * total, device=device)}
    if preset.family == "idefics3":
        return {"pixel_values": torch.randn(batch, n_images, 3, h, w, device=device,
                                            dtype=dtype)}
    raise ValueError(preset.family)


def make_inputs(preset: Preset, model: torch.nn.Module, shots: int, batch: int = 1,
                seed: int = 0, with_images: bool = True) -> tuple[dict, int]:
    """A k-shot interleaved prompt (``shots`` image+question+answer demonstrations, then an
    image+question query) as model inputs for ``batch`` sequences, and its length in tokens.

    The text is random token ids: content does not change cost."""
    device = next(model.parameters()).device
    cfg = model.config
    vocab = preset.text["vocab_size"]
    image_id = cfg.image_token_id
    n_img = tokens_per_image(preset, model)
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(4, vocab - 8, (n,), generator=g).tolist()

    def image():
        if preset.family == "qwen2_vl":
            return [cfg.vision_start_token_id] + [image_id] * n_img + [cfg.vision_end_token_id]
        return [image_id] * n_img

    ids: list[int] = [1]
    for _ in range(shots):
        ids += image() + text(preset.question_tokens) + text(preset.answer_tokens)
    ids += image() + text(preset.question_tokens)
    input_ids = torch.tensor([ids] * batch, device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if with_images:
        inputs.update(_pixels(preset, model, shots + 1, batch, device))
        if preset.family == "qwen2_vl":
            inputs["mm_token_type_ids"] = (input_ids == image_id).int()
    return inputs, len(ids)


def context_window(preset: Preset) -> int:
    return int(preset.text["max_position_embeddings"])
