"""DESIGN.md section 1 steering with plain forward hooks, the way hook-based steering
libraries apply it: a pre-hook on every o_proj adds the per-head vectors in head space, a hook
on every MLP adds the MLP vector to its output. Independent of ``m2iv`` on purpose: it is the
baseline the fused patcher is compared with and checked against."""
from __future__ import annotations

import re

import torch

_O_PROJ = re.compile(r"^(?P<layer>.*\.layers\.(?P<idx>\d+))\.self_attn\.o_proj$")


def decoder_layers(model: torch.nn.Module) -> dict[int, str]:
    """Decoder-layer index -> module name, for the language model's layers (those whose
    attention has an ``o_proj``; vision towers are skipped)."""
    found = {}
    for name, _ in model.named_modules():
        m = _O_PROJ.match(name)
        if m and not re.search(r"vision|visual", name):
            found[int(m["idx"])] = m["layer"]
    return found


def add_steering_hooks(model: torch.nn.Module, vectors, index: torch.Tensor | None = None
                       ) -> list[torch.utils.hooks.RemovableHandle]:
    """Steer ``model`` with ``vectors`` (an ``m2iv.M2IV``; a bank needs ``index [B]``).
    Returns the hook handles; ``h.remove()`` each to undo."""
    names = decoder_layers(model)
    modules = dict(model.named_modules())
    handles = []
    for i, layer in enumerate(vectors.layers):
        prefix = names[layer]
        o_proj, mlp = modules[f"{prefix}.self_attn.o_proj"], modules[f"{prefix}.mlp"]
        dev = o_proj.weight.device
        if vectors.is_bank:
            head = (vectors.mha_gates[:, i, :, None] * vectors.mha[:, i]).flatten(1)[index]
            mlp_vec = (vectors.mlp_gates[:, i, None] * vectors.mlp[:, i])[index]
            head, mlp_vec = head[:, None].to(dev), mlp_vec[:, None].to(dev)  # [B, 1, C]
        else:
            head = (vectors.mha_gates[i, :, None] * vectors.mha[i]).flatten().to(dev)
            mlp_vec = (vectors.mlp_gates[i] * vectors.mlp[i]).to(dev)

        def pre(module, args, head=head):
            return (args[0] + head.to(args[0].dtype),) + tuple(args[1:])

        def post(module, args, out, mlp_vec=mlp_vec):
            return out + mlp_vec.to(out.dtype)

        handles.append(o_proj.register_forward_pre_hook(pre))
        handles.append(mlp.register_forward_hook(post))
    return handles
