"""The one table of per-family knowledge: where a model's decoder layers, attention, o_proj, MLP
and norms are, how its layers are shaped, and which token ids are image tokens.

Adding a family is a few lines in ``FAMILIES``:

    Family("my_lvlm", model_types=("my_lvlm",), layers=LVLM_LAYERS),   # layout from text_config
    Family("my_text", model_types=("my_text",), layers=TEXT_LAYERS, layout=LLAMA),

``layout=None`` (the LVLMs) takes the layer layout from the family of the model's text config
(``config.get_text_config().model_type``), so LLaVA over Llama or over Qwen2 both work.

Layer styles:

* ``"llama"``: pre-norm, ``h += attn(in_norm(h)); h += mlp(post_attn_norm(h))``. Patched by
  rewriting the decoder layer's forward around the fused ops; the MHA vectors are folded through
  o_proj into one D-vector per layer (exact by linearity; DESIGN.md section 1).
* ``"sandwich"`` (Gemma 3): ``h += post_attn_norm(attn(in_norm(h)));
  h += post_ff_norm(mlp(pre_ff_norm(h)))``. The MHA vectors go in head space on the o_proj
  input (a norm follows o_proj, so they cannot be moved past it) and the MLP vector rides on the
  fused final residual add.

Image tokens: ``"text"`` positions skip the ids named by ``Family.image_tokens`` (the image and
video placeholder ids of the config). Markers around an image (Qwen's vision start/end, Gemma's
begin/end-of-image, InternVL's ``<img>``) are ordinary text tokens and stay steered.

Mllama: the text model interleaves cross-attention layers (``text_config.cross_attention_layers``)
that attend to the image, with no self-attention and no o_proj of the usual kind. They are
*skipped*: M2IV vectors for Mllama cover the self-attention layers only (``zeros_like`` /
``random_like`` leave the cross-attention indices out) and vectors naming a cross-attention
layer are rejected with :class:`VectorsMismatchError`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .errors import UnsupportedModelError, VectorsMismatchError

__all__ = ["Layout", "Family", "FAMILIES", "ModelInfo", "LayerSpec", "describe", "find_family",
           "layer_device", "supported_families"]


@dataclass(frozen=True)
class Layout:
    """Attribute names inside one decoder layer, and the layer's style."""

    style: str = "llama"  # "llama" | "sandwich"
    attn: str = "self_attn"
    o_proj: str = "o_proj"  # inside ``attn``
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    pre_ff_norm: str | None = None  # sandwich only
    post_ff_norm: str | None = None  # sandwich only
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma uses 1.0
    # layer kwargs that the original forward consumes itself and does not pass to the attention
    attn_drop_kwargs: tuple[str, ...] = ()


LLAMA = Layout()
GEMMA3 = Layout(style="sandwich", pre_ff_norm="pre_feedforward_layernorm",
                post_ff_norm="post_feedforward_layernorm", norm_offset=1.0)
MLLAMA = Layout(attn_drop_kwargs=("cross_attention_states", "cross_attention_mask",
                                  "full_text_row_masked_out_mask"))

# where the decoder-layer ModuleList is, from the module handed to patch_model
TEXT_LAYERS = ("model.layers", "layers")  # *ForCausalLM, *Model
LVLM_LAYERS = ("model.language_model.layers", "language_model.layers")
IDEFICS_LAYERS = ("model.text_model.layers", "text_model.layers")
IMAGE_TOKENS = ("image_token_id", "video_token_id")  # config attributes (aliases resolve)


def _mllama_skips(text_config) -> dict[int, str]:
    return {int(i): "an Mllama cross-attention layer (M2IV steers the self-attention layers)"
            for i in (getattr(text_config, "cross_attention_layers", None) or ())}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type of the module handed to patch_model
    layers: tuple[str, ...]  # candidate dotted paths to the decoder-layer ModuleList
    layout: Layout | None = None  # None: the layout of the text config's family
    image_tokens: tuple[str, ...] = ()  # config attributes holding image/video token ids
    skip_layers: Callable[[object], dict[int, str]] | None = None  # text_config -> {idx: why}
    notes: str = ""


FAMILIES: tuple[Family, ...] = (
    # text-only causal LMs (and the language models inside LVLMs)
    Family("llama", ("llama",), TEXT_LAYERS, LLAMA),
    Family("mistral", ("mistral",), TEXT_LAYERS, LLAMA),
    Family("qwen2", ("qwen2",), TEXT_LAYERS, LLAMA),
    Family("qwen3", ("qwen3",), TEXT_LAYERS, LLAMA),
    Family("qwen2_vl_text", ("qwen2_vl_text",), TEXT_LAYERS, LLAMA),
    Family("qwen2_5_vl_text", ("qwen2_5_vl_text",), TEXT_LAYERS, LLAMA),
    Family("qwen3_vl_text", ("qwen3_vl_text",), TEXT_LAYERS, LLAMA),
    Family("gemma3_text", ("gemma3_text",), TEXT_LAYERS, GEMMA3),
    Family("mllama_text", ("mllama_text_model",), TEXT_LAYERS, MLLAMA,
           skip_layers=_mllama_skips),
    # vision-language models
    Family("llava", ("llava",), LVLM_LAYERS, image_tokens=IMAGE_TOKENS),
    Family("llava_next", ("llava_next",), LVLM_LAYERS, image_tokens=IMAGE_TOKENS),
    Family("llava_onevision", ("llava_onevision",), LVLM_LAYERS, image_tokens=IMAGE_TOKENS),
    Family("qwen2_vl", ("qwen2_vl",), LVLM_LAYERS, image_tokens=IMAGE_TOKENS),
    Family("qwen2_5_vl", ("qwen2_5_vl",), LVLM_LAYERS, image_tokens=IMAGE_TOKENS),
    Family("qwen3_vl", ("qwen3_vl",), LVLM_LAYERS, image_tokens=IMAGE_TOKENS),
    Family("idefics3", ("idefics3",), IDEFICS_LAYERS, image_tokens=IMAGE_TOKENS),
    Family("smolvlm", ("smolvlm",), IDEFICS_LAYERS, image_tokens=IMAGE_TOKENS),
    Family("gemma3", ("gemma3",), LVLM_LAYERS, GEMMA3, image_tokens=IMAGE_TOKENS),
    Family("mllama", ("mllama",), LVLM_LAYERS, MLLAMA, image_tokens=IMAGE_TOKENS,
           skip_layers=_mllama_skips),
    Family("internvl", ("internvl",), LVLM_LAYERS, image_tokens=IMAGE_TOKENS),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_families() -> list[str]:
    """The ``config.model_type`` values patch_model accepts."""
    return sorted(_BY_TYPE)


def find_family(model_type: str | None) -> Family:
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"m2iv does not know the architecture {model_type!r}. Supported model types: "
            f"{', '.join(supported_families())}. A new family is a few lines in "
            "m2iv/families.py (FAMILIES).")
    return family


def _get_path(module: torch.nn.Module, path: str):
    obj = module
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return None
        if obj is None:
            return None
    return obj


def layer_device(layer: torch.nn.Module) -> torch.device:
    """The device a decoder layer computes on: that of its parameters (device_map aware)."""
    for p in layer.parameters():
        return p.device
    for b in layer.buffers():
        return b.device
    return torch.device("cpu")


def _norm_eps(norm: torch.nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(norm, name, None)
        if isinstance(eps, (int, float)):
            return float(eps)
    raise UnsupportedModelError(f"cannot find the epsilon of the norm {type(norm).__name__}")


@dataclass
class LayerSpec:
    """One decoder layer, resolved through its family's layout."""

    index: int
    module: torch.nn.Module
    layout: Layout
    attn: torch.nn.Module
    o_proj: torch.nn.Module
    mlp: torch.nn.Module
    num_heads: int
    head_dim: int
    hidden_size: int

    @property
    def style(self) -> str:
        return self.layout.style

    def norm(self, which: str) -> torch.nn.Module:
        return getattr(self.module, getattr(self.layout, which))

    def norm_eps(self, which: str) -> float:
        return _norm_eps(self.norm(which))

    @property
    def device(self) -> torch.device:
        return layer_device(self.module)

    @property
    def o_proj_weight(self) -> torch.Tensor | None:
        """The o_proj weight ``[D, H*Dh]`` if it is a plain float linear map, else None."""
        w = getattr(self.o_proj, "weight", None)
        if (isinstance(self.o_proj, torch.nn.Linear) and isinstance(w, torch.Tensor)
                and w.dtype.is_floating_point and w.device.type != "meta"
                and tuple(w.shape) == (self.hidden_size, self.num_heads * self.head_dim)):
            return w
        return None


@dataclass
class ModelInfo:
    """What patch_model needs to know about a model (``describe(model)``)."""

    model: torch.nn.Module
    family: Family
    layout: Layout
    layers: torch.nn.ModuleList
    layers_path: str
    text_config: object
    skipped: dict[int, str] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def steerable_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.skipped)

    @cached_property
    def image_token_ids(self) -> tuple[int, ...]:
        ids = []
        for name in self.family.image_tokens:
            v = getattr(self.model.config, name, None)
            if isinstance(v, int) and not isinstance(v, bool):
                ids.append(v)
        return tuple(ids)

    def check_layer_index(self, i: int, what: str = "requested") -> None:
        if not 0 <= i < self.num_layers:
            raise VectorsMismatchError(
                f"layer {i}: {what} layer {i}, but the model ({self.model_type}) has "
                f"{self.num_layers} decoder layers (0..{self.num_layers - 1})")
        if i in self.skipped:
            raise VectorsMismatchError(f"layer {i}: {what} layer {i}, which is "
                                       f"{self.skipped[i]}")

    def layer(self, i: int) -> LayerSpec:
        self.check_layer_index(i)
        module = self.layers[i]
        lay = self.layout
        attn = getattr(module, lay.attn, None)
        o_proj = getattr(attn, lay.o_proj, None) if attn is not None else None
        mlp = getattr(module, lay.mlp, None)
        missing = [n for n, m in ((lay.attn, attn), (f"{lay.attn}.{lay.o_proj}", o_proj),
                                  (lay.mlp, mlp)) if m is None]
        norms = [lay.input_norm, lay.post_attn_norm] + (
            [lay.pre_ff_norm, lay.post_ff_norm] if lay.style == "sandwich" else [])
        missing += [n for n in norms if getattr(module, n, None) is None]
        if missing:
            raise UnsupportedModelError(
                f"layer {i} ({type(module).__name__}) of {self.model_type} lacks "
                f"{', '.join(missing)}: its layout does not match the {self.family.name!r} entry "
                "in m2iv/families.py")
        in_features = getattr(o_proj, "in_features", None)
        hidden = getattr(o_proj, "out_features", None)
        head_dim = getattr(attn, "head_dim", None) or getattr(self.text_config, "head_dim", None)
        if not (isinstance(in_features, int) and isinstance(hidden, int)
                and isinstance(head_dim, int) and in_features % head_dim == 0):
            raise UnsupportedModelError(
                f"cannot read the head layout of layer {i} of {self.model_type}: o_proj "
                f"{type(o_proj).__name__} (in_features={in_features}, out_features={hidden}), "
                f"head_dim={head_dim}")
        return LayerSpec(i, module, lay, attn, o_proj, mlp, in_features // head_dim, head_dim,
                         hidden)

    def embedding_rms(self) -> float:
        """RMS of the (scaled) input embeddings: the residual stream's size at its start."""
        emb = self.model.get_input_embeddings()
        w = emb.weight.detach()
        rms = float(w.float().pow(2).mean().sqrt()) if w.device.type != "meta" else 1.0
        scale = getattr(emb, "scalar_embed_scale", None) or getattr(emb, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            scale = float(scale)
        return rms * (float(scale) if isinstance(scale, (int, float)) else 1.0)

    def o_proj_gain(self, i: int) -> float:
        """RMS of ``o_proj(a)`` per unit-RMS random ``a``: ``||W||_F / sqrt(D)``."""
        spec = self.layer(i)
        w = getattr(spec.o_proj, "weight", None)
        if not isinstance(w, torch.Tensor) or w.device.type == "meta":
            return 1.0
        return float(w.detach().float().norm()) / math.sqrt(spec.hidden_size)


def describe(model: torch.nn.Module) -> ModelInfo:
    """Resolve ``model`` (an LVLM, its language model, or a causal LM) through the table.

    Raises:
        UnsupportedModelError: unknown architecture (listing the supported ones), or a model
            whose modules are not where its family entry says.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise UnsupportedModelError(f"expected a Hugging Face model (an nn.Module with .config); "
                                    f"got {type(model).__name__}")
    family = find_family(getattr(config, "model_type", None))
    layers = path = None
    for p in family.layers:
        found = _get_path(model, p)
        if isinstance(found, torch.nn.ModuleList) and len(found):
            layers, path = found, p
            break
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({family.name}): no decoder layers at "
            f"{' or '.join(family.layers)}")
    try:
        text_config = config.get_text_config()
    except (AttributeError, TypeError):
        text_config = config
    layout = family.layout
    if layout is None:
        text_type = getattr(text_config, "model_type", None)
        text_family = _BY_TYPE.get(text_type)
        if text_family is None or text_family.layout is None:
            raise UnsupportedModelError(
                f"{family.name} with a {text_type!r} language model is not supported: the text "
                f"model types m2iv knows are "
                f"{', '.join(sorted(t for f in FAMILIES if f.layout for t in f.model_types))}")
        layout = text_family.layout
        skip_fn = family.skip_layers or text_family.skip_layers
    else:
        skip_fn = family.skip_layers
    skipped = skip_fn(text_config) if skip_fn else {}
    return ModelInfo(model, family, layout, layers, path, text_config, skipped)
