"""THE independent reference for steering: DESIGN.md section 1 applied literally with plain
PyTorch forward hooks, the way hook-based steering libraries do it.

* MHA vectors: a forward pre-hook on every steered layer's attention ``o_proj`` adds
  ``m(t) * s * alpha[l, h] * a[l, h]`` to its input (head space).
* MLP vectors: a forward hook on the decoder layer adds ``m(t) * s * beta[l] * b[l]`` to the
  layer's output, i.e. to the residual stream right where the MLP branch lands (the same for
  pre-norm, sandwich-norm and parallel layers).

It never calls ``m2iv_kernels`` and never uses m2iv's own model discovery: it finds the
language model's layers by module names (``<...>.layers.<i>.<attention>.o_proj`` outside any
vision tower), so it stays an independent check of the fused patcher (tests) and the baseline
it is timed against (benchmarks).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

__all__ = ["HookReference", "add_steering_hooks", "decoder_layers"]

_O_PROJ = re.compile(r"^(?P<layer>.*\.layers\.(?P<idx>\d+))\.(?P<attn>\w+)\.o_proj$")
_VISION = re.compile(r"vision|visual|image_encoder")


def decoder_layers(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """Decoder-layer index -> ``(layer, o_proj)`` for the language model's layers: those
    with an attention ``o_proj``, outside any vision tower."""
    modules = dict(model.named_modules())
    found = {}
    for name, module in modules.items():
        m = _O_PROJ.match(name)
        if m and not _VISION.search(name):
            found[int(m["idx"])] = (modules[m["layer"]], module)
    return found


def _as_rows(t: torch.Tensor | Sequence[int] | None) -> torch.Tensor | None:
    return None if t is None else torch.as_tensor(t, dtype=torch.long)


class HookReference:
    """Steer ``model`` with ``vectors`` (an ``m2iv.M2IV``) through forward hooks.

    Args:
        strength: multiplies every gate.
        mask: ``[B, T]`` bool, the steered tokens of the next forward(s) (None: all).
        index: ``[B]`` bank row per sequence (required for a bank).

    Use as a context manager, or :meth:`install` / :meth:`remove`.
    """

    def __init__(self, model: torch.nn.Module, vectors, *, strength: float = 1.0,
                 mask: torch.Tensor | None = None, index=None):
        if vectors.is_bank and index is None:
            raise ValueError("a bank of vectors needs index= (one bank row per sequence)")
        self.model, self.vectors, self.strength = model, vectors, float(strength)
        self.mask, self.index = mask, _as_rows(index)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def _scale(self, x: torch.Tensor) -> torch.Tensor | float:
        if self.mask is None:
            return 1.0
        return self.mask.to(device=x.device, dtype=x.dtype)[..., None]

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` bank rows -> ``[B, 1, C]`` per sequence; a single ``[C]`` as is."""
        return t[self.index.to(t.device)][:, None] if self.vectors.is_bank else t

    def install(self) -> HookReference:
        v, s = self.vectors, self.strength
        layers = decoder_layers(self.model)
        for slot, i in enumerate(v.layers):
            if i not in layers:
                raise KeyError(f"the model has no language-model layer {i} with an o_proj")
            layer, o_proj = layers[i]
            pick = (lambda t, slot=slot: t[:, slot]) if v.is_bank else \
                (lambda t, slot=slot: t[slot])
            head = (pick(v.mha_gates)[..., None] * pick(v.mha)).flatten(-2) * s
            mlp = pick(v.mlp_gates)[..., None] * pick(v.mlp) * s

            def pre(module, args, head=head):
                x = args[0]
                add = self._rows(head).to(device=x.device, dtype=x.dtype)
                return (x + self._scale(x) * add,) + tuple(args[1:])

            def post(module, args, out, mlp=mlp):
                h = out[0] if isinstance(out, tuple) else out
                h = h + self._scale(h) * self._rows(mlp).to(device=h.device, dtype=h.dtype)
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

            self.handles.append(o_proj.register_forward_pre_hook(pre))
            self.handles.append(layer.register_forward_hook(post))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> HookReference:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def add_steering_hooks(model: torch.nn.Module, vectors, index=None, *, strength: float = 1.0,
                       mask: torch.Tensor | None = None) -> HookReference:
    """Install a :class:`HookReference` and return it (``.remove()`` undoes it)."""
    return HookReference(model, vectors, strength=strength, mask=mask, index=index).install()
