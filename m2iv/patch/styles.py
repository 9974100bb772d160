"""The table of layer styles: every decoder-layer shape m2iv steers, each one small body.

A style is the data flow of a decoder layer's forward: where its norms sit, where the residual
adds are, whether the attention and MLP branches run one after the other or side by side. A
body rewrites that forward around the fused ops (``steer_add``, ``steer_add_rmsnorm``; the
per-head MHA vectors go through ``head_steer`` on the o_proj input, or are folded through
o_proj where that is exact). Everything a body shares with the others (argument binding, the
strength-0 bypass, gradient checkpointing, looking up the steering state) is in the one wrapper
of :mod:`m2iv.patch.forwards`.

A layer is matched to a style by its children (:func:`match`): an attention with an ``o_proj``,
an MLP, and exactly the norms (and residual dropouts) one of the style's namings lists, nothing
unexplained. The match is then verified against the layer's own forward
(:mod:`m2iv.patch.verify`), so a layer whose modules look right but whose forward differs is
refused, never guessed at.

Adding a style = one :class:`Style` entry in :data:`STYLES` + its body.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

import m2iv_kernels as mk

__all__ = ["Style", "STYLES", "Parts", "Inject", "match", "describe_styles", "MLP_NAMES"]

#: child names an MLP branch goes by (dense, MoE)
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")


@dataclass(frozen=True)
class Style:
    """One decoder-layer shape.

    ``namings``: the ways transformers names the style's norm (and residual-dropout) roles,
    role -> child attribute (``None``: the role is absent, e.g. OLMo2 has no pre-norms).
    ``fold``: whether the attention output lands in the residual stream unchanged, so that
    the MHA term may be folded through o_proj (exact by linearity).
    """

    name: str
    formula: str
    namings: tuple[Mapping[str, str | None], ...]
    body: Callable[[Parts, torch.Tensor, dict, Inject], torch.Tensor]
    fold: bool


@dataclass
class Parts:
    """One layer's modules in the roles of its style (what a body calls)."""

    layer: torch.nn.Module
    style: Style
    naming: int  # index into style.namings
    attn_name: str
    mlp_name: str
    norms: dict[str, torch.nn.Module | None] = field(default_factory=dict)
    dropouts: dict[str, torch.nn.Dropout] = field(default_factory=dict)
    residual_scale: float = 1.0  # Granite's residual_multiplier: branch outputs are scaled

    @property
    def attn_module(self) -> torch.nn.Module:
        return getattr(self.layer, self.attn_name)

    def attn(self, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.attn_module(hidden_states=h, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        out = getattr(self.layer, self.mlp_name)(h)
        return out[0] if isinstance(out, tuple) else out

    def norm(self, role: str, h: torch.Tensor) -> torch.Tensor:
        module = self.norms.get(role)
        return h if module is None else module(h)

    def branch(self, role: str, h: torch.Tensor) -> torch.Tensor:
        """A branch output as it enters the residual add: residual dropout, residual scale."""
        drop = self.dropouts.get(role)
        if drop is not None:
            h = drop(h)
        return h if self.residual_scale == 1.0 else h * self.residual_scale


class Inject:
    """The steering of one layer for one forward: the MHA term rides on the residual add of
    the attention branch (``attn``: folded through o_proj, or zeros in head mode where
    :meth:`head` adds it on the o_proj input), the MLP vector on that of the MLP branch.

    Inference (``t`` None) calls the layer's prepared entry on its banks
    (:mod:`m2iv_kernels.prepared`: no validation or dispatch per call) with this forward's
    token ``rows``. With autograd on, ``t`` holds tensors computed in this forward and the
    public ops record the backward (``mask``, ``index`` as they take them).
    """

    __slots__ = ("state", "rows", "t", "mask", "index")

    def __init__(self, state, rows, t: dict | None = None, mask=None, index=None):
        self.state, self.rows, self.t, self.mask, self.index = state, rows, t, mask, index

    def _vector(self, branch: str):
        return (self.t["c"], self.t["c_gate"]) if branch == "attn" else \
            (self.t["b"], self.t["beta"])

    def add(self, residual: torch.Tensor, x: torch.Tensor, branch: str) -> torch.Tensor:
        """``residual + x + m * gate * vector`` in one pass."""
        st = self.state
        if self.t is None:
            return st.entry.add(residual, x, st.banks[branch], self.rows)
        v, g = self._vector(branch)
        return mk.steer_add(residual, x, v, g, mask=self.mask, index=self.index,
                            backend=st.backend)

    def add_then_norm(self, residual: torch.Tensor, x: torch.Tensor, branch: str,
                      role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(h), h)`` with ``h = residual + x + m * gate * vector`` and ``norm`` the
        layer's norm in ``role`` (none: identity): one fused pass where that norm is an RMSNorm
        the op computes (:func:`rms_norm_fact`, decided when the layer was patched), else the
        add and the layer's own norm module."""
        st = self.state
        norm = st.spec.parts.norms.get(role)
        fact = st.facts.get(role)
        if fact is None:
            h = self.add(residual, x, branch)
            return (h if norm is None else norm(h)), h
        if self.t is None:
            return st.entry.add_rmsnorm(residual, x, st.banks[branch], norm.weight, fact[1],
                                        fact[0], self.rows)
        v, g = self._vector(branch)
        return mk.steer_add_rmsnorm(residual, x, v, g, norm.weight, fact[1],
                                    weight_offset=fact[0], mask=self.mask, index=self.index,
                                    backend=st.backend)

    def input_norm(self, p: Parts, x: torch.Tensor) -> torch.Tensor:
        """The layer's input norm of ``x``, taken from the previous layer where that one
        computed it in its fused output add (:meth:`finish`) on this very tensor, unmodified
        since (same object, same version); else the layer's own norm module."""
        st = self.state
        pre = st.pre
        if pre is not None:
            st.pre = None
            if pre[0] is x and pre[2] == x._version:
                return pre[1]
        return p.norm("input", x)

    def finish(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output ``residual + x + m * beta * b``. Where the next decoder layer is
        patched and starts with an RMSNorm the op computes, the same pass also normalises the
        output for it (eager inference; the residual stream's add + RMSNorm fused across the
        layer boundary, as serving engines do), handed over by :meth:`input_norm`. Not under
        inference mode, whose tensors carry no version to prove the output unmodified."""
        st = self.state
        nxt = st.next_input
        if (nxt is None or self.t is not None or torch.compiler.is_compiling()
                or torch.is_inference_mode_enabled()):
            return self.add(residual, x, "mlp")
        norm = nxt.spec.parts.norms["input"]
        offset, eps = nxt.facts["input"]
        normed, out = st.entry.add_rmsnorm(residual, x, st.banks["mlp"], norm.weight, eps,
                                           offset, self.rows)
        nxt.pre = (out, normed, out._version)
        return out

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Head mode: the per-head MHA vectors added to the o_proj input (in place when no
        autograd records it)."""
        st = self.state
        if self.t is None:
            return st.entry.head(x, st.banks["heads"], self.rows, inplace=True)
        return mk.head_steer(x, self.t["a"], self.t["alpha"], mask=self.mask, index=self.index,
                             backend=st.backend)


# ------------------------------------------------------------------------------ the bodies

def _pre_norm(p: Parts, x: torch.Tensor, kwargs: dict, s: Inject) -> torch.Tensor:
    a = p.branch("attn", p.attn(s.input_norm(p, x), kwargs))
    normed, h = s.add_then_norm(x, a, "attn", "post_attn")
    return s.finish(h, p.branch("mlp", p.mlp(normed)))


def _sandwich(p: Parts, x: torch.Tensor, kwargs: dict, s: Inject) -> torch.Tensor:
    a = p.norm("post_attn", p.attn(s.input_norm(p, x), kwargs))  # MHA: head space only
    normed, h = s.add_then_norm(x, a, "attn", "pre_ff")
    return s.finish(h, p.norm("post_ff", p.mlp(normed)))


def _parallel(p: Parts, x: torch.Tensor, kwargs: dict, s: Inject) -> torch.Tensor:
    n = s.input_norm(p, x)
    h = s.add(x, p.branch("attn", p.attn(n, kwargs)), "attn")
    return s.finish(h, p.branch("mlp", p.mlp(n)))


STYLES: tuple[Style, ...] = (
    Style("pre_norm", "h = x + attn(in(x)); out = h + mlp(post_attn(h))",
          namings=(
              {"input": "input_layernorm", "post_attn": "post_attention_layernorm"},
              # Phi-3: dropouts on both branches before their residual adds
              {"input": "input_layernorm", "post_attn": "post_attention_layernorm",
               "attn_dropout": "resid_attn_dropout", "mlp_dropout": "resid_mlp_dropout"},
              # StableLM (use_parallel_residual=False): a dropout on the MLP branch
              {"input": "input_layernorm", "post_attn": "post_attention_layernorm",
               "mlp_dropout": "dropout"}),
          body=_pre_norm, fold=True),
    Style("sandwich", "h = x + post_attn(attn(in(x))); out = h + post_ff(mlp(pre_ff(h)))",
          namings=(
              {"input": "input_layernorm", "post_attn": "post_attention_layernorm",
               "pre_ff": "pre_feedforward_layernorm", "post_ff": "post_feedforward_layernorm"},
              # GLM-4: its post_attention_layernorm is the MLP's pre-norm
              {"input": "input_layernorm", "post_attn": "post_self_attn_layernorm",
               "pre_ff": "post_attention_layernorm", "post_ff": "post_mlp_layernorm"},
              # OLMo2, EXAONE 4: norms after the branches only
              {"input": None, "post_attn": "post_attention_layernorm", "pre_ff": None,
               "post_ff": "post_feedforward_layernorm"}),
          body=_sandwich, fold=False),
    Style("parallel", "out = x + attn(in(x)) + mlp(in(x))",
          namings=(
              {"input": "input_layernorm"},
              # StableLM (use_parallel_residual=True): a dropout on the MLP branch
              {"input": "input_layernorm", "mlp_dropout": "dropout"}),
          body=_parallel, fold=True),
)


def describe_styles() -> str:
    """The styles and their namings, for error messages."""
    lines = []
    for st in STYLES:
        names = " | ".join("{" + ", ".join(f"{r}={n}" for r, n in nm.items() if n) + "}"
                           for nm in st.namings)
        lines.append(f"  {st.name}: {st.formula}; norms {names}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ matching

def _attention(layer: torch.nn.Module) -> list[str]:
    return [n for n, c in layer.named_children()
            if isinstance(getattr(c, "o_proj", None), torch.nn.Module)]


def match(layer: torch.nn.Module) -> tuple[Parts | None, str]:
    """The style of ``layer`` by its children: ``(parts, "")``, or ``(None, why not)``.

    Matching is by module structure only; :mod:`m2iv.patch.verify` checks the result against
    the layer's own forward before anything is patched.
    """
    children = dict(layer.named_children())
    attn = _attention(layer)
    mlps = [n for n in MLP_NAMES if n in children]
    if len(attn) != 1 or len(mlps) != 1:
        return None, (f"expected one attention child with an o_proj (found "
                      f"{attn or 'none'}) and one MLP child named {' or '.join(MLP_NAMES)} "
                      f"(found {mlps or 'none'})")
    found = []
    for style in STYLES:
        for k, naming in enumerate(style.namings):
            names = {r: n for r, n in naming.items() if n is not None}
            if set(children) != {attn[0], mlps[0], *names.values()}:
                continue
            dropouts = {r.removesuffix("_dropout"): children[n] for r, n in names.items()
                        if r.endswith("_dropout")}
            if not all(isinstance(d, torch.nn.Dropout) for d in dropouts.values()):
                continue
            norms = {r: (children[n] if n else None) for r, n in naming.items()
                     if not r.endswith("_dropout")}
            scale = getattr(layer, "residual_multiplier", 1.0)
            found.append(Parts(layer, style, k, attn[0], mlps[0], norms, dropouts,
                               float(scale) if isinstance(scale, (int, float)) else 1.0))
    if len(found) == 1:
        return found[0], ""
    if found:  # two namings of different styles fit the same children: nothing is guessed
        return None, ("its children fit several styles ("
                      f"{', '.join(p.style.name for p in found)}); m2iv does not guess")
    other = sorted(set(children) - {attn[0], mlps[0]})
    return None, (f"its other children {other} are not the norms (and residual dropouts) of "
                  "any style")


# ------------------------------------------------------------------------------ norm facts

_NORM_FACTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple | None]" = \
    weakref.WeakKeyDictionary()


def _eps(norm: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(norm, name, None)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            return float(eps)
    return None


def rms_norm_fact(norm: torch.nn.Module) -> tuple[float, float] | None:
    """``(weight_offset, eps)`` if ``norm`` computes ``x * rsqrt(mean(x^2) + eps) *
    (offset + weight)`` (offset 0: Llama's RMSNorm, 1: Gemma's), so ``steer_add_rmsnorm`` may
    do its work; ``None`` otherwise (LayerNorm, unmaterialised weights, anything else: the
    layer's own module runs). Decided by running the module once on a probe (cached)."""
    if norm in _NORM_FACTS:
        return _NORM_FACTS[norm]
    fact = None
    w, eps = getattr(norm, "weight", None), _eps(norm)
    if (isinstance(w, torch.Tensor) and w.dim() == 1 and w.is_floating_point()
            and w.device.type != "meta" and eps is not None
            and getattr(norm, "bias", None) is None):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(3, w.shape[0], generator=g) + 0.5).to(w.device)
        with torch.no_grad(), torch.inference_mode(False):
            try:
                got = norm(x).float()
            except Exception:  # noqa: BLE001 - not a norm the op can stand in for
                got = None
            if got is not None and got.shape == x.shape:
                base = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                for offset in (0.0, 1.0):
                    want = base * (offset + w.detach().float())
                    if torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                        fact = (offset, eps)
                        break
    _NORM_FACTS[norm] = fact
    return fact
