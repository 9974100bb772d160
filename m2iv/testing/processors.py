"""Offline processors: a working Hugging Face processor for a random-weight model, built from
its config alone (nothing is downloaded).

A character-level tokenizer places the family's special tokens at the ids the config names, and
the family's image processor class is built from defaults sized to the vision tower. The text
has no meaning, but the image tokens are exactly what the model expects, so prompts built with
:class:`m2iv.prompts.HFPromptBuilder` run through the real model classes in tests and benchmarks.
"""
from __future__ import annotations

from ..families import family_of
from ..prompts import image_placeholder

__all__ = ["build_offline_processor", "default_chat_template", "LLAVA_CHAT_TEMPLATE",
           "CHATML_CHAT_TEMPLATE"]

_QWEN_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                    "qwen3_vl": "Qwen3VLProcessor"}
# A LLaVA-1.5-style and a ChatML (Qwen-style) template, for processors built offline.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _char_tokenizer(specials: dict[str, int], named: dict[str, str], vocab_size: int,
                    bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>",
                    add_bos: bool = True):
    """A character-level fast tokenizer: pad/bos/eos at 0/1/2, printable ASCII and newline from
    3, ``specials`` (token -> id) at fixed ids; ``named`` sets tokenizer attributes such as
    ``image_token`` (transformers' extra special tokens)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {pad: 0, bos: 1, eos: 2}
    for i, c in enumerate([chr(c) for c in range(32, 127)] + ["\n"]):
        vocab[c] = 3 + i
    used = set(vocab.values())
    for t, i in specials.items():
        if i in used and vocab.get(t) != i:
            raise ValueError(f"special token {t!r}: id {i} already taken")
        if i >= vocab_size:
            raise ValueError(f"special token {t!r}: id {i} >= vocab size {vocab_size}")
        vocab[t] = i
        used.add(i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                  pad_token=pad, extra_special_tokens=dict(named))
    out.add_special_tokens({"additional_special_tokens":
                            [t for t in specials if t not in named.values()]})
    return out


def _free_ids(vocab_size: int, taken: set[int], n: int, start: int = 100) -> list[int]:
    out = [i for i in range(start, vocab_size) if i not in taken][:n]
    if len(out) < n:
        raise ValueError(f"vocabulary of {vocab_size} too small for {n} extra special tokens")
    return out


def _image_processor(name: str, **kw):
    import transformers

    cls = getattr(transformers, name + "Pil", None)
    try:
        import torchvision  # noqa: F401
        cls = getattr(transformers, name)
    except ImportError:
        cls = cls or getattr(transformers, name)
    return cls(**kw)


def _no_video(cls):
    """``cls`` accepting ``video_processor=None`` (video processors need torchvision; prompts
    here never carry video)."""

    class Offline(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    Offline.__name__ = Offline.__qualname__ = cls.__name__
    return Offline


def default_chat_template(processor, model_type: str | None) -> str:
    """A simple chat template for ``processor`` in the family's ``chat_format``: ChatML, or
    LLaVA-1.5's ``USER: ... ASSISTANT: ...`` with the family's image placeholder."""
    if family_of(model_type).chat_format == "chatml":
        return CHATML_CHAT_TEMPLATE
    return LLAVA_CHAT_TEMPLATE.replace("<image>", image_placeholder(processor, model_type))


def build_offline_processor(model, chat_template: str | None = None):
    """A processor for ``model`` built from its config alone (no download).

    A character-level tokenizer places the family's special tokens at the ids the config
    names; the family's image processor class is built from defaults, sized to the vision
    tower. ``chat_template`` (e.g. :data:`LLAVA_CHAT_TEMPLATE`, :data:`CHATML_CHAT_TEMPLATE`) is
    attached if given. For random-weight models in tests and benchmarks: the text has no
    meaning, but the image tokens are exactly what the model expects.
    """
    if chat_template == "default":
        proc = build_offline_processor(model)
        proc.chat_template = default_chat_template(proc, model.config.model_type)
        return proc
    import transformers as tf

    cfg = model.config
    mt = cfg.model_type
    text = cfg.get_text_config()
    V = text.vocab_size
    vis = getattr(cfg, "vision_config", None)
    img_tok = getattr(cfg, "image_token_id", None)
    if img_tok is None:
        img_tok = getattr(cfg, "image_token_index", None)
    size = getattr(vis, "image_size", 28)
    if isinstance(size, (list, tuple)):
        size = size[0]
    patch = getattr(vis, "patch_size", 14)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]

    def taken(*ids):
        return {1, 2, 0} | {i for i in ids if isinstance(i, int)}

    if mt in ("llava", "llava_next"):
        tok = _char_tokenizer({"<image>": img_tok}, {"image_token": "<image>"}, V)
        strategy = cfg.vision_feature_select_strategy
        if mt == "llava":
            ip = _image_processor("CLIPImageProcessor", size={"shortest_edge": size},
                                  crop_size={"height": size, "width": size})
            cls = tf.LlavaProcessor
        else:
            ip = _image_processor("LlavaNextImageProcessor", size={"shortest_edge": size},
                                  crop_size={"height": size, "width": size},
                                  image_grid_pinpoints=cfg.image_grid_pinpoints)
            cls = tf.LlavaNextProcessor
        extra_cls = 1 if getattr(vis, "model_type", "") == "clip_vision_model" else 0
        return cls(image_processor=ip, tokenizer=tok, patch_size=patch,
                   vision_feature_select_strategy=strategy, chat_template=chat_template,
                   num_additional_image_tokens=extra_cls)
    if mt == "llava_onevision":
        vid = getattr(cfg, "video_token_id", None) or getattr(cfg, "video_token_index", None)
        tok = _char_tokenizer({"<image>": img_tok, "<video>": vid},
                              {"image_token": "<image>", "video_token": "<video>"}, V)
        ip = _image_processor("LlavaOnevisionImageProcessor", size={"height": size,
                                                                    "width": size},
                              image_grid_pinpoints=cfg.image_grid_pinpoints)
        return _no_video(tf.LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tok, video_processor=None,
            num_image_tokens=(size // patch) ** 2,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            chat_template=chat_template,
            vision_aspect_ratio=getattr(cfg, "vision_aspect_ratio", "anyres_max_9"))
    if mt in _QWEN_PROCESSORS:
        specials = {"<|image_pad|>": cfg.image_token_id, "<|video_pad|>": cfg.video_token_id,
                    "<|vision_start|>": cfg.vision_start_token_id,
                    "<|vision_end|>": cfg.vision_end_token_id}
        free = _free_ids(V, taken(*specials.values()), 2)
        specials.update({"<|im_start|>": free[0], "<|im_end|>": free[1]})
        tok = _char_tokenizer(specials, {"image_token": "<|image_pad|>",
                                         "video_token": "<|video_pad|>",
                                         "vision_start_token": "<|vision_start|>",
                                         "vision_end_token": "<|vision_end|>"}, V,
                              add_bos=False)
        merge = getattr(vis, "spatial_merge_size", 2)
        unit = patch * merge
        kw = dict(patch_size=patch, merge_size=merge,
                  temporal_patch_size=getattr(vis, "temporal_patch_size", 2))
        if mt == "qwen3_vl":
            kw["size"] = {"shortest_edge": unit * unit, "longest_edge": 4 * unit * unit}
        else:
            kw.update(min_pixels=unit * unit, max_pixels=4 * unit * unit,
                      size={"shortest_edge": unit * unit, "longest_edge": 4 * unit * unit})
        ip = _image_processor("Qwen2VLImageProcessor", **kw)
        cls = _no_video(getattr(tf, _QWEN_PROCESSORS[mt]))
        return cls(image_processor=ip, tokenizer=tok, video_processor=None,
                   chat_template=chat_template)
    if mt == "gemma3":
        specials = {"<image_soft_token>": cfg.image_token_id,
                    "<start_of_image>": cfg.boi_token_index,
                    "<end_of_image>": cfg.eoi_token_index}
        free = _free_ids(V, taken(*specials.values()), 2)
        specials.update({"<start_of_turn>": free[0], "<end_of_turn>": free[1]})
        tok = _char_tokenizer(specials, {"image_token": "<image_soft_token>",
                                         "boi_token": "<start_of_image>",
                                         "eoi_token": "<end_of_image>"}, V)
        ip = _image_processor("Gemma3ImageProcessor", size={"height": size, "width": size})
        return tf.Gemma3Processor(image_processor=ip, tokenizer=tok,
                                  chat_template=chat_template,
                                  image_seq_length=cfg.mm_tokens_per_image)
    if mt == "idefics3":
        names = (["<fake_token_around_image>", "<end_of_utterance>", "<global-img>"]
                 + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)])
        free = _free_ids(V, taken(img_tok), len(names))
        specials = {"<image>": img_tok, **dict(zip(names, free))}
        tok = _char_tokenizer(specials, {"image_token": "<image>"}, V)
        ip = _image_processor("Idefics3ImageProcessor", do_image_splitting=False,
                              size={"longest_edge": size}, max_image_size={"longest_edge": size})
        seq = int((size // patch) ** 2 / (cfg.scale_factor ** 2))
        return tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq,
                                    chat_template=chat_template)
    if mt == "mllama":
        free = _free_ids(V, taken(img_tok), 1)
        tok = _char_tokenizer({"<|image|>": img_tok, "<|python_tag|>": free[0]},
                              {"image_token": "<|image|>"}, V)
        ip = _image_processor("MllamaImageProcessor", size={"height": size, "width": size},
                              max_image_tiles=getattr(vis, "max_num_tiles", 1))
        return tf.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=chat_template)
    if mt == "internvl":
        free = _free_ids(V, taken(img_tok), 3)
        specials = {"<IMG_CONTEXT>": img_tok, "<img>": free[0], "</img>": free[1],
                    "<video>": free[2]}
        tok = _char_tokenizer(specials, {"context_image_token": "<IMG_CONTEXT>",
                                         "start_image_token": "<img>",
                                         "end_image_token": "</img>",
                                         "video_token": "<video>"}, V)
        ip = _image_processor("GotOcr2ImageProcessor", size={"height": size, "width": size},
                              crop_to_patches=False)
        return _no_video(tf.InternVLProcessor)(
            image_processor=ip, tokenizer=tok, video_processor=None,
            image_seq_length=cfg.image_seq_length, chat_template=chat_template)
    raise ValueError(f"build_offline_processor does not know the family {mt!r}")
