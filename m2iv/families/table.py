"""The family table: the per-family facts that a model's structure cannot give.

Everything else is found structurally (:mod:`m2iv.families.discover`): a family whose decoder
layers have a known style needs zero lines here. A row holds only:

* ``skip_layers``: layers M2IV does not steer. Mllama interleaves cross-attention layers
  (``text_config.cross_attention_layers``) that attend to the image, with no self-attention;
  M2IV vectors for Mllama cover the self-attention layers only (``zeros_like`` /
  ``random_like`` leave the cross-attention indices out) and vectors naming a cross-attention
  layer are rejected with :class:`~m2iv.errors.VectorsMismatchError`.
* ``attn_drop_kwargs``: layer keyword arguments the original layer forward consumes itself and
  never passes on to its attention (Mllama's cross-attention inputs).
* prompt facts: ``image_placeholder``, how a plain prompt marks an image for the processor
  (``"image_token"``: the processor's image token; ``"wrapped"``: vision start + image token
  + vision end, as Qwen-VL writes it; ``"boi"``: Gemma 3's begin-of-image token, which the
  processor expands), and ``chat_format``, the chat markup the family's models are trained on
  (``"llava"``: ``USER: ... ASSISTANT: ...``; ``"chatml"``: ``<|im_start|>role ...``).

Image tokens (``positions="text"`` skips them) come from the config attributes
``image_token_id`` and ``video_token_id`` (aliases such as ``image_token_index`` resolve) for
every model; markers around an image (Qwen's vision start/end, Gemma's begin/end-of-image,
InternVL's ``<img>``) are ordinary text tokens and stay steered.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "family_of", "IMAGE_TOKENS"]

IMAGE_TOKENS = ("image_token_id", "video_token_id")  # config attributes (aliases resolve)


@dataclass(frozen=True)
class Family:
    """Per-family facts (defaults: a family structure fully describes)."""

    name: str
    model_types: tuple[str, ...] = ()  # config.model_type values (top-level or text model)
    skip_layers: Callable[[object], dict[int, str]] | None = None  # text_config -> {i: why}
    attn_drop_kwargs: tuple[str, ...] = ()
    image_placeholder: str = "image_token"  # "image_token" | "wrapped" | "boi"
    chat_format: str = "llava"  # "llava" | "chatml"
    image_tokens: tuple[str, ...] = IMAGE_TOKENS


def _mllama_skips(text_config) -> dict[int, str]:
    return {int(i): "an Mllama cross-attention layer (M2IV steers the self-attention layers)"
            for i in (getattr(text_config, "cross_attention_layers", None) or ())}


FAMILIES: tuple[Family, ...] = (
    Family("mllama", ("mllama", "mllama_text_model"), skip_layers=_mllama_skips,
           attn_drop_kwargs=("cross_attention_states", "cross_attention_mask",
                             "full_text_row_masked_out_mask")),
    Family("qwen_vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), image_placeholder="wrapped",
           chat_format="chatml"),
    Family("gemma3", ("gemma3",), image_placeholder="boi"),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_of(model_type: str | None) -> Family:
    """The table row of ``model_type``, or the defaults (named after it) if it has none."""
    return _BY_TYPE.get(model_type) or Family(str(model_type), (model_type,) if model_type
                                              else ())
