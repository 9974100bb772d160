"""The M2IV vectors object: per-head MHA vectors, MLP vectors, their gates, and metadata.

For decoder layer ``layers[i]`` (DESIGN.md section 1)::

    mha[i]       [H, Dh]   per-head vectors a[l, h], added to the o_proj input (head space)
    mha_gates[i] [H]       alpha[l, h]
    mlp[i]       [D]       b[l], added on the MLP branch
    mlp_gates[i] [L]       beta[l]

A *bank* stacks N such sets along a new leading dimension (``M2IV.stack``) so one batch can
serve several tasks (``handle.select(index)``).

File format (``save`` / ``load``): safetensors with four tensors ``mha``, ``mha_gates``,
``mlp``, ``mlp_gates`` and two header metadata entries: ``"m2iv"``, a JSON object holding
``meta`` plus ``"layers"`` (the covered decoder-layer indices), and ``"m2iv.sha256"``, the
checksum of that JSON text and of every tensor's name, dtype, shape and bytes
(:func:`checksum`). ``load`` verifies it, so a flipped byte anywhere in the data or the
metadata is an error rather than changed values; files saved before the checksum existed load
with an :class:`~m2iv.errors.M2IVWarning`. Never pickle.

(Over 500 lines on purpose: one public class whose every constructor, combinator and file path
shares the same validation rules, which read best in one place.)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ._atomic import atomic_write
from ._version import __version__
from .errors import IncompatibleVectorsError, M2IVWarning, VectorsFormatError

__all__ = ["M2IV", "FORMAT_VERSION", "METADATA_KEY", "CHECKSUM_KEY", "checksum",
           "format_layers"]

FORMAT_VERSION = 1
METADATA_KEY = "m2iv"
CHECKSUM_KEY = "m2iv.sha256"
TENSOR_NAMES = ("mha", "mha_gates", "mlp", "mlp_gates")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# meta keys derived from the tensors: always consistent with them
_DERIVED = ("hidden_size", "num_heads", "head_dim")
# per-task keys: kept per bank row by ``stack`` (under meta["bank"]), restored by ``bank[i]``
_PER_TASK = ("task", "shots", "description")
_SHARED_DEFAULTS = {"model_type": None, "num_layers": None}


def _shape(t: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)


class M2IV:
    """Multimodal in-context vectors for a decoder (one task, or a bank of N tasks).

    Args:
        mha: ``[L, H, Dh]`` (bank ``[N, L, H, Dh]``) per-head vectors in head space.
        mha_gates: ``[L, H]`` (bank ``[N, L, H]``).
        mlp: ``[L, D]`` (bank ``[N, L, D]``).
        mlp_gates: ``[L]`` (bank ``[N, L]``).
        layers: the ``L`` decoder-layer indices covered, strictly increasing.
        meta: JSON-serialisable metadata; the keys ``format_version``, ``hidden_size``,
            ``num_heads``, ``head_dim`` and ``package_version`` are filled in (and the shape keys
            checked against the tensors); ``model_type``, ``num_layers``, ``task``, ``shots``,
            ``description`` default to ``None``/``""``; any other key is kept as is.
        check_finite: reject NaN/inf values (a device sync on GPU; pass False in hot loops).

    The tensors are stored as given (no copy), so an ``M2IV`` built from ``nn.Parameter`` s
    stays differentiable through :func:`m2iv.patch_model`.

    Raises:
        VectorsFormatError: inconsistent shapes, non-float dtypes, bad layers, NaN/inf, or
            metadata that is not JSON-serialisable or disagrees with the tensors.
    """

    def __init__(self, mha: torch.Tensor, mha_gates: torch.Tensor, mlp: torch.Tensor,
                 mlp_gates: torch.Tensor, layers: Sequence[int],
                 meta: dict[str, Any] | None = None, *, check_finite: bool = True):
        tensors = {"mha": mha, "mha_gates": mha_gates, "mlp": mlp, "mlp_gates": mlp_gates}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise VectorsFormatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise VectorsFormatError(f"{name} must be a float tensor (float32, float16, "
                                         f"bfloat16 or float64); got {t.dtype}")
        if mha.dim() not in (3, 4):
            raise VectorsFormatError(f"mha must be [L, H, Dh] or a bank [N, L, H, Dh]; got shape "
                                     f"{_shape(mha)}")
        bank = mha.dim() == 4
        want_mlp_dim = 3 if bank else 2
        if mlp.dim() != want_mlp_dim:
            want = "a bank [N, L, D] (mha is a bank)" if bank else "[L, D]"
            raise VectorsFormatError(f"mlp must be {want}; got shape {_shape(mlp)}")
        if _shape(mha_gates) != _shape(mha)[:-1]:
            raise VectorsFormatError(f"mha_gates must have shape {_shape(mha)[:-1]} to match mha "
                                     f"{_shape(mha)}; got {_shape(mha_gates)}")
        if _shape(mlp_gates) != _shape(mlp)[:-1]:
            raise VectorsFormatError(f"mlp_gates must have shape {_shape(mlp)[:-1]} to match mlp "
                                     f"{_shape(mlp)}; got {_shape(mlp_gates)}")
        if mha.shape[:-2] != mlp.shape[:-1]:
            what = "bank size and layer count" if bank else "layer count"
            raise VectorsFormatError(f"mha {_shape(mha)} and mlp {_shape(mlp)} disagree on the "
                                     f"{what} ({_shape(mha)[:-2]} vs {_shape(mlp)[:-1]})")
        if any(s == 0 for s in mha.shape) or any(s == 0 for s in mlp.shape):
            raise VectorsFormatError(f"empty vectors: mha {_shape(mha)}, mlp {_shape(mlp)}")

        try:
            layers = tuple(int(i) for i in layers)
            if any(isinstance(i, bool) for i in layers):
                raise TypeError
        except (TypeError, ValueError):
            raise VectorsFormatError(f"layers must be a sequence of ints; got {layers!r}") from None
        n_layers = mha.shape[-3]
        if len(layers) != n_layers:
            raise VectorsFormatError(f"layers lists {len(layers)} indices but the vectors cover "
                                     f"{n_layers} layers (mha {_shape(mha)})")
        if any(i < 0 for i in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise VectorsFormatError(f"layers must be non-negative and strictly increasing; got "
                                     f"{list(layers)}")

        self.mha, self.mha_gates, self.mlp, self.mlp_gates = mha, mha_gates, mlp, mlp_gates
        self.layers: tuple[int, ...] = layers
        self.meta: dict[str, Any] = self._normalise_meta(meta)
        if check_finite:
            self.check_finite()

    # ------------------------------------------------------------------ metadata, properties

    def _normalise_meta(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise VectorsFormatError(f"meta must be a dict, got {type(meta).__name__}")
        meta = dict(meta)
        meta.pop("layers", None)  # the header's copy of .layers, never kept in meta
        version = meta.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
            raise VectorsFormatError(f"unsupported format_version {version!r}: this m2iv "
                                     f"({__version__}) reads versions 1..{FORMAT_VERSION}")
        meta["format_version"] = FORMAT_VERSION
        actual = {"hidden_size": self.hidden_size, "num_heads": self.num_heads,
                  "head_dim": self.head_dim}
        for key in _DERIVED:
            given = meta.get(key)
            if given is not None and given != actual[key]:
                raise VectorsFormatError(f"meta[{key!r}] = {given!r} disagrees with the tensors "
                                         f"({key} = {actual[key]}; mha {_shape(self.mha)}, mlp "
                                         f"{_shape(self.mlp)})")
            meta[key] = actual[key]
        for key, default in _SHARED_DEFAULTS.items():
            meta.setdefault(key, default)
        meta.setdefault("task", None)
        meta.setdefault("shots", None)
        meta.setdefault("description", "")
        meta.setdefault("package_version", __version__)
        num_layers = meta["num_layers"]
        if num_layers is not None:
            if not isinstance(num_layers, int) or num_layers < 1:
                raise VectorsFormatError(f"meta['num_layers'] must be a positive int; got "
                                         f"{num_layers!r}")
            if self.layers[-1] >= num_layers:
                raise VectorsFormatError(f"layers {list(self.layers)} go past the model's "
                                         f"num_layers = {num_layers} (meta)")
        if meta["model_type"] is not None and not isinstance(meta["model_type"], str):
            raise VectorsFormatError(f"meta['model_type'] must be a string; got "
                                     f"{meta['model_type']!r}")
        bank_meta = meta.get("bank")
        if bank_meta is not None:
            if not self.is_bank:
                raise VectorsFormatError("meta['bank'] (per-row metadata) is only valid for a bank")
            if not isinstance(bank_meta, list) or len(bank_meta) != self.n_bank or not all(
                    isinstance(m, dict) for m in bank_meta):
                raise VectorsFormatError(f"meta['bank'] must be a list of {self.n_bank} dicts "
                                         "(one per bank row)")
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise VectorsFormatError(f"meta must be JSON-serialisable: {err}") from None
        return meta

    @property
    def is_bank(self) -> bool:
        return self.mha.dim() == 4

    @property
    def n_bank(self) -> int | None:
        return self.mha.shape[0] if self.is_bank else None

    @property
    def num_layers(self) -> int:
        """Layers covered (``len(layers)``); the model's total is ``meta['num_layers']``."""
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.mha.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.mha.shape[-1]

    @property
    def hidden_size(self) -> int:
        return self.mlp.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.mha.dtype

    @property
    def device(self) -> torch.device:
        return self.mha.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four tensors by name (``mha``, ``mha_gates``, ``mlp``, ``mlp_gates``)."""
        return {"mha": self.mha, "mha_gates": self.mha_gates, "mlp": self.mlp,
                "mlp_gates": self.mlp_gates}

    def check_finite(self) -> None:
        """Raise :class:`VectorsFormatError` naming the tensor (and layer) holding NaN or inf
        (tensors on the meta device have no values to check)."""
        for name, t in self.tensors().items():
            if t.is_meta:
                continue
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                layer_axis = 1 if self.is_bank else 0
                rows = bad.flatten(layer_axis + 1).any(-1) if bad.dim() > layer_axis + 1 else bad
                pos = rows.nonzero()[0].tolist()
                layer = self.layers[pos[layer_axis]]
                where = f"bank row {pos[0]}, " if self.is_bank else ""
                raise VectorsFormatError(f"{name} holds NaN or inf values ({where}layer {layer})")

    def __repr__(self) -> str:
        bank = f"bank of {self.n_bank}, " if self.is_bank else ""
        task = self.meta.get("task")
        return (f"M2IV({bank}layers={format_layers(self.layers)}, heads={self.num_heads}, "
                f"head_dim={self.head_dim}, hidden={self.hidden_size}, dtype={self.dtype}, "
                f"device={self.device}, model_type={self.meta.get('model_type')!r}"
                + (f", task={task!r}" if task else "") + ")")

    def _replace(self, meta: dict | None = None, **tensors: torch.Tensor) -> M2IV:
        t = self.tensors()
        t.update(tensors)
        return M2IV(t["mha"], t["mha_gates"], t["mlp"], t["mlp_gates"], self.layers,
                    dict(self.meta if meta is None else meta), check_finite=False)

    # ------------------------------------------------------------------ conversion, arithmetic

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> M2IV:
        """A copy (or self's tensors where nothing changes) on ``device`` in ``dtype``.

        Differentiable: gradients flow back to the original tensors.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise TypeError(f"M2IV tensors must be floating point; got dtype {dtype}")
        return self._replace(**{k: v.to(device=device, dtype=dtype)
                                for k, v in self.tensors().items()})

    def detach(self) -> M2IV:
        return self._replace(**{k: v.detach() for k, v in self.tensors().items()})

    def clone(self) -> M2IV:
        return self._replace(**{k: v.clone() for k, v in self.tensors().items()})

    def requires_grad_(self, requires_grad: bool = True) -> M2IV:
        """Set ``requires_grad`` on all four tensors (in place); returns self."""
        for t in self.tensors().values():
            t.requires_grad_(requires_grad)
        return self

    def scale(self, s: float) -> M2IV:
        """The same vectors with every gate multiplied by ``s``."""
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"scale must be finite; got {s}")
        return self._replace(mha_gates=self.mha_gates * s, mlp_gates=self.mlp_gates * s)

    def __mul__(self, s: float) -> M2IV:
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            return self.scale(s)
        return NotImplemented

    __rmul__ = __mul__

    def __add__(self, other: M2IV) -> M2IV:
        if not isinstance(other, M2IV):
            return NotImplemented
        return M2IV.weighted_sum([(self, 1.0), (other, 1.0)])

    def compatibility(self, other: M2IV) -> str | None:
        """``None`` if ``other`` can be combined with ``self``, else the reason why not (the
        shape and model rules of :func:`m2iv.families.fit.incompatibility`)."""
        from .families.fit import ModelSpec, incompatibility

        if not isinstance(other, M2IV):
            return f"expected an M2IV, got {type(other).__name__}"
        if self.is_bank != other.is_bank:
            return "one is a bank and the other is not"
        if self.is_bank and self.n_bank != other.n_bank:
            return f"bank sizes differ ({self.n_bank} vs {other.n_bank})"
        why = incompatibility(ModelSpec.from_vectors(other), ModelSpec.from_vectors(self),
                              ("the other", "this one"))
        if why is not None:
            return why
        if self.device != other.device:
            return f"they are on different devices ({self.device} vs {other.device})"
        return None

    @staticmethod
    def weighted_sum(items: Sequence[tuple[M2IV, float]]) -> M2IV:
        """``sum_i w_i * v_i`` of compatible vectors.

        The effective steering ``gate * vector`` is summed, so the result has the gates folded
        into its vectors and all gates equal to 1: steering with the result equals steering with
        every item at strength ``w_i`` (exactly, by linearity). Computed in float32, returned in
        the first item's dtype.

        Raises:
            IncompatibleVectorsError: empty input, or an item that cannot be combined (why).
        """
        items = list(items)
        if not items:
            raise IncompatibleVectorsError("weighted_sum needs at least one (M2IV, weight) pair")
        first = items[0][0]
        for i, (v, w) in enumerate(items):
            why = first.compatibility(v)
            if why is not None:
                raise IncompatibleVectorsError(f"cannot combine item 0 with item {i}: {why}")
            if not isinstance(w, (int, float)) or not math.isfinite(float(w)):
                raise IncompatibleVectorsError(f"weight of item {i} must be a finite number; "
                                               f"got {w!r}")
        mha = sum(float(w) * v.mha_gates.float()[..., None] * v.mha.float() for v, w in items)
        mlp = sum(float(w) * v.mlp_gates.float()[..., None] * v.mlp.float() for v, w in items)
        meta = {k: v for k, v in first.meta.items() if k not in _PER_TASK and k != "bank"}
        tasks = {v.meta.get("task") for v, _ in items}
        meta["task"] = tasks.pop() if len(tasks) == 1 else None
        meta["shots"] = None
        meta["description"] = "weighted sum: " + " + ".join(
            f"{float(w):g}*{v.meta.get('task') or 'unnamed'}" for v, w in items)
        meta["components"] = [{"task": v.meta.get("task"), "weight": float(w)} for v, w in items]
        dt = first.dtype
        return M2IV(mha.to(dt), torch.ones_like(first.mha_gates, dtype=dt), mlp.to(dt),
                    torch.ones_like(first.mlp_gates, dtype=dt), first.layers, meta)

    # ------------------------------------------------------------------ banks

    @staticmethod
    def stack(items: Sequence[M2IV]) -> M2IV:
        """A bank ``[N, ...]`` of N compatible single vector sets (per-task meta kept per row)."""
        items = list(items)
        if not items:
            raise IncompatibleVectorsError("stack needs at least one M2IV")
        for i, v in enumerate(items):
            if not isinstance(v, M2IV):
                raise IncompatibleVectorsError(f"item {i} is a {type(v).__name__}, not an M2IV")
            if v.is_bank:
                raise IncompatibleVectorsError(f"item {i} is already a bank; stack single sets")
            why = items[0].compatibility(v)
            if why is not None:
                raise IncompatibleVectorsError(f"cannot stack item 0 with item {i}: {why}")
        dt = items[0].dtype

        def cat(name: str) -> torch.Tensor:
            return torch.stack([getattr(v, name).to(dt) for v in items])

        meta = {k: v for k, v in items[0].meta.items() if k not in _PER_TASK}
        for v in items[1:]:  # shared keys taken from the first item where it lacks them
            for k, val in v.meta.items():
                if k not in _PER_TASK and meta.get(k) is None:
                    meta[k] = val
        meta["task"] = None
        meta["bank"] = [{k: val for k, val in v.meta.items()
                         if k in _PER_TASK or k not in meta} for v in items]
        return M2IV(cat("mha"), cat("mha_gates"), cat("mlp"), cat("mlp_gates"), items[0].layers,
                    meta, check_finite=False)

    def __getitem__(self, i: int | slice) -> M2IV:
        """Row ``i`` of a bank as a single M2IV (a slice gives a smaller bank)."""
        if not self.is_bank:
            raise TypeError("only a bank of vectors (M2IV.stack) can be indexed")
        rows = self.meta.get("bank") or [{} for _ in range(self.n_bank)]
        shared = {k: v for k, v in self.meta.items() if k != "bank"}
        if isinstance(i, slice):
            meta = dict(shared, bank=rows[i])
            out = self._replace(meta=meta, **{k: v[i] for k, v in self.tensors().items()})
            if not out.n_bank:
                raise IndexError(f"empty slice {i} of a bank of {self.n_bank}")
            return out
        if not isinstance(i, int):
            raise TypeError(f"bank indices must be int or slice, got {type(i).__name__}")
        if not -self.n_bank <= i < self.n_bank:
            raise IndexError(f"bank row {i} out of range for a bank of {self.n_bank}")
        i %= self.n_bank
        meta = dict(shared)
        meta.update(rows[i])
        t = {k: v[i] for k, v in self.tensors().items()}
        return M2IV(t["mha"], t["mha_gates"], t["mlp"], t["mlp_gates"], self.layers, meta,
                    check_finite=False)

    def __len__(self) -> int:
        if not self.is_bank:
            raise TypeError("len() is defined for a bank of vectors only; see .num_layers")
        return self.n_bank

    def __iter__(self):
        if not self.is_bank:
            raise TypeError("only a bank of vectors can be iterated")
        return (self[i] for i in range(self.n_bank))

    # ------------------------------------------------------------------ model constructors

    @staticmethod
    def _model_vectors(model, layers):
        from .families import describe

        info = describe(model)
        if layers is None:
            layers = info.steerable_layers
        layers = tuple(sorted({int(i) for i in layers}))
        if not layers:
            raise VectorsFormatError("layers must name at least one decoder layer")
        for i in layers:
            info.check_layer_index(i)
        spec = info.layer(layers[0])
        meta = {"model_type": info.model_type, "num_layers": info.num_layers}
        text_type = getattr(info.text_config, "model_type", None)
        if text_type and text_type != info.model_type:
            meta["text_model_type"] = text_type  # e.g. LLaVA over "llama"
        return info, layers, spec, meta

    @staticmethod
    def zeros_like(model: torch.nn.Module, layers: Sequence[int] | None = None, *,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   bank: int | None = None) -> M2IV:
        """All-zero vectors (gates 1) fitting ``model``: every steerable layer by default.

        ``bank=N`` gives a bank of N.
        """
        info, layers, spec, meta = M2IV._model_vectors(model, layers)
        lead = (bank,) if bank else ()
        L, H, Dh, D = len(layers), spec.num_heads, spec.head_dim, spec.hidden_size
        kw = {"dtype": dtype, "device": device}
        return M2IV(torch.zeros(*lead, L, H, Dh, **kw), torch.ones(*lead, L, H, **kw),
                    torch.zeros(*lead, L, D, **kw), torch.ones(*lead, L, **kw), layers, meta)

    @staticmethod
    def random_like(model: torch.nn.Module, seed: int = 0, layers: Sequence[int] | None = None,
                    scale: float | None = None, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", bank: int | None = None) -> M2IV:
        """Random vectors that visibly change ``model``'s outputs; deterministic for a seed.

        Gates are ``U(0.5, 1.5)``. With ``scale=None`` the MLP vectors are ``N(0, s^2)`` with
        ``s`` the RMS of the model's (scaled) input embeddings, i.e. about the size of the
        residual stream at its start, and the MHA vectors are scaled so that after each layer's
        o_proj they have the same RMS. With ``scale`` given, every vector element is
        ``N(0, scale^2)``.
        """
        info, layers, spec, meta = M2IV._model_vectors(model, layers)
        g = torch.Generator().manual_seed(int(seed))
        lead = (bank,) if bank else ()
        L, H, Dh, D = len(layers), spec.num_heads, spec.head_dim, spec.hidden_size
        if scale is None:
            res_rms = info.embedding_rms()
            mha_scale = torch.tensor([res_rms / max(info.o_proj_gain(i), 1e-12) for i in layers])
            mlp_scale = torch.full((L,), res_rms)
        else:
            mha_scale = mlp_scale = torch.full((L,), float(scale))
        mha = torch.randn(*lead, L, H, Dh, generator=g) * mha_scale[:, None, None]
        mlp = torch.randn(*lead, L, D, generator=g) * mlp_scale[:, None]
        mha_g = torch.rand(*lead, L, H, generator=g) + 0.5
        mlp_g = torch.rand(*lead, L, generator=g) + 0.5
        meta["description"] = f"random_like(seed={int(seed)})"
        kw = {"dtype": dtype, "device": device}
        return M2IV(mha.to(**kw), mha_g.to(**kw), mlp.to(**kw), mlp_g.to(**kw), layers, meta)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`VectorsMismatchError` (naming the layer and both shapes) unless these
        vectors fit ``model``'s decoder layers (:func:`m2iv.families.fit.check_fits`)."""
        from .families.fit import check_fits

        check_fits(self, model)

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (temporary file, fsync, rename): a failed save
        leaves any previous file at ``path`` intact."""
        from safetensors.torch import save as st_save

        header = dict(self.meta, layers=list(self.layers))
        try:
            text = json.dumps(header, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise VectorsFormatError(f"meta must be JSON-serialisable: {err}") from None
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()}
        data = st_save(tensors, metadata={METADATA_KEY: text,
                                          CHECKSUM_KEY: checksum(text, tensors)})
        atomic_write(path, data)

    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict[str, Any]:
        """The header document of a saved M2IV (``meta`` plus ``"layers"``), without loading
        the tensors."""
        return _read_file(path, tensors=False)[1]

    @staticmethod
    def load(path: str | os.PathLike, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, *, verify: bool = True) -> M2IV:
        """Load and validate a file written by :meth:`save`.

        ``verify``: check the file's checksum (module docstring); a file without one loads
        with an :class:`~m2iv.errors.M2IVWarning`. ``False`` skips both, for callers that have
        just verified the whole file themselves (the library checks its sha256).

        Raises:
            FileNotFoundError: no file at ``path``.
            VectorsFormatError: not safetensors / truncated / corrupt, a checksum mismatch, no
                ``m2iv`` metadata, bad JSON, unsupported format version, missing/extra/non-float
                tensors, inconsistent shapes or metadata, NaN or inf (each with its own
                message).
        """
        tensors, header, verified = _read_file(path, tensors=True, verify=verify)
        layers = header.pop("layers")
        try:
            v = M2IV(tensors["mha"], tensors["mha_gates"], tensors["mlp"], tensors["mlp_gates"],
                     layers, header)
        except VectorsFormatError as err:
            raise VectorsFormatError(f"{os.fspath(path)}: {err}") from None
        if verified is False:
            warnings.warn(f"{os.fspath(path)} has no checksum (it was saved before m2iv stored "
                          "one), so its contents cannot be verified; M2IV.load(path).save(path) "
                          "adds one", M2IVWarning, stacklevel=2)
        if device is not None or dtype is not None:
            v = v.to(device=device, dtype=dtype)
        return v


def checksum(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """The ``m2iv.sha256`` of a vectors file: sha256 over the ``m2iv`` header JSON ``text``
    and, in :data:`TENSOR_NAMES` order, each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(text.encode())
    for name in TENSOR_NAMES:
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\n{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _verify(path: str, header_meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bool:
    """False for a file without a checksum; an error for one whose checksum differs."""
    want = header_meta.get(CHECKSUM_KEY)
    if want is None:
        return False
    got = checksum(header_meta[METADATA_KEY], tensors)
    if got != want:
        raise VectorsFormatError(f"{path}: checksum mismatch: the tensor data or metadata "
                                 f"changed after the file was saved (sha256 {got[:16]}..., "
                                 f"recorded {want[:16]}...); the file is corrupt: restore it "
                                 "from a copy or save the vectors again")
    return True


def _read_file(path, tensors: bool, verify: bool = False):
    """``(tensors, header document, verified)``: ``verified`` is None when not checked, False
    for a file without a checksum (a mismatch raises)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no M2IV file at {path!r}")
    if os.path.isdir(path):
        raise VectorsFormatError(f"{path!r} is a directory, not an M2IV file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header_meta = f.metadata() or {}
            names = set(f.keys())
            loaded = {k: f.get_tensor(k) for k in names & set(TENSOR_NAMES)} if tensors else {}
    except Exception as err:  # noqa: BLE001 - any parse failure means a corrupt file
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise VectorsFormatError(f"{path}: not a readable safetensors file (corrupt or "
                                 f"truncated?): {why}") from None
    if METADATA_KEY not in header_meta:
        raise VectorsFormatError(f"{path}: no {METADATA_KEY!r} entry in the safetensors header: "
                                 "not a file written by M2IV.save")
    try:
        header = json.loads(header_meta[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise VectorsFormatError(f"{path}: the {METADATA_KEY!r} header is not valid JSON ({err})") \
            from None
    if not isinstance(header, dict):
        raise VectorsFormatError(f"{path}: the {METADATA_KEY!r} header must be a JSON object")
    version = header.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise VectorsFormatError(f"{path}: unsupported format_version {version!r}; this m2iv "
                                 f"({__version__}) reads versions 1..{FORMAT_VERSION}")
    if not isinstance(header.get("layers"), list):
        raise VectorsFormatError(f"{path}: the header lacks the 'layers' list")
    missing = [n for n in TENSOR_NAMES if n not in names]
    if missing:
        raise VectorsFormatError(f"{path}: missing tensor(s) {missing}")
    extra = sorted(names - set(TENSOR_NAMES))
    if extra:
        raise VectorsFormatError(f"{path}: unexpected tensor(s) {extra}")
    for name, t in loaded.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise VectorsFormatError(f"{path}: tensor {name!r} has dtype {t.dtype}; M2IV tensors "
                                     "must be float32, float16, bfloat16 or float64")
    verified = _verify(path, header_meta, loaded) if tensors and verify else None
    return loaded, header, verified


def format_layers(layers: Sequence[int]) -> str:
    """``0..3`` for a range, else the list (``[0, 2, 5]``)."""
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)
