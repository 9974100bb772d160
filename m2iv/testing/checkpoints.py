"""Small random-weight Llama / Qwen2 / Qwen3 / Mistral checkpoints saved to a directory (config,
weights and a word-level tokenizer) for engines that load from one (vLLM): the serving tests
and ``m2iv bench --engine vllm``.

No weights can be downloaded in CI; latency and steering semantics do not depend on weight
values. Sizes default to what vLLM's CPU attention accepts (head_dim 64).
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["save_tiny_model", "FAMILY_CONFIGS"]

FAMILY_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "mistral": "MistralConfig"}
_SPECIAL = ["<unk>", "<s>", "</s>"]


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(_SPECIAL), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def save_tiny_model(path: str | os.PathLike, family: str = "llama", *, hidden_size: int = 256,
                    num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                    intermediate_size: int = 512, vocab_size: int = 512, seed: int = 0,
                    **config: Any) -> str:
    """Write a random-weight ``family`` causal LM (float32) and its tokenizer to ``path``.

    The tokenizer maps the words ``w3 .. w{vocab_size-1}`` to their ids (``"w17 w5"`` is
    ``[17, 5]``), so prompts are easy to write. Returns ``path``.
    """
    import torch
    import transformers

    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILY_CONFIGS)}")
    cfg_cls = getattr(transformers, FAMILY_CONFIGS[family])
    cfg = cfg_cls(hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size, vocab_size=vocab_size,
                  max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2, **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # visible logit gaps: no near-ties for greedy decoding to flip on
        model.lm_head.weight.normal_(0.0, 0.5)
    path = os.fspath(path)
    model.save_pretrained(path)
    _tokenizer(vocab_size).save_pretrained(path)
    return path
