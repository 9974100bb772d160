"""Do these vectors fit: the one place that decides whether a vector set (an
:class:`~m2iv.M2IV`, a library entry) fits a model or can be combined with other vectors.

:class:`ModelSpec` is the small, comparable description of a model, or of the model a vector
set was made for:

* a *model* target (``layers is None``) accepts vectors when the hidden size, head count, head
  size and decoder-layer count agree, their layers exist in the model, and their model type is
  one the model answers to (an LVLM answers to its own type and to its language model's, e.g.
  ``llava`` and ``llama``). The model's name or path is recorded but not compared (the same
  checkpoint lives at different paths on different machines).
* a *vectors* target (``layers`` set) accepts vectors that could be combined with it
  (``M2IV.weighted_sum`` / ``M2IV.stack``): same shapes, same covered layers, and no
  disagreement on model type or decoder-layer count where both are known.

:func:`check_fits` is the layer-by-layer check against a loaded model (what ``patch_model``
runs), with errors naming the layer and both shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import VectorsMismatchError
from ..vectors import format_layers
from .discover import describe

__all__ = ["ModelSpec", "incompatibility", "check_fits"]


@dataclass(frozen=True)
class ModelSpec:
    """Shape and identity of a model (or of the model a vector set was made for)."""

    model_type: str | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    num_layers: int | None = None  # decoder layers of the whole model
    model_name: str | None = None
    #: every model type this model answers to (an LVLM: its own and its language model's)
    model_types: frozenset[str] = field(default_factory=frozenset)
    #: the covered decoder layers, for vectors and entries; None for a model
    layers: tuple[int, ...] | None = None

    @property
    def is_model(self) -> bool:
        return self.layers is None

    def types(self) -> frozenset[str]:
        return frozenset(t for t in (self.model_type, *self.model_types) if t)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "model_name": self.model_name,
                "hidden_size": self.hidden_size, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "num_layers": self.num_layers,
                "model_types": sorted(self.model_types),
                "layers": None if self.layers is None else list(self.layers)}

    # ------------------------------------------------------------------ constructors

    @classmethod
    def of(cls, obj: Any) -> ModelSpec:
        """A spec from a model, an M2IV, a library Entry, a ModelSpec or a dict of fields."""
        from ..vectors import M2IV

        if isinstance(obj, ModelSpec):
            return obj
        if isinstance(obj, M2IV):
            return cls.from_vectors(obj)
        if hasattr(obj, "model_spec") and callable(obj.model_spec):  # library Entry
            return obj.model_spec()
        if isinstance(obj, dict):
            d = dict(obj)
            d["model_types"] = frozenset(d.get("model_types") or ())
            if d.get("layers") is not None:
                d["layers"] = tuple(int(i) for i in d["layers"])
            return cls(**d)
        if isinstance(obj, torch.nn.Module) or hasattr(obj, "config"):
            return cls.from_model(obj)
        raise TypeError(f"cannot tell which model {type(obj).__name__} describes: pass a model, "
                        "an M2IV, a library entry or a ModelSpec")

    @classmethod
    def from_vectors(cls, v) -> ModelSpec:
        meta = v.meta
        types = {meta.get("model_type"), meta.get("text_model_type")} - {None}
        return cls(model_type=meta.get("model_type"), hidden_size=v.hidden_size,
                   num_heads=v.num_heads, head_dim=v.head_dim, num_layers=meta.get("num_layers"),
                   model_name=meta.get("model_name"), model_types=frozenset(types),
                   layers=tuple(v.layers))

    @classmethod
    def from_model(cls, model) -> ModelSpec:
        """From the model's structure (:func:`~m2iv.families.describe`) where m2iv can steer
        it, else from its config alone (e.g. a config-only stand-in for a GGUF import)."""
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"{type(model).__name__} has no .config: not a Hugging Face model")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        types = {getattr(config, "model_type", None), getattr(text, "model_type", None)}
        name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        hidden = getattr(text, "hidden_size", None)
        heads = getattr(text, "num_attention_heads", None)
        head_dim = getattr(text, "head_dim", None) or (
            hidden // heads if hidden and heads else None)
        num_layers = getattr(text, "num_hidden_layers", None)
        if isinstance(model, torch.nn.Module):
            info = describe(model)
            spec = info.layer(info.steerable_layers[0])
            hidden, heads, head_dim = spec.hidden_size, spec.num_heads, spec.head_dim
            num_layers = info.num_layers
        return cls(model_type=getattr(config, "model_type", None), hidden_size=hidden,
                   num_heads=heads, head_dim=head_dim, num_layers=num_layers,
                   model_name=str(name) if name else None,
                   model_types=frozenset(t for t in types if t))


def incompatibility(entry: ModelSpec, target: ModelSpec,
                    names: tuple[str, str] | None = None) -> str | None:
    """``None`` if vectors described by ``entry`` fit ``target``, else the reason why not.

    ``names`` labels the two sides in the reason (default ``("entry", "model"/"vectors")``).
    """
    a_name, b_name = names or ("entry", "model" if target.is_model else "vectors")
    for key in ("hidden_size", "num_heads", "head_dim"):
        a, b = getattr(entry, key), getattr(target, key)
        if a is not None and b is not None and a != b:
            return f"{key} differs ({a_name} {a}, {b_name} {b})"
    if entry.num_layers is not None and target.num_layers is not None \
            and entry.num_layers != target.num_layers:
        return (f"{a_name} was made for a model with {entry.num_layers} decoder layers, "
                f"{b_name} {'has' if target.is_model else 'for one with'} {target.num_layers} "
                "(different models)")
    if target.is_model:
        if entry.layers and target.num_layers is not None and \
                max(entry.layers) >= target.num_layers:
            return (f"{a_name} covers layer {max(entry.layers)} but the model has "
                    f"{target.num_layers} decoder layers")
        mine, theirs = entry.types(), target.types()
        if mine and theirs and not mine & theirs:
            return (f"{a_name} was made for model type {entry.model_type!r}, the model is "
                    f"{'/'.join(sorted(theirs))!r}")
        return None
    if entry.layers is not None and tuple(entry.layers) != tuple(target.layers):
        return (f"they cover different layers ({a_name} {format_layers(entry.layers)}, {b_name} "
                f"{format_layers(target.layers)})")
    if entry.model_type and target.model_type and entry.model_type != target.model_type:
        return (f"{a_name} was made for model type {entry.model_type!r}, {b_name} for "
                f"{target.model_type!r} (different models)")
    return None


def check_fits(vectors, model: torch.nn.Module, *, any_model_type: bool = True) -> None:
    """Raise :class:`VectorsMismatchError` (naming the layer and both shapes) unless
    ``vectors`` fit ``model``'s decoder layers; the decoder-layer count must agree too.

    ``any_model_type=False`` (what ``patch_model`` checks) also refuses vectors whose metadata
    names a model type the model does not answer to (an LVLM answers to its own type and its
    language model's, so LLaVA vectors fit its Llama decoder and back)."""
    info = describe(model)
    if not any_model_type:
        mine = {vectors.meta.get("model_type"), vectors.meta.get("text_model_type")} - {None}
        theirs = {info.model_type, getattr(info.text_config, "model_type", None)} - {None}
        if mine and theirs and not mine & theirs:
            raise VectorsMismatchError(
                f"the vectors were made for model type {vectors.meta.get('model_type')!r} but "
                f"the model is {'/'.join(sorted(theirs))!r}: vectors of another model steer "
                "meaningless directions even when the shapes agree. If they really belong to "
                "this model, pass allow_incompatible=True")
    for i in vectors.layers:
        info.check_layer_index(i, what="the vectors cover")
        spec = info.layer(i)
        if (vectors.num_heads, vectors.head_dim) != (spec.num_heads, spec.head_dim):
            raise VectorsMismatchError(
                f"layer {i}: vectors.mha has per-layer shape (H, Dh) = "
                f"{(vectors.num_heads, vectors.head_dim)} but the model's attention at layer "
                f"{i} has (H, Dh) = {(spec.num_heads, spec.head_dim)} (o_proj input "
                f"{spec.num_heads * spec.head_dim})")
        if vectors.hidden_size != spec.hidden_size:
            raise VectorsMismatchError(
                f"layer {i}: vectors.mlp has per-layer shape (D,) = ({vectors.hidden_size},) "
                f"but the model's hidden size at layer {i} is ({spec.hidden_size},)")
    n = vectors.meta.get("num_layers")
    if n is not None and n != info.num_layers:
        raise VectorsMismatchError(f"the vectors were made for a model with {n} decoder "
                                   f"layers (meta) but this model has {info.num_layers}")

