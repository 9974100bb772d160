"""Steering inside a vLLM model: the bank buffers, the per-token slot map, and the rebound
forwards of each decoder layer's ``o_proj`` and ``mlp``.

Semantics are DESIGN.md section 1, as ``patch_model`` applies them, for every token of a
request (prompt and generated), with the request's strength ``s`` multiplying every gate:

* MHA term in **head space**, on the input of ``o_proj``:
  ``x[t] += s(t) * alpha[slot(t), h] * a[slot(t), h]`` for the heads this rank holds. Under
  tensor parallelism ``o_proj`` is row-parallel, each rank adds its own heads' slice before the
  matmul and the all-reduce sums them: exact, with no communication and no copy of o_proj's
  weight (``patch_model`` folds the same term through o_proj instead; the two agree up to
  rounding, which the equality tests bound). It also works for quantised o_proj weights.
* MLP term on the MLP output: ``mlp_out[t] += s(t) * beta[slot(t)] * b[slot(t)]``. vLLM's layer
  returns ``(mlp_out, residual)`` and the next layer's fused ``RMSNorm(x, residual)`` adds them,
  so this is exactly the residual-stream vector of the method.

Both are one ``m2iv_kernels.head_steer`` call per site (a bank picked per token by ``index`` and
scaled per token by ``mask``), reading persistent buffers that are filled before every step, so
a compiled graph (and a CUDA graph) reads the current batch's steering. Slot 0 is all zeros and
unsteered tokens have ``s = 0``, so they compute ``x + 0``: bit-identical to an unsteered model.
"""
from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import m2iv_kernels as mk

from ..errors import UnsupportedModelError, VectorsMismatchError
from ..families.fit import ModelSpec, incompatibility
from ..vectors import M2IV

__all__ = ["SteeringBank", "ModelLayout", "find_layout", "SUPPORTED_ARCHITECTURES"]

# vLLM model class -> dotted path (from the model) to its decoder-layer list. Every listed
# architecture has the Llama layer layout (self_attn.o_proj row-parallel, mlp returning the
# branch output) and is exercised by tests/vllm.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "model.layers",
    "Qwen2ForCausalLM": "model.layers",
    "Qwen3ForCausalLM": "model.layers",
    "MistralForCausalLM": "model.layers",
}


@dataclass
class ModelLayout:
    """Where the steered modules are and how this rank's heads are sliced."""

    layers: dict[int, torch.nn.Module]  # decoder layers on this pipeline rank
    num_layers: int
    num_heads: int  # total
    head_dim: int
    hidden_size: int
    tp_rank: int
    tp_size: int

    @property
    def local_heads(self) -> slice:
        per = self.num_heads // self.tp_size
        return slice(self.tp_rank * per, (self.tp_rank + 1) * per)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layout(model: torch.nn.Module, tp_rank: int = 0, tp_size: int = 1) -> ModelLayout:
    """Resolve a loaded vLLM model through :data:`SUPPORTED_ARCHITECTURES`.

    Raises:
        UnsupportedModelError: an architecture m2iv.vllm does not steer (the supported ones are
            listed), or modules not where the table says.
    """
    arch = type(model).__name__
    path = SUPPORTED_ARCHITECTURES.get(arch)
    if path is None:
        raise UnsupportedModelError(
            f"m2iv.vllm cannot steer {arch}: supported vLLM architectures are "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (multimodal models are not supported "
            "by the vLLM integration yet; use m2iv.patch_model with transformers for them)")
    layer_list = _get(model, path)
    if layer_list is None:
        raise UnsupportedModelError(f"{arch}: no decoder layers at {path}")
    inner = _get(model, path.rsplit(".", 1)[0])
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(layer_list))
    layers = {i: layer_list[i] for i in range(start, end)}  # this pipeline stage's layers
    first = layers[start]
    attn = getattr(first, "self_attn", None)
    o_proj = getattr(attn, "o_proj", None)
    if o_proj is None or getattr(first, "mlp", None) is None:
        raise UnsupportedModelError(f"{arch}: decoder layer {start} lacks self_attn.o_proj or "
                                    "mlp; its layout is not the Llama one m2iv.vllm steers")
    cfg = model.config if hasattr(model, "config") else None
    hf = getattr(cfg, "hf_config", None) or cfg
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    num_heads = int(text.num_attention_heads)
    head_dim = int(attn.head_dim)
    hidden = int(text.hidden_size)
    local_in = getattr(o_proj, "input_size_per_partition", num_heads * head_dim // tp_size)
    if num_heads % tp_size or local_in != num_heads // tp_size * head_dim:
        raise UnsupportedModelError(f"{arch}: o_proj takes {local_in} inputs on this rank, not "
                                    f"{num_heads}/{tp_size} heads x {head_dim}")
    return ModelLayout(layers, len(layer_list), num_heads, head_dim, hidden, tp_rank, tp_size)


def _check_fits(name: str, v: M2IV, lay: ModelLayout) -> None:
    """The one fit rule (:func:`m2iv.families.fit.incompatibility`) against the served model."""
    if v.is_bank:
        raise VectorsMismatchError(f"m2iv vectors {name!r} is a bank; serve its rows by name")
    served = ModelSpec(hidden_size=lay.hidden_size, num_heads=lay.num_heads,
                       head_dim=lay.head_dim, num_layers=lay.num_layers)
    why = incompatibility(ModelSpec.from_vectors(v), served,
                          names=(f"m2iv vectors {name!r}", "the served model"))
    if why:
        raise VectorsMismatchError(why)


class SteeringBank(torch.nn.Module):
    """Bank buffers (slot 0 = zeros) for the layers of this rank, and the per-token
    ``slot`` / ``strength`` maps the steered forwards read.

    Buffers (all non-persistent, fp32 vectors; ``N`` = 1 + configured names):
        ``mha_<l> [N, H_local, Dh]``, ``mha_gates_<l> [N, H_local]``, ``mlp_<l> [N, 1, D]``,
        ``mlp_gates_<l> [N, 1]`` for each steered layer ``l``; ``slot [T_max]`` (int64) and
        ``strength [T_max]`` (fp32), rewritten before every step.
    """

    def __init__(self, vectors: Sequence[tuple[str, M2IV]], layout: ModelLayout,
                 max_tokens: int, device: torch.device, backend: str = "auto"):
        super().__init__()
        for name, v in vectors:
            _check_fits(name, v, layout)
        covered = sorted({i for _, v in vectors for i in v.layers} & set(layout.layers))
        n, heads = len(vectors) + 1, layout.local_heads
        hl = heads.stop - heads.start
        self.layers = tuple(covered)
        self.backend = backend
        for i in covered:
            a = torch.zeros(n, hl, layout.head_dim)
            alpha = torch.zeros(n, hl)
            b = torch.zeros(n, 1, layout.hidden_size)
            beta = torch.zeros(n, 1)
            for slot, (_, v) in enumerate(vectors, start=1):
                if i in v.layers:
                    k = v.layers.index(i)
                    a[slot] = v.mha[k, heads].detach().float()
                    alpha[slot] = v.mha_gates[k, heads].detach().float()
                    b[slot, 0] = v.mlp[k].detach().float()
                    beta[slot, 0] = v.mlp_gates[k].detach().float()
            for key, t in (("mha", a), ("mha_gates", alpha), ("mlp", b), ("mlp_gates", beta)):
                self.register_buffer(f"{key}_{i}", t.to(device), persistent=False)
        self.register_buffer("slot", torch.zeros(max_tokens, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("strength", torch.zeros(max_tokens, dtype=torch.float32,
                                                     device=device), persistent=False)
        self.any_steered = False  # this step has a steered token (eager fast path only)

    def extra_repr(self) -> str:
        return f"layers={list(self.layers)}, slots={getattr(self, f'mha_{self.layers[0]}').shape[0]}" \
            if self.layers else "layers=[]"

    def _skip(self) -> bool:
        """Eager steps without any steered token run the original modules (exactly what an
        unpatched model computes, at no cost). Never while tracing or capturing: a compiled or
        captured graph must always read the buffers, or steering would be silently dropped."""
        if torch.compiler.is_compiling():
            return False
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False
        return not self.any_steered

    def steer(self, x: torch.Tensor, vectors: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``x [T, C] + strength[t] * gates[slot[t]] * vectors[slot[t]]`` for T tokens."""
        t = x.shape[0]
        return mk.head_steer(x, vectors, gates, mask=self.strength[:t], index=self.slot[:t],
                             backend=self.backend)

    def install(self, layout: ModelLayout) -> Callable[[], None]:
        """Rebind ``o_proj.forward`` and ``mlp.forward`` (per instance) of every covered layer;
        returns a function that restores them."""
        restores: list[Callable[[], None]] = []
        for i in self.layers:
            layer = layout.layers[i]
            o_proj, mlp = layer.self_attn.o_proj, layer.mlp
            restores.append(_rebind(o_proj, _o_proj_forward(self, i)))
            restores.append(_rebind(mlp, _mlp_forward(self, i)))

        def restore() -> None:
            for r in reversed(restores):
                r()
        return restore


def _rebind(module: torch.nn.Module, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = types.MethodType(make(module.forward), module)

    def restore() -> None:
        if had:
            module.forward = saved
        else:
            del module.forward
    return restore


def _o_proj_forward(bank: SteeringBank, i: int):
    def make(original):
        def forward(module, x, *args, **kwargs):
            if not bank._skip():
                x = bank.steer(x, getattr(bank, f"mha_{i}"), getattr(bank, f"mha_gates_{i}"))
            return original(x, *args, **kwargs)
        return forward
    return make


def _mlp_forward(bank: SteeringBank, i: int):
    def make(original):
        def forward(module, x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            if bank._skip():
                return out
            return bank.steer(out, getattr(bank, f"mlp_{i}"), getattr(bank, f"mlp_gates_{i}"))
        return forward
    return make
