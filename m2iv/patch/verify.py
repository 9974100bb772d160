"""Proof that a layer's style is its forward, before anything is patched.

A style is matched by module structure (:func:`m2iv.patch.styles.match`); modules alone can lie
(Granite scales its branches, GLM-4's ``post_attention_layernorm`` is a pre-norm, an attention
may do something after o_proj). So for every steered layer, once, ``patch_model``:

1. captures the layer's inputs from a probe forward of the text model (a few tokens, eval
   mode, no cache; stopped at the first layer whose weights are not materialised);
2. runs the layer's *own* forward steered exactly as DESIGN.md section 1 says (a forward
   pre-hook adds random per-head vectors to the o_proj input; the MLP vector is added to the
   layer's output) and the style's body through the same rebound forward ``patch_model``
   installs (with those vectors, in each mode it would use: folded through o_proj or in head
   space), on the same inputs;
3. requires the two to agree to rounding: ``||got - want|| / ||want - x||`` below a dtype
   tolerance, where the probe's residual input ``x`` is rescaled to the size of the layer's
   update, so half-precision rounding of a large residual cannot hide a wrong update.

Residual dropouts with ``p > 0`` are made visible meanwhile (each multiplies by its own
constant), so a dropout a body applies in the wrong place fails too. In ``mha_mode="auto"`` a
layer whose fold fails but whose head mode passes is steered in head space (the fold is exact
only where the attention output reaches the residual add unchanged). A layer that fails is
refused with :class:`~m2iv.errors.UnsupportedModelError` naming its class, its style and the
error; the model is left untouched. Results are cached per layer instance. Layers whose weights
are on the meta device cannot run; they take the verdict of a verified layer of the same class
and naming in the same model, or are refused.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Iterable, Iterator

import torch

from m2iv_kernels.prepared import NO_ROWS

from ..errors import UnsupportedModelError
from ..families import LayerSpec, ModelInfo
from ..vectors import M2IV
from .forwards import make_layer_forward, make_o_proj_forward
from .rebind import Rebind
from .state import LayerState
from .styles import Inject, match

__all__ = ["confirm_modes", "TOLERANCE"]

#: largest accepted ||got - want|| / ||want - x|| per activation dtype
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2,
             torch.bfloat16: 5e-2}
_HALF = (torch.float16, torch.bfloat16)
_PROBE_SHAPE = (2, 6)
# layer -> {(style, naming, mode): children signature} of passed checks
_VERIFIED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _signature(layer: torch.nn.Module) -> tuple:
    return (type(layer), *((n, id(c)) for n, c in layer.named_children()))


def _key(spec: LayerSpec, mode: str) -> tuple:
    return spec.parts.style.name, spec.parts.naming, mode


def _runnable(layer: torch.nn.Module) -> bool:
    """Materialised weights, or an accelerate hook that brings them (offloading)."""
    if hasattr(layer, "_hf_hook"):
        return True
    return all(t.device.type != "meta" for t in (*layer.parameters(), *layer.buffers()))


class _Done(Exception):
    """Stops the probe forward once every needed layer's inputs are captured."""


@contextlib.contextmanager
def _eval(module: torch.nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in flags.items():
            m.training = training


@contextlib.contextmanager
def _muted(handles: Iterable) -> Iterator[None]:
    """Live patches of the model run their original forwards (strength 0) meanwhile."""
    saved = [(h, h._strength) for h in handles]
    for h, _ in saved:
        h._strength = 0.0
    try:
        yield
    finally:
        for h, s in saved:
            h._strength = s


def _capture(info: ModelInfo, wanted: set[int]) -> dict[int, tuple[tuple, dict]]:
    """The ``(args, kwargs)`` each wanted layer receives in a probe forward of the text model."""
    emb = info.model.get_input_embeddings()
    vocab = getattr(emb, "num_embeddings", None) or emb.weight.shape[0]
    n = _PROBE_SHAPE[0] * _PROBE_SHAPE[1]
    ids = ((torch.arange(n) * 7919 + 11) % max(vocab - 1, 1) + 1).reshape(_PROBE_SHAPE)
    ids = ids.to(emb.weight.device)
    captured: dict[int, tuple[tuple, dict]] = {}

    def hook(i: int):
        def pre(module, args, kwargs):
            if not _runnable(module):
                raise _Done  # the forward cannot go on; later layers are unreachable
            if i in wanted:
                captured[i] = (args, dict(kwargs))
                if len(captured) == len(wanted):
                    raise _Done
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(info.layers)]
    try:
        with torch.no_grad():
            info.owner(input_ids=ids, use_cache=False)
    except _Done:
        pass
    except Exception as err:  # noqa: BLE001 - reported with what it was for
        raise UnsupportedModelError(
            f"{type(info.model).__name__}: the probe forward of {type(info.owner).__name__} "
            f"(input_ids of shape {_PROBE_SHAPE}, use_cache=False) that verifies the layer "
            f"styles failed: {type(err).__name__}: {err}") from err
    finally:
        for h in handles:
            h.remove()
    return captured


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt()) or 1.0


@contextlib.contextmanager
def _visible_dropouts(spec: LayerSpec) -> Iterator[None]:
    """Each residual dropout with ``p > 0`` multiplies by its own constant meanwhile."""
    rebinds = [Rebind(drop, lambda original, f=0.5 + 0.25 * k: (lambda module, x: x * f))
               for k, drop in enumerate(spec.parts.dropouts.values()) if drop.p > 0]
    with _installed(rebinds):
        yield


@contextlib.contextmanager
def _installed(rebinds: list[Rebind]) -> Iterator[None]:
    """The rebinds installed meanwhile; whatever was installed is undone, even on failure."""
    try:
        for rb in rebinds:
            rb.install()
        yield
    finally:
        for rb in reversed(rebinds):
            rb.uninstall()


class _Probe:
    """The :class:`~m2iv.patch.forwards.Steering` of one layer under verification: every
    token steered, the reference ops (``torch`` backend)."""

    strength = 1.0

    def __init__(self, state: LayerState):
        self.state = state

    def inject(self, index: int, x: torch.Tensor) -> Inject:
        return Inject(self.state, NO_ROWS)


def _float32_copy(spec: LayerSpec) -> LayerSpec | None:
    """``spec`` on a float32 copy of its layer (None where a copy cannot stand in for it:
    offloaded, quantised or non-float weights, or instance-level forwards)."""
    layer = spec.module
    if any(hasattr(m, "_hf_hook") or "forward" in m.__dict__ for m in layer.modules()) \
            or not all(p.is_floating_point() and p.device.type != "meta"
                       for p in layer.parameters()):
        return None
    try:
        work = copy.deepcopy(layer).float()
    except Exception:  # noqa: BLE001 - no copy: the check in the layer's own dtype stands
        return None
    parts, _ = match(work)
    if parts is None:
        return None
    return dataclasses.replace(spec, module=work, parts=parts, attn=parts.attn_module,
                               o_proj=parts.attn_module.o_proj,
                               mlp=getattr(work, parts.mlp_name))


def _to_float32(obj):
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    return obj


def _ratios(info: ModelInfo, spec: LayerSpec, args: tuple, kwargs: dict,
            modes: list[str]) -> dict[str, float]:
    """Per mode, the body's error over its tolerance (passes at <= 1): in the layer's dtype
    and, for half precision, also on a float32 copy of the layer, where rounding cannot blur
    a wrong update (a copy of one layer lives for the duration of the check)."""
    dtype = _dtype(spec)
    tol = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    ratios = {m: e / tol for m, e in _check(info, spec, args, kwargs, modes).items()}
    wide = _float32_copy(spec) if dtype in _HALF else None
    if wide is not None:
        errors = _check(info, wide, _to_float32(args), _to_float32(kwargs), modes)
        ratios = {m: max(r, errors[m] / TOLERANCE[torch.float32]) for m, r in ratios.items()}
    return ratios


def _check(info: ModelInfo, spec: LayerSpec, args: tuple, kwargs: dict,
           modes: list[str]) -> dict[str, float]:
    """The relative error of the style body in each of ``modes`` on one layer."""
    layer, o_proj = spec.module, spec.o_proj
    x = args[0] if args else kwargs["hidden_states"]
    rest, kwargs = args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}
    seen = {}

    def record(module, a) -> None:
        seen.setdefault("rms", _rms(a[0]))

    with torch.no_grad(), _visible_dropouts(spec):
        hook = o_proj.register_forward_pre_hook(record)
        try:
            update = _first(layer(x, *rest, **kwargs)) - x
        finally:
            hook.remove()
        x = x * (_rms(update) / _rms(x))  # the residual as large as the update (see above)
        g = torch.Generator().manual_seed(spec.index)
        H, Dh, D = spec.num_heads, spec.head_dim, spec.hidden_size
        vectors = M2IV(torch.randn(1, H, Dh, generator=g) * seen.get("rms", 1.0),
                       torch.rand(1, H, generator=g) + 0.5,
                       torch.randn(1, D, generator=g) * _rms(update),
                       torch.rand(1, generator=g) + 0.5, (spec.index,), check_finite=False)
        head = (vectors.mha_gates[0, :, None] * vectors.mha[0]).flatten()
        mlp = vectors.mlp_gates[0] * vectors.mlp[0]
        hooks = [o_proj.register_forward_pre_hook(
                     lambda m, a: (a[0] + head.to(a[0]), *a[1:])),
                 layer.register_forward_hook(lambda m, a, out: _first(out) + mlp.to(_first(out)))]
        try:
            want = _first(layer(x, *rest, **kwargs))
        finally:
            for h in hooks:
                h.remove()
        errors = {}
        for mode in modes:
            probe = _Probe(LayerState(spec, 0, mode, vectors, 1.0, "torch"))
            rebinds = [Rebind(layer, make_layer_forward(probe, spec, info.attn_drop_kwargs))]
            if mode == "head":
                rebinds.append(Rebind(o_proj, make_o_proj_forward(probe, spec.index)))
            with _installed(rebinds):
                got = _first(layer(x, *rest, **kwargs))
            diff = (got.double() - want.double()).norm()
            errors[mode] = float(diff / (want.double() - x.double()).norm().clamp_min(1e-30))
    return errors


def confirm_modes(info: ModelInfo, wanted: dict[int, str], allow_head: bool,
                  mute: Iterable = ()) -> dict[int, str]:
    """The mode each layer of ``wanted`` (layer index -> preferred mode) is steered in, after
    verifying its style body against its own forward (module docstring); ``allow_head``: a
    failed fold may fall back to head space.

    Raises:
        UnsupportedModelError: a layer whose body does not reproduce its forward, or that
            cannot be verified.
    """
    specs = {i: info.layer(i) for i in wanted}
    candidates = {i: [m, "head"] if m == "fold" and allow_head else [m]
                  for i, m in wanted.items()}

    def passed(spec: LayerSpec, mode: str) -> bool:
        return _VERIFIED.get(spec.module, {}).get(_key(spec, mode)) == _signature(spec.module)

    def group(spec: LayerSpec) -> tuple:
        return type(spec.module), spec.parts.style.name, spec.parts.naming

    todo = {i for i in wanted if not any(passed(specs[i], m) for m in candidates[i])}
    results: dict[int, dict[str, float]] = {}
    if todo:
        with _muted(mute), _eval(info.owner):
            inputs = _capture(info, {i for i in todo if _runnable(specs[i].module)})
            checks = {i: list(candidates[i]) for i in inputs}
            for i in todo - set(inputs):  # unreachable: a reachable sibling checks its modes
                j = next((j for j in inputs if group(specs[j]) == group(specs[i])), None)
                if j is not None:
                    checks[j] += [m for m in candidates[i] if m not in checks[j]]
            for i in sorted(inputs):
                results[i] = _ratios(info, specs[i], *inputs[i], checks[i])
    for i, ratios in results.items():
        for m, ratio in ratios.items():
            if ratio <= 1.0:
                _VERIFIED.setdefault(specs[i].module, {})[_key(specs[i], m)] = \
                    _signature(specs[i].module)
    modes = {}
    for i in wanted:
        spec = specs[i]
        ok = [m for m in candidates[i] if passed(spec, m) or (i not in results and any(
            passed(s, m) for s in specs.values() if group(s) == group(spec)))]
        if not ok:
            raise _refusal(info, spec, results.get(i))
        modes[i] = ok[0]
    return modes


def _dtype(spec: LayerSpec) -> torch.dtype:
    w = getattr(spec.o_proj, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else torch.float32


def _refusal(info: ModelInfo, spec: LayerSpec,
             ratios: dict[str, float] | None) -> UnsupportedModelError:
    cls = type(spec.module).__name__
    style = spec.parts.style
    if ratios is None:
        return UnsupportedModelError(
            f"layer {spec.index} ({cls}) of {info.model_type} could not be verified: its "
            f"weights are not materialised (meta device) and no materialised {cls} of the "
            "model was verified; load the weights (or offload them with accelerate) first")
    found = ", ".join(f"{r:.3g}x the tolerance in {m} mode" for m, r in ratios.items())
    return UnsupportedModelError(
        f"layer {spec.index} ({cls}) of {info.model_type} has the modules of the "
        f"{style.name!r} style ({style.formula}) but its forward computes something else: "
        f"steered with the same vectors, the style body and the layer's own forward differ "
        f"by {found}. m2iv does not guess: this layer needs its own style in "
        "m2iv/patch/styles.py")
