"""What a vector set was made for, and whether an entry fits a model or other vectors.

:class:`ModelSpec` is the small, comparable description the library keeps for every entry and
computes for a target (a Hugging Face model, an :class:`~m2iv.M2IV`, or another entry):

* a *model* target (``layers is None``) accepts an entry when the hidden size, head count,
  head size and decoder-layer count agree, the entry's layers exist in the model, and the
  entry's model type is one the model answers to (an LVLM answers to its own type and to its
  language model's, e.g. ``llava`` and ``llama``). The model's name or path is recorded but
  not compared (the same checkpoint lives at different paths on different machines).
* a *vectors* target (``layers`` set) accepts an entry that could be combined with it
  (``M2IV.weighted_sum`` / ``M2IV.stack``): same shapes, same covered layers, and no
  disagreement on model type or decoder-layer count where both are known.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ModelSpec", "incompatibility", "decoder_layers", "o_proj_weight"]


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
        model_type = getattr(config, "model_type", None)
        try:  # the patcher's own description of the model wins where it knows the model
            from ..families import describe

            info = describe(model)
        except Exception:  # noqa: BLE001 - families missing or model unknown: use the config
            info = None
        if info is not None:
            model_type = getattr(info, "model_type", None) or model_type
            types.add(model_type)
            num_layers = getattr(info, "num_layers", None) or num_layers
            try:
                first = tuple(getattr(info, "steerable_layers", (0,)))[0]
                spec = info.layer(first)
                hidden, heads, head_dim = spec.hidden_size, spec.num_heads, spec.head_dim
            except Exception:  # noqa: BLE001
                pass
        return cls(model_type=model_type, hidden_size=hidden, num_heads=heads, head_dim=head_dim,
                   num_layers=num_layers, model_name=str(name) if name else None,
                   model_types=frozenset(t for t in types if t))


def incompatibility(entry: ModelSpec, target: ModelSpec,
                    names: tuple[str, str] | None = None) -> str | None:
    """``None`` if vectors described by ``entry`` fit ``target``, else the reason why not.

    ``names`` labels the two sides in the reason (default ``("entry", "model"/"vectors")``).
    """
    a_name, b_name = names or ("entry", "model" if target.is_model else "vectors")
    for key, what in (("hidden_size", "hidden size"), ("num_heads", "attention heads"),
                      ("head_dim", "head size")):
        a, b = getattr(entry, key), getattr(target, key)
        if a is not None and b is not None and a != b:
            return f"{what} differs ({a_name} {a}, {b_name} {b})"
    if entry.num_layers is not None and target.num_layers is not None \
            and entry.num_layers != target.num_layers:
        return (f"{a_name} was made for a model with {entry.num_layers} decoder layers, "
                f"{b_name} {'has' if target.is_model else 'for one with'} {target.num_layers}")
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
        return f"{a_name} covers layers {list(entry.layers)}, {b_name} {list(target.layers)}"
    if entry.model_type and target.model_type and entry.model_type != target.model_type:
        return (f"{a_name} was made for model type {entry.model_type!r}, {b_name} for "
                f"{target.model_type!r}")
    return None


def decoder_layers(model, num_layers: int | None = None) -> torch.nn.ModuleList:
    """The model's decoder layers: ``m2iv.families.describe(model).layers`` where the family
    table knows the model, otherwise the one ``ModuleList`` whose items have
    ``self_attn.o_proj`` (vision-tower layers use other projection names)."""
    try:
        from ..families import describe

        return describe(model).layers
    except Exception:  # noqa: BLE001 - families missing or model unknown: search below
        pass
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(
                hasattr(getattr(m, "self_attn", None), "o_proj") for m in module):
            found.append((name, module))
    if num_layers is not None:
        found = [(n, m) for n, m in found if len(m) == num_layers] or found
    if len(found) != 1:
        names = [n for n, _ in found]
        raise ValueError(f"cannot locate the decoder layers of {type(model).__name__} "
                         f"(candidates: {names or 'none'}): expected exactly one list of layers "
                         "with self_attn.o_proj")
    return found[0][1]


def o_proj_weight(model, layer: int, num_layers: int | None = None) -> torch.Tensor:
    """The attention output projection weight ``W_o`` [D, H*Dh] of decoder layer ``layer``
    (through ``m2iv.families`` where it knows the model)."""
    try:
        from ..families import describe

        info = describe(model)
    except Exception:  # noqa: BLE001 - families missing or model unknown: search the modules
        info = None
    if info is not None:
        spec = info.layer(layer)
        weight = spec.o_proj_weight
        if weight is None:
            raise ValueError(f"layer {layer}: o_proj is not a plain float linear map "
                             f"({type(spec.o_proj).__name__}; quantised?): cannot fold through it")
        return weight
    layers = decoder_layers(model, num_layers)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} decoder layers")
    weight = getattr(layers[layer].self_attn.o_proj, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or \
            not weight.dtype.is_floating_point:
        raise ValueError(f"layer {layer}: o_proj has no plain float [D, H*Dh] weight "
                         "(quantised?): cannot fold through it")
    return weight
