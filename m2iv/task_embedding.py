"""Task embeddings from the model itself, for VLibrary's similarity search.

A task is embedded as the mean hidden state of the model over the task's demonstrations: for
every demonstration, the hidden states of one layer are averaged over its (non-padding) tokens;
the embedding is the mean of those per-demonstration vectors. No extra embedding model is
needed, and the same helper embeds a new user's few examples to find the closest stored
vectors (``VLibrary.search(embed_task(model, examples), compatible_with=model)``).

Embeddings are only comparable between the same model and the same ``layer``: the library
searches only among entries compatible with the query's model, and the default layer is fixed
(``"middle"``), so keep the default unless you use another layer everywhere.

Run this on the *unpatched* model: with vectors applied, the hidden states include the
steering.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .families import module_device

__all__ = ["embed_task", "embed_examples"]


def _to_inputs(example: Any, tokenizer, processor) -> dict[str, Any]:
    """One demonstration (or a batch of them) as keyword arguments for ``model(...)``."""
    if isinstance(example, Mapping):  # tokenizer/processor output (BatchEncoding is a Mapping)
        inputs = dict(example)
    elif isinstance(example, str):
        enc = processor or tokenizer
        if enc is None:
            raise ValueError("text examples need tokenizer= (or processor=)")
        inputs = dict(enc(text=example, return_tensors="pt") if processor is not None
                      else enc(example, return_tensors="pt"))
    elif isinstance(example, tuple) and len(example) == 2 and isinstance(example[0], str):
        if processor is None:
            raise ValueError("(text, image) examples need processor=")
        text, images = example
        inputs = dict(processor(text=text, images=images, return_tensors="pt"))
    elif isinstance(example, torch.Tensor) or (isinstance(example, Sequence) and example and
                                                all(isinstance(i, int) for i in example)):
        ids = torch.as_tensor(example, dtype=torch.long)
        inputs = {"input_ids": ids[None] if ids.dim() == 1 else ids}
    else:
        raise TypeError(f"cannot turn a {type(example).__name__} into model inputs: pass dicts "
                        "of tensors, strings (with tokenizer=), (text, image) pairs (with "
                        "processor=), or token ids")
    if "input_ids" not in inputs and "inputs_embeds" not in inputs:
        raise ValueError("model inputs need input_ids (or inputs_embeds)")
    return inputs


def _layer_index(layer, n_states: int) -> int:
    if layer is None or layer == "middle":
        return n_states // 2
    if layer == "last":
        return n_states - 1
    if not isinstance(layer, int) or not -n_states <= layer < n_states:
        raise ValueError(f"layer must be 'middle', 'last' or an index into the {n_states} hidden "
                         f"states (0 = embeddings, i = output of decoder layer i-1); got {layer!r}")
    return layer % n_states


@torch.no_grad()
def embed_examples(model, examples: Iterable[Any], *, tokenizer=None, processor=None,
                   layer: int | str | None = "middle") -> torch.Tensor:
    """One embedding per demonstration: ``[n, D]`` float32 on the CPU (see :func:`embed_task`)."""
    was_training = model.training
    model.eval()
    device = module_device(model)
    rows = []
    try:
        for example in examples:
            inputs = _to_inputs(example, tokenizer, processor)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
            out = model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
            states = getattr(out, "hidden_states", None)
            if not states:
                raise ValueError(f"{type(model).__name__} returned no hidden_states: cannot "
                                 "embed a task with it")
            h = states[_layer_index(layer, len(states))].float()  # [B, T, D]
            mask = inputs.get("attention_mask")
            if not isinstance(mask, torch.Tensor) or mask.shape != h.shape[:2]:
                mask = torch.ones(h.shape[:2], device=h.device)
            mask = mask.to(h.device, torch.float32)
            counts = mask.sum(1, keepdim=True)
            if bool((counts == 0).any()):
                raise ValueError("an example has no non-padding token")
            rows.append(((h * mask[..., None]).sum(1) / counts).cpu())
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("no examples to embed")
    return torch.cat(rows)


def embed_task(model, examples: Iterable[Any], *, tokenizer=None, processor=None,
               layer: int | str | None = "middle") -> torch.Tensor:
    """The task embedding ``[D]`` (float32, CPU): mean over demonstrations of each
    demonstration's mean hidden state at ``layer``.

    Args:
        model: a Hugging Face causal LM or LVLM (anything returning ``hidden_states``).
        examples: demonstrations, each a dict of model inputs (a tokenizer's or processor's
            output: ``input_ids``, ``attention_mask``, ``pixel_values``...; a batch counts as
            that many demonstrations), a string (needs ``tokenizer`` or ``processor``), a
            ``(text, image)`` pair (needs ``processor``), or a sequence/tensor of token ids.
        layer: ``"middle"`` (default: hidden state ``len(hidden_states) // 2``), ``"last"``,
            or an index into ``hidden_states`` (0 = embeddings, ``i`` = output of decoder
            layer ``i - 1``). Padding positions (``attention_mask == 0``) are ignored.
    """
    return embed_examples(model, examples, tokenizer=tokenizer, processor=processor,
                          layer=layer).mean(0)
