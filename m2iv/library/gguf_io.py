"""llama.cpp / repeng control vectors (GGUF) <-> M2IV.

The format (written by repeng's ``ControlVector.export_gguf`` and llama.cpp's
``cvector-generator``, read by llama.cpp's ``--control-vector``):

* ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the HF
  ``model_type``, informative) and ``controlvector.layer_count`` (number of directions);
* one 1-D F32 tensor ``direction.<k>`` of length D per steered layer.

**Layer numbering.** llama.cpp adds ``direction.k`` to the output of decoder block ``k``
(0-based, the same index as ``model.layers[k]`` in transformers), right after the block's
final residual add, at every position. ``k = 0`` is rejected by llama.cpp's loader (block 0's
output cannot be steered there); repeng numbers its layers the same way (hidden layer ``k`` =
output of ``model.layers[k]``). An M2IV MLP vector ``b[k]`` is added on the MLP branch of decoder
layer ``k``: ``r' = r + mlp_out + beta*b``, which is that same layer output. So:

* **import** maps ``direction.k`` exactly onto ``mlp[layer k]`` with ``mlp_gate = 1`` (MHA
  vectors zero, gates 1): steering with the imported vectors at ``positions="all"`` equals
  llama.cpp's control vector at strength 1;
* **export** writes ``direction.k = mlp_gate[k] * mlp[k]`` (exact) plus, when the model is
  given, the MHA part folded through the layer's o_proj, ``c[k] = W_o @ concat_h(alpha[k,h] *
  a[k,h])``. That fold is an **approximation**: in M2IV the MHA term is added after o_proj,
  *inside* the layer, so the post-attention norm and the MLP see it; a control vector is added
  to the layer output and skips them. Without a model the MHA part cannot be folded and is
  dropped (with a warning). A non-zero layer-0 vector is dropped too (llama.cpp refuses
  ``direction.0``) unless ``keep_layer_zero=True``.

Files are read with the ``gguf`` package's :class:`GGUFReader` (memory-mapped, no code
execution) and written with its :class:`GGUFWriter` (to a temporary file, fsynced, renamed).
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_path
from .._extras import require
from ..errors import M2IVWarning
from ..vectors import M2IV
from .errors import ControlVectorFormatError
from ..families import describe
from ..families.fit import ModelSpec

__all__ = ["ARCH", "ControlVector", "read_control_vector", "write_control_vector",
           "load_control_vector", "control_vector_directions", "save_control_vector",
           "FOLD_NOTE"]

ARCH = "controlvector"
_DIRECTION_RE = re.compile(r"^direction\.(\d+)$")

FOLD_NOTE = ("the MHA part was folded through o_proj (c = W_o @ concat_h(alpha*a)) and added "
             "to the layer output: this is an APPROXIMATION. In M2IV the MHA term is added after "
             "o_proj inside the layer, so the post-attention norm and the MLP see it; a control "
             "vector is added to the layer output and skips them. The MLP part is exact.")
DROP_MHA_NOTE = ("the vectors have a non-zero MHA part but no model was given to fold it "
                 "through o_proj: it was DROPPED (only the MLP part was written)")
LAYER0_NOTE = ("layer 0 has a non-zero vector but llama.cpp refuses direction.0 (block 0's "
               "output cannot be steered there): it was DROPPED; pass keep_layer_zero=True to "
               "write it anyway (repeng reads it; llama.cpp will then reject the file)")


def _gguf():
    return require("gguf", "GGUF interop")


@dataclass
class ControlVector:
    """The contents of a control-vector GGUF file."""

    directions: dict[int, np.ndarray]  # layer k -> float32 [D]
    model_hint: str | None = None
    layer_count: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.directions))


def _field_value(f) -> Any:
    try:
        value = f.contents()
    except Exception:  # noqa: BLE001 - older gguf: read the last part
        value = f.parts[-1].tolist()
        value = value[0] if len(value) == 1 else value
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_control_vector(path: str | os.PathLike) -> ControlVector:
    """Read and validate a control-vector GGUF file.

    Raises:
        FileNotFoundError, ControlVectorFormatError (not GGUF, truncated, another architecture,
        non-``direction.<k>`` or non-F32 / non-1-D tensors, sizes that disagree, NaN/inf).
    """
    gguf = _gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # noqa: BLE001 - any parse failure
        raise ControlVectorFormatError(f"{path}: not a readable GGUF file (truncated or not "
                                       f"GGUF?): "
                                       f"{err}") from None
    try:
        fields = {}
        for key, f in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                fields[key] = _field_value(f)
            except Exception:  # noqa: BLE001 - keep going: only a few keys matter
                fields[key] = None
        arch = fields.get("general.architecture")
        if arch != ARCH:
            raise ControlVectorFormatError(
                f"{path}: a GGUF file for architecture {arch!r}, not a control vector "
                f"(general.architecture must be {ARCH!r})")
        directions: dict[int, np.ndarray] = {}
        for t in reader.tensors:
            m = _DIRECTION_RE.match(t.name)
            if not m:
                raise ControlVectorFormatError(f"{path}: unexpected tensor {t.name!r}; a control "
                                               "vector holds only direction.<layer> tensors")
            k = int(m.group(1))
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise ControlVectorFormatError(f"{path}: {t.name} is {t.tensor_type.name}; "
                                               "control vectors are F32 (llama.cpp requires it)")
            if len(t.shape) != 1:
                raise ControlVectorFormatError(f"{path}: {t.name} has {len(t.shape)} dimensions "
                                               f"{tuple(int(s) for s in t.shape)}; must be 1-D")
            data = np.array(t.data, dtype=np.float32, copy=True).reshape(-1)
            if data.size != int(t.n_elements) or data.size == 0:
                raise ControlVectorFormatError(f"{path}: {t.name} is truncated ({data.size} of "
                                               f"{int(t.n_elements)} values)")
            if not np.isfinite(data).all():
                raise ControlVectorFormatError(f"{path}: {t.name} holds NaN or inf")
            directions[k] = data
    except ControlVectorFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - damaged file detected late
        raise ControlVectorFormatError(f"{path}: damaged GGUF file: {err}") from None
    finally:
        del reader
    if not directions:
        raise ControlVectorFormatError(f"{path}: no direction.<layer> tensors")
    sizes = {d.shape[0] for d in directions.values()}
    if len(sizes) != 1:
        raise ControlVectorFormatError(f"{path}: direction tensors disagree on their size "
                                       f"({sorted(sizes)})")
    hint = fields.get(f"{ARCH}.model_hint")
    count = fields.get(f"{ARCH}.layer_count")
    return ControlVector(directions=directions, model_hint=hint if isinstance(hint, str) else None,
                         layer_count=int(count) if isinstance(count, (int, np.integer)) else None,
                         fields=fields)


def write_control_vector(path: str | os.PathLike, directions: dict[int, Any],
                         model_hint: str | None = None) -> None:
    """Write ``{layer: [D] vector}`` as a control-vector GGUF file (atomically)."""
    gguf = _gguf()
    if not directions:
        raise ValueError("no directions to write")
    arrays = {}
    for k, d in sorted(directions.items()):
        if isinstance(d, torch.Tensor):
            d = d.detach().to("cpu", torch.float32).numpy()
        a = np.ascontiguousarray(np.asarray(d, dtype=np.float32).reshape(-1))
        if int(k) < 0:
            raise ValueError(f"layer index {k} must be >= 0")
        arrays[int(k)] = a
    if len({a.shape[0] for a in arrays.values()}) != 1:
        raise ValueError("all directions must have the same size")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        if model_hint:
            writer.add_string(f"{ARCH}.model_hint", str(model_hint))
        writer.add_uint32(f"{ARCH}.layer_count", len(arrays))
        for k, a in arrays.items():
            writer.add_tensor(f"direction.{k}", a)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def load_control_vector(path: str | os.PathLike, *, model=None, num_heads: int | None = None,
                        head_dim: int | None = None, num_layers: int | None = None,
                        model_type: str | None = None) -> M2IV:
    """An M2IV equal to a control vector: ``mlp[k] = direction.k``, gates 1, MHA zero.

    The MHA shapes come from ``model`` (any HF model, M2IV, entry or spec) or from
    ``num_heads`` and ``head_dim``. ``meta`` keeps ``gguf_model_hint`` and ``gguf_layer_count``.
    """
    cv = read_control_vector(path)
    spec = ModelSpec.of(model) if model is not None else ModelSpec()
    num_heads = num_heads or spec.num_heads
    head_dim = head_dim or spec.head_dim
    num_layers = num_layers or spec.num_layers
    if not num_heads or not head_dim:
        raise ValueError("importing a control vector needs the model's attention shape for the "
                         "(zero) MHA part: pass model= or num_heads= and head_dim=")
    D = cv.hidden_size
    if spec.hidden_size is not None and spec.hidden_size != D:
        raise ControlVectorFormatError(f"{os.fspath(path)}: directions have size {D} but the "
                                       f"model's hidden size is {spec.hidden_size}")
    layers = cv.layers
    if num_layers is not None and layers[-1] >= num_layers:
        raise ControlVectorFormatError(f"{os.fspath(path)}: direction.{layers[-1]} but the model "
                                       f"has {num_layers} decoder layers")
    mtype = model_type or spec.model_type or cv.model_hint
    if model is not None and cv.model_hint and spec.types() and cv.model_hint not in spec.types():
        warnings.warn(f"{os.fspath(path)} says it was made for {cv.model_hint!r} "
                      f"(controlvector.model_hint) but the model is "
                      f"{'/'.join(sorted(spec.types()))!r}; imported anyway, as the shapes fit "
                      "(llama.cpp writes its own architecture names there, e.g. 'llama' for "
                      "Mistral): make sure it belongs to this model", M2IVWarning, stacklevel=2)
    L = len(layers)
    mlp = torch.from_numpy(np.stack([cv.directions[k] for k in layers]))
    meta = {"model_type": mtype, "num_layers": num_layers,
            "description": f"imported from GGUF control vector {os.path.basename(os.fspath(path))}",
            "gguf_model_hint": cv.model_hint, "gguf_layer_count": cv.layer_count}
    if spec.model_name:
        meta["model_name"] = spec.model_name
    return M2IV(torch.zeros(L, num_heads, head_dim), torch.ones(L, num_heads), mlp,
                torch.ones(L), layers, meta)


def control_vector_directions(vectors: M2IV, *, model=None, index: int | None = None,
                              include_mha: bool = True, strength: float = 1.0,
                              keep_layer_zero: bool = False) -> tuple[dict[int, torch.Tensor],
                                                                        dict[str, Any]]:
    """The ``{layer: direction}`` a control vector equivalent of ``vectors`` holds, and a report
    (``mha``: ``"none"`` / ``"folded"`` / ``"dropped"`` / ``"excluded"``, ``notes``,
    ``dropped_layers``)."""
    if vectors.is_bank:
        if index is None:
            raise ValueError(f"the vectors are a bank of {vectors.n_bank}: pass index= to pick "
                             "the row to export")
        vectors = vectors[index]
    elif index is not None:
        raise ValueError("index= is only for a bank of vectors")
    v = vectors.detach().to("cpu", torch.float32)
    out = v.mlp_gates[:, None] * v.mlp  # [L, D]: exact
    mha_eff = v.mha_gates[..., None] * v.mha  # [L, H, Dh]
    report: dict[str, Any] = {"mha": "none", "notes": [], "dropped_layers": []}
    if bool(mha_eff.abs().max() > 0):
        if not include_mha:
            report["mha"] = "excluded"
            report["notes"].append("the MHA part was excluded on request (include_mha=False)")
        elif model is None:
            report["mha"] = "dropped"
            report["notes"].append(DROP_MHA_NOTE)
        else:
            info = describe(model)
            folded = []
            for i, layer in enumerate(v.layers):
                spec = info.layer(layer)
                if spec.o_proj_weight is None:
                    raise ValueError(f"layer {layer}: o_proj is not a plain float linear map "
                                     f"({type(spec.o_proj).__name__}; quantised?): cannot fold "
                                     "through it")
                w = spec.o_proj_weight.detach().to("cpu", torch.float32)
                flat = mha_eff[i].reshape(-1)
                if tuple(w.shape) != (v.hidden_size, flat.numel()):
                    raise ValueError(f"layer {layer}: o_proj.weight is {tuple(w.shape)} but the "
                                     f"vectors need [{v.hidden_size}, {flat.numel()}] (H*Dh)")
                folded.append(w @ flat)
            out = out + torch.stack(folded)
            report["mha"] = "folded"
            report["notes"].append(FOLD_NOTE)
    out = out * float(strength)
    directions = {int(k): out[i] for i, k in enumerate(v.layers)}
    if 0 in directions and not keep_layer_zero:
        if bool(directions[0].abs().max() > 0):
            report["notes"].append(LAYER0_NOTE)
            report["dropped_layers"].append(0)
        del directions[0]
    elif 0 in directions:
        report["notes"].append("direction.0 written on request: llama.cpp will reject this file")
    return directions, report


def save_control_vector(vectors: M2IV, path: str | os.PathLike, *, model=None,
                        model_hint: str | None = None, index: int | None = None,
                        include_mha: bool = True, strength: float = 1.0,
                        keep_layer_zero: bool = False, warn: bool = True) -> dict[str, Any]:
    """Write ``vectors`` as a llama.cpp / repeng control vector (see the module docstring for
    what is exact and what is approximate). Returns a report: ``path``, ``layers`` written,
    ``mha`` (``"none"``, ``"folded"`` = approximation, ``"dropped"``, ``"excluded"``),
    ``notes`` (also issued as warnings unless ``warn=False``), ``dropped_layers``."""
    directions, report = control_vector_directions(
        vectors, model=model, index=index, include_mha=include_mha, strength=strength,
        keep_layer_zero=keep_layer_zero)
    if not directions:
        raise ValueError("nothing to export: the vectors cover only layer 0, which llama.cpp "
                         "cannot steer (pass keep_layer_zero=True to write it anyway)")
    hint = model_hint or vectors.meta.get("model_type")
    if hint is None and model is not None:
        hint = ModelSpec.of(model).model_type
    write_control_vector(path, directions, hint)
    report.update(path=os.fspath(path), layers=sorted(directions), model_hint=hint,
                  hidden_size=vectors.hidden_size)
    if warn:
        for note in report["notes"]:
            warnings.warn(note, M2IVWarning, stacklevel=2)
    return report
