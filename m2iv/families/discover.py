"""Structural discovery: the text decoder's layers of any LVLM or LM, and each layer's style.

* The decoder layers are the ``ModuleList`` beside the model's input embeddings
  (``model.get_input_embeddings()``): the text model owns both, while vision towers, resamplers
  and projectors have no token embeddings. Its layers must have an attention with an ``o_proj``.
* Each layer's style comes from its children (:func:`m2iv.patch.styles.match`): the attention,
  the MLP, and exactly the norms (and residual dropouts) of one style. ``patch_model`` then
  verifies the style against the layer's own forward before patching
  (:mod:`m2iv.patch.verify`).
* Heads come from o_proj (``in_features = H * Dh``) and the attention's ``head_dim``.

A layer that matches no style is refused with :class:`~m2iv.errors.UnsupportedModelError`
naming its class, its children and the styles m2iv knows; nothing is guessed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from ..errors import UnsupportedModelError, VectorsMismatchError
from .devices import module_device
from .table import Family, family_of

if TYPE_CHECKING:  # the style table lives with the patcher, which imports this module
    from ..patch.styles import Parts

__all__ = ["ModelInfo", "LayerSpec", "describe"]


@dataclass
class LayerSpec:
    """One decoder layer: its modules in the roles of its style, and its head layout."""

    index: int
    module: torch.nn.Module
    parts: Parts  # the layer's modules in the roles of its style
    attn: torch.nn.Module
    o_proj: torch.nn.Module
    mlp: torch.nn.Module
    num_heads: int
    head_dim: int
    hidden_size: int

    @property
    def style(self) -> str:
        return self.parts.style.name

    @property
    def device(self) -> torch.device:
        """Where the layer computes (its vectors are placed there)."""
        return module_device(self.module)

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
    """What m2iv knows about a model (``describe(model)``)."""

    model: torch.nn.Module
    family: Family
    layers: torch.nn.ModuleList
    layers_path: str
    owner: torch.nn.Module  # the text model: holds the embeddings and the layers
    text_config: object
    skipped: dict[int, str] = field(default_factory=dict)
    attn_drop_kwargs: tuple[str, ...] = ()
    _specs: dict[int, LayerSpec] = field(default_factory=dict, repr=False)

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
        if i not in self._specs:
            self._specs[i] = _layer_spec(self, i)
        return self._specs[i]

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


def _layer_spec(info: ModelInfo, i: int) -> LayerSpec:
    from ..patch.styles import describe_styles, match  # the style table lives with the patcher

    module = info.layers[i]
    parts, why = match(module)
    if parts is None:
        children = ", ".join(f"{n} ({type(c).__name__})" for n, c in module.named_children())
        raise UnsupportedModelError(
            f"layer {i} ({type(module).__name__}) of {info.model_type} matches no layer style "
            f"m2iv knows: {why}. Its children: {children}. The styles:\n{describe_styles()}\n"
            "A new style is one entry in m2iv/patch/styles.py (STYLES) plus its body.")
    attn = parts.attn_module
    o_proj = attn.o_proj
    in_features = getattr(o_proj, "in_features", None)
    hidden = getattr(o_proj, "out_features", None)
    head_dim = getattr(attn, "head_dim", None) or getattr(info.text_config, "head_dim", None)
    if not (isinstance(in_features, int) and isinstance(hidden, int)
            and isinstance(head_dim, int) and in_features % head_dim == 0):
        raise UnsupportedModelError(
            f"cannot read the head layout of layer {i} ({type(module).__name__}) of "
            f"{info.model_type}: o_proj {type(o_proj).__name__} (in_features={in_features}, "
            f"out_features={hidden}), head_dim={head_dim}")
    return LayerSpec(i, module, parts, attn, o_proj, getattr(module, parts.mlp_name),
                     in_features // head_dim, head_dim, hidden)


def _has_o_proj(layer: torch.nn.Module) -> bool:
    return any(isinstance(getattr(c, "o_proj", None), torch.nn.Module)
               for c in layer.children())


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.Module, torch.nn.ModuleList]:
    """``(path, owner, layers)``: the ModuleList beside the input embeddings."""
    what = type(model).__name__
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if not isinstance(emb, torch.nn.Module):
        raise UnsupportedModelError(f"{what} has no input embeddings (get_input_embeddings()): "
                                    "m2iv finds the text decoder's layers beside them")
    owner_name = next((n for n, m in model.named_modules()
                       if any(c is emb for c in m.children())), None)
    owner = model.get_submodule(owner_name) if owner_name is not None else None
    lists = [(n, c) for n, c in (owner.named_children() if owner is not None else ())
             if isinstance(c, torch.nn.ModuleList) and len(c)]
    found = [(n, c) for n, c in lists if any(_has_o_proj(layer) for layer in c)]
    if len(found) != 1:
        held = ", ".join(f"{n} ({len(c)} x {type(c[0]).__name__})" for n, c in lists) or \
            "no ModuleList"
        where = f"{owner_name or what} ({type(owner).__name__})" if owner is not None else what
        raise UnsupportedModelError(
            f"cannot find the text decoder layers of {what}: m2iv looks for one ModuleList "
            f"beside the input embeddings whose layers have an attention with an o_proj; "
            f"{where} holds {held}")
    name, layers = found[0]
    return (f"{owner_name}.{name}" if owner_name else name), owner, layers


def describe(model: torch.nn.Module) -> ModelInfo:
    """Resolve ``model`` (an LVLM, its language model, or a causal LM) structurally.

    Raises:
        UnsupportedModelError: not a Hugging Face model, no text decoder layers found, or a
            layer that matches no style (naming its class and what was expected).
    """
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise UnsupportedModelError(f"expected a Hugging Face model (an nn.Module with .config); "
                                    f"got {type(model).__name__}")
    path, owner, layers = _decoder_layers(model)
    try:
        text_config = config.get_text_config()
    except (AttributeError, TypeError):
        text_config = config
    family = family_of(getattr(config, "model_type", None))
    text_family = family_of(getattr(text_config, "model_type", None))  # e.g. Mllama's text model
    skip = family.skip_layers or text_family.skip_layers
    info = ModelInfo(model, family, layers, path, owner, text_config,
                     skip(text_config) if skip else {},
                     family.attn_drop_kwargs or text_family.attn_drop_kwargs)
    for i in info.steerable_layers:
        info.layer(i)  # every layer's style, now: an unknown shape is refused up front
    return info
