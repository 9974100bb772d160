"""The live patch of one model (:class:`PatchHandle`): its settings, its per-layer steering
states, and installing / removing its rebound forwards.

Everything a forward needs is prepared when it is handed over, never per layer call: the
vectors are checked and placed (``patch_model``, :meth:`PatchHandle.set_vectors`), the banks
rewritten in place (:meth:`~PatchHandle.set_strength`), the per-sequence bank index kept in
per-batch-size buffers rewritten in place (:meth:`~PatchHandle.select`), the token rows made
once per forward. In eager mode each forward of the patched module also checks, cheaply,
whether the vectors' values or a folded o_proj weight changed in place since, and recomputes
what depends on them; a compiled graph cannot run that check (:meth:`~PatchHandle.refresh`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

import m2iv_kernels as mk
from m2iv_kernels import prepared
from m2iv_kernels._checks import Rows
from m2iv_kernels.prepared import NO_ROWS

from ..errors import VectorsFormatError
from ..families import LayerSpec, ModelInfo, module_device
from ..families.fit import check_fits
from ..vectors import M2IV
from . import verify
from .forwards import make_layer_forward, make_o_proj_forward, make_top_forward
from .positions import Positions
from .rebind import OWNER, Rebind
from .state import LayerState
from .styles import Inject

__all__ = ["PatchHandle", "handles_touching"]


class PatchHandle:
    """The live patch of one model; returned by :func:`~m2iv.patch_model`.

    Methods take effect on the next forward, with no re-patching: :meth:`set_vectors`,
    :meth:`set_strength`, :meth:`select`, :meth:`set_positions`; :meth:`remove` unpatches. Also a
    context manager (``with patch_model(...) as h:`` removes the patch on exit).
    """

    def __init__(self, model: torch.nn.Module, info: ModelInfo, vectors: M2IV, *,
                 strength: float, positions: Any, backend: str, index: Any, mha_mode: str,
                 allow_incompatible: bool = False):
        self.model, self.info = model, info
        self._any_model_type = bool(allow_incompatible)
        self._backend = _check_backend(backend, info)
        if mha_mode not in ("auto", "fold", "head"):
            raise ValueError(f"mha_mode must be 'auto', 'fold' or 'head'; got {mha_mode!r}")
        self._mha_mode = mha_mode
        self._strength = _check_strength(strength)
        self._pos = Positions(positions, info.image_token_ids, type(model).__name__)
        self._active = False
        self._replaced_by: PatchHandle | None = None
        self._vectors, self._vec_grad, self._states = self._prepare(vectors)
        self._set_sources(self._vectors)
        self._index_value: torch.Tensor | int | None = None
        # (device, batch size) -> the [B] bank index; select() rewrites them in place
        self._index_bufs: dict[tuple[torch.device, int], torch.Tensor] = {}
        self._rows_cache: tuple | None = None
        self._in_forward = False
        self._set_plain()
        if index is not None:
            self._index_value = self._check_index(index, self._vectors)
        self._top: Rebind | None = None
        self._layer_rebinds: list[Rebind] = []

    # ------------------------------------------------------------------ public API

    @property
    def active(self) -> bool:
        """True while this patch is installed."""
        return self._active

    @property
    def vectors(self) -> M2IV:
        return self._vectors

    @property
    def strength(self) -> float:
        return self._strength

    @property
    def positions(self) -> Any:
        return self._pos.value

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def index(self) -> torch.Tensor | int | None:
        return self._index_value

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers this patch steers."""
        return tuple(self._states)

    @property
    def modes(self) -> dict[int, str]:
        """Per steered layer: ``"fold"`` (MHA term folded through o_proj) or ``"head"``."""
        return {i: st.mode for i, st in self._states.items()}

    @property
    def styles(self) -> dict[int, str]:
        """Per steered layer: the name of its layer style (``m2iv.patch.styles``)."""
        return {i: st.spec.style for i, st in self._states.items()}

    def set_vectors(self, vectors: M2IV) -> None:
        """Swap the vectors (checked against the model first; on error nothing changes).

        A bank keeps the current :meth:`select` index if it is in range; a single set drops it.
        """
        self._check_live()
        new_vectors, vec_grad, states = self._prepare(vectors)
        index = self._index_value
        if new_vectors.is_bank and index is not None:
            self._check_index(index, new_vectors)
        elif not new_vectors.is_bank:
            index = None
        same_layout = (list(states) == list(self._states) and all(
            states[i].mode == self._states[i].mode for i in states))
        if same_layout:  # the banks a compiled graph reads take the new values in place
            for i, st in self._states.items():
                st.adopt(states[i])
            self._vectors, self._vec_grad = new_vectors, vec_grad
            self._set_sources(new_vectors)
            self._set_index(index)
            self._set_plain()
            return
        old = (self._vectors, self._vec_grad, self._states, self._index_value)
        self._uninstall_layers()
        self._vectors, self._vec_grad, self._states = new_vectors, vec_grad, states
        self._set_sources(new_vectors)
        self._set_index(index)
        self._set_plain()
        try:
            self._install_layers()
        except BaseException:
            self._uninstall_layers()
            self._vectors, self._vec_grad, self._states, index = old
            self._set_sources(self._vectors)
            self._set_plain()
            self._set_index(index)
            self._install_layers()
            raise

    def set_strength(self, strength: float) -> None:
        """Multiply every gate by ``strength`` from the next forward on; 0 switches steering
        off entirely (the patched layers run their original forward)."""
        self._check_live()
        self._strength = _check_strength(strength)
        for st in self._states.values():
            st.set_strength(self._strength)

    def select(self, index: torch.Tensor | Any | int | None) -> None:
        """Pick the bank row for each sequence: an int (every sequence), or ints ``[B]``;
        ``None`` clears the selection."""
        self._check_live()
        self._set_index(None if index is None else self._check_index(index, self._vectors))

    def refresh(self) -> None:
        """Recompute everything derived from the vectors' values and the folded o_proj weights.
        Eager forwards do this by themselves when those tensors were changed in place; a
        ``torch.compile``-d model reads the prepared tensors without checking, so call this
        after editing vectors or o_proj weights in place (``set_vectors``, ``set_strength`` and
        ``select`` need nothing)."""
        self._check_live()
        self._refresh(force=True)

    def set_positions(self, positions: Any) -> None:
        """Change which tokens are steered (see :mod:`m2iv.patch.positions`)."""
        self._check_live()
        self._pos = Positions(positions, self.info.image_token_ids, type(self.model).__name__)
        self._set_plain()

    def remove(self) -> None:
        """Unpatch: restore every rebound forward exactly. Idempotent."""
        if self._active:
            self._uninstall()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return (f"PatchHandle({state}, {self.info.model_type}, layers={list(self.layers)}, "
                f"strength={self._strength}, positions={self._pos.kind!r}, "
                f"backend={self._backend!r})")

    # ------------------------------------------------------------------ Steering (forwards)

    def inject(self, index: int, x: torch.Tensor) -> Inject:
        """The steering of decoder layer ``index`` for this forward (hidden states ``x``)."""
        st = self._states[index]  # looked up per call: set_vectors may swap the states
        if torch.is_grad_enabled():  # autograd records the public ops
            t = (st.tensors(self._strength, x.device) if self._vec_grad
                 else st.public_tensors())
            return Inject(st, None, t, self._pos.mask_for(x), self.index_for(x))
        if not torch.compiler.is_compiling():
            if x.device != st.device:  # the model moved (or an offloading hook)
                st.refresh(device=x.device)
            elif not self._in_forward:  # a layer called outside the patched module
                self._refresh(only=st)
            if self._every_token:  # no mask, no bank: the layer's one prepared Inject
                return st.inject
        return Inject(st, self._rows(x))

    def _set_plain(self) -> None:
        """Whether every token is steered by one vector set (no mask, no bank index)."""
        self._every_token = self._pos.kind == "all" and not self._vectors.is_bank

    def _rows(self, x: torch.Tensor) -> Rows:
        """This forward's token rows (mask, bank index), made once and shared by the layers."""
        mask, index = self._pos.mask_for(x), self.index_for(x)
        if mask is None and index is None:
            return NO_ROWS
        if torch.compiler.is_compiling():
            return prepared.rows(mask, index, x, self._vectors.n_bank or 1)
        lead = x.shape[:-1]
        c = self._rows_cache
        if c is None or c[0] is not mask or c[1] is not index or c[2] != lead:
            c = self._rows_cache = (mask, index, lead,
                                    prepared.rows(mask, index, x, self._vectors.n_bank or 1))
        return c[3]

    def index_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The ``[B]`` bank row per sequence on ``x``'s device (None for a single set)."""
        if not self._vectors.is_bank:
            return None
        key = (x.device, x.shape[0])
        buf = self._index_bufs.get(key)
        if buf is not None:
            return buf
        value = self._index_value
        if value is None:
            raise ValueError(f"the patched vectors are a bank of {self._vectors.n_bank}: call "
                             "handle.select(index) (an int, or one int per sequence) first")
        batch = x.shape[0]
        if not isinstance(value, int) and value.shape[0] != batch:
            raise ValueError(f"select() was given {value.shape[0]} bank indices but the "
                             f"batch has {batch} sequences")
        with torch.inference_mode(False):  # select() rewrites it, also outside inference mode
            buf = (torch.full((batch,), value, dtype=torch.long, device=x.device)
                   if isinstance(value, int) else value.to(x.device, copy=True))
        self._index_bufs[key] = buf
        return buf

    def _set_index(self, value: torch.Tensor | int | None) -> None:
        """Take a checked selection: rewrite the index buffers in place (compiled graphs keep
        reading them); drop those whose batch size no longer fits."""
        self._index_value = value
        for key, buf in list(self._index_bufs.items()):
            if value is None or (not isinstance(value, int) and value.shape[0] != key[1]):
                del self._index_bufs[key]
            elif isinstance(value, int):
                buf.fill_(value)
            else:
                buf.copy_(value)
        self._rows_cache = None

    def _run_top(self, sig, original, args, kwargs):
        if torch.compiler.is_compiling() or self._in_forward:
            return self._pos.run(sig, original, args, kwargs)
        self._refresh()
        self._in_forward = True
        try:
            return self._pos.run(sig, original, args, kwargs)
        finally:
            self._in_forward = False

    def _set_sources(self, vectors: M2IV) -> None:
        """Remember the vectors' tensors and their versions (in-place edits bump them)."""
        self._source_tensors = tuple(vectors.tensors().values())
        self._sources = tuple(t._version for t in self._source_tensors)

    def _refresh(self, force: bool = False, only: LayerState | None = None) -> None:
        """Once per eager forward: recompute the banks of layers whose inputs changed in place
        (the vectors' values: every layer; a folded o_proj weight: its layer, or ``only``)."""
        versions = tuple(t._version for t in self._source_tensors)
        changed = force or versions != self._sources
        if changed:
            _check_data(self._vectors)  # values written in place since they were checked
            self._sources = versions
        for st in (self._states.values() if changed or only is None else (only,)):
            if changed or st.stale():
                st.refresh()

    # ------------------------------------------------------------------ preparation

    def _check_live(self) -> None:
        if not self._active:
            why = ("it was replaced by a later patch_model call on the same model"
                   if self._replaced_by is not None else "it was removed")
            raise RuntimeError(f"this patch is no longer active: {why}")

    def _prepare(self, vectors: M2IV) -> tuple[M2IV, bool, dict[int, LayerState]]:
        if not isinstance(vectors, M2IV):
            raise TypeError(f"vectors must be an m2iv.M2IV; got {type(vectors).__name__}")
        _check_data(vectors)
        check_fits(vectors, self.info.model, any_model_type=self._any_model_type)
        wanted = {i: self._wanted_mode(self.info.layer(i)) for i in vectors.layers}
        modes = verify.confirm_modes(self.info, wanted, allow_head=self._mha_mode == "auto",
                                     mute=handles_touching(self.model, self.info))
        # each layer's banks on its device now (device_map aware), the backend resolved there
        states = {i: LayerState(self.info.layer(i), slot, modes[i], vectors, self._strength,
                                self._backend) for slot, i in enumerate(vectors.layers)}
        vec_grad = any(t.requires_grad for t in vectors.tensors().values())
        return vectors, vec_grad, states

    def _wanted_mode(self, spec: LayerSpec) -> str:
        """Fold where the style allows it and o_proj is a plain float linear map; head space
        otherwise (``mha_mode`` may force either; an impossible fold is an error)."""
        if not spec.parts.style.fold:
            if self._mha_mode == "fold":
                raise ValueError(f"mha_mode='fold' is impossible for layer {spec.index} of "
                                 f"{self.info.model_type}: a {spec.style} layer (a norm "
                                 "follows o_proj), so the MHA vectors must stay in head space")
            return "head"
        if self._mha_mode == "head":
            return "head"
        if spec.o_proj_weight is None:
            if self._mha_mode == "fold":
                raise ValueError(f"mha_mode='fold' needs a plain float nn.Linear o_proj; layer "
                                 f"{spec.index} has {type(spec.o_proj).__name__}")
            return "head"
        return "fold"

    @staticmethod
    def _check_index(index: Any, vectors: M2IV) -> torch.Tensor | int:
        if not vectors.is_bank:
            raise ValueError("select() picks rows of a bank of vectors, but the patched vectors "
                             "are a single set (make a bank with M2IV.stack)")
        n = vectors.n_bank
        if isinstance(index, int) and not isinstance(index, bool):
            if not 0 <= index < n:
                raise ValueError(f"bank row {index} out of range for a bank of {n}")
            return index
        t = torch.as_tensor(index)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"index must hold integers; got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"index must be an int or a 1-D list of ints (one per sequence); "
                             f"got shape {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"index values must lie in [0, {n}) for a bank of {n}; got "
                             f"{t.tolist()}")
        return t.to(torch.long).cpu()

    # ------------------------------------------------------------------ install / uninstall

    def _install(self) -> None:
        try:
            self._top = Rebind(self.model, make_top_forward(self._run_top))
            self._top.install()
            OWNER[self.model] = self
            self._install_layers()
        except BaseException:
            self._uninstall()
            raise
        self._active = True
        self._replaced_by = None

    def _install_layers(self) -> None:
        drop = self.info.attn_drop_kwargs
        for i, st in self._states.items():  # fused across the boundary where it is exact
            nxt = self._states.get(i + 1)
            st.next_input = nxt if (nxt is not None and nxt.device == st.device
                                    and nxt.facts.get("input") is not None
                                    and self.info.layers[i + 1] is nxt.spec.module) else None
            st.pre = None
        for i, st in self._states.items():
            spec = st.spec
            self._rebind(spec.module, make_layer_forward(self, spec, drop))
            if st.mode == "head":
                self._rebind(spec.o_proj, make_o_proj_forward(self, i))

    def _rebind(self, module: torch.nn.Module, make) -> None:
        rb = Rebind(module, make)
        self._layer_rebinds.append(rb)
        rb.install()
        OWNER[module] = self

    def _uninstall_layers(self) -> None:
        for rb in reversed(self._layer_rebinds):
            rb.uninstall()
            if OWNER.get(rb.module) is self:
                del OWNER[rb.module]
        self._layer_rebinds = []

    def _uninstall(self) -> None:
        self._uninstall_layers()
        if self._top is not None:
            self._top.uninstall()
            if OWNER.get(self.model) is self:
                del OWNER[self.model]
            self._top = None
        self._active = False
        self._pos.reset()
        self._rows_cache = None


# ---------------------------------------------------------------------- argument checks

def _check_strength(strength: Any) -> float:
    """A finite real number (a one-element tensor too); never a string or a bool, which
    ``float()`` would silently turn into one."""
    ok = isinstance(strength, numbers.Real) and not isinstance(strength, bool)
    if isinstance(strength, torch.Tensor):
        ok = strength.numel() == 1 and not (strength.dtype.is_complex or
                                            strength.dtype == torch.bool)
    if not ok:
        raise TypeError(f"strength must be a real number (e.g. 1.0); got "
                        f"{type(strength).__name__} {strength!r}")
    s = float(strength)
    if not math.isfinite(s):
        raise ValueError(f"strength must be finite; got {s}")
    return s


def _check_data(vectors: M2IV) -> None:
    """Vectors that hold real, finite values: checked whenever vectors are handed to a patch
    (their tensors may have been written in place since the M2IV was built), never per
    forward."""
    if vectors.device.type == "meta" or any(t.is_meta for t in vectors.tensors().values()):
        raise VectorsFormatError("the vectors are on the meta device: they have shapes but no "
                                 "values (built under torch.device('meta') or an empty-weights "
                                 "context?); load or create them on a real device, e.g. "
                                 "M2IV.load(path) or vectors.to('cpu') after filling them")
    try:
        vectors.check_finite()
    except VectorsFormatError as err:
        raise VectorsFormatError(f"{err}: refusing to steer with them (every logit would be "
                                 "NaN); the model is unchanged") from None


def _check_backend(backend: str, info: ModelInfo) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    if backend == "auto":
        return backend
    known = mk.available_backends(torch.device("cpu"))
    if backend not in known:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of "
                         f"{', '.join(repr(b) for b in known)}")
    for dev in {module_device(layer) for layer in info.layers}:
        why = mk.available_backends(dev).get(backend)
        if why is not True:
            raise RuntimeError(f"backend {backend!r} is unavailable on {dev}: {why}")
    return backend


def handles_touching(model: torch.nn.Module, info: ModelInfo) -> list[PatchHandle]:
    """The live patches that rebound ``model`` or any of its decoder layers (or o_projs)."""
    found: list[PatchHandle] = []
    candidates = [model, *info.layers]
    for i in info.steerable_layers:
        candidates.append(info.layer(i).o_proj)
    for m in candidates:
        h = OWNER.get(m)
        if h is not None and h._active and h not in found:
            found.append(h)
    return found
