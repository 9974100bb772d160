"""Teacher outputs cached on disk, so a rerun or a sweep never recomputes the k-shot teacher.

One entry per (model, prompt format, demonstrations, query): the teacher's logits at the
answer positions ``[A, V]``, the answer token ids ``[A]`` and, when the synergy alignment needs
them, the steered decoder layers' outputs at those positions ``[L, A, D]`` with their layer
indices ``hidden_layers [L]`` (an entry lacking a requested layer counts as a miss).

Key: SHA-256 over the model fingerprint (:func:`model_fingerprint`: config, parameter names,
shapes, dtypes and a strided sample of every parameter's values), the prompt builder's
fingerprint (processor class and config, chat template, vocabulary, prompt format) and the
content digests of the demonstration and query items in order (image bytes, question, answer).
Those determine the prompt token ids and pixel values exactly, so the key is a hash of
model + prompt, computable without running the processor. Demonstration sets are drawn from
generators seeded by (seed, query, set index), so a rerun asks for exactly the same keys.

Files: ``<dir>/<key[:2]>/<key>.safetensors``, written atomically but not fsynced (an entry lost
to a power cut is simply recomputed). A corrupt or unreadable file is treated as a miss and
rewritten. Logits are stored in ``dtype`` (float32 by default; bfloat16 halves the size at
~1e-3 relative error).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch

from .._atomic import atomic_write
from ..data import Item

__all__ = ["TeacherCache", "model_fingerprint", "prompt_key"]

_FP_ATTR = "_m2iv_fingerprint"


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of ``model``'s config and weights (cached on the model object; a sample of
    every parameter, so it is cheap even for 7B models)."""
    cached = getattr(model, _FP_ATTR, None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        try:
            h.update(cfg.to_json_string(use_diff=False).encode())
        except Exception:  # noqa: BLE001
            h.update(repr(cfg).encode())
    tb = getattr(model, "testbed_config", None)
    if tb is not None:
        h.update(repr(tb).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.numel() == 0 or p.device.type == "meta":
                continue
            flat = p.reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].float().cpu()
            h.update(sample.numpy().tobytes())
    fp = h.hexdigest()[:32]
    try:
        object.__setattr__(model, _FP_ATTR, fp)
    except Exception:  # noqa: BLE001
        pass
    return fp


def prompt_key(model_fp: str, builder_fp: str, demos: Sequence[Item], query: Item) -> str:
    h = hashlib.sha256()
    h.update(model_fp.encode())
    h.update(b"|")
    h.update(builder_fp.encode())
    h.update(f"|{len(demos)}|".encode())
    for it in demos:
        h.update(it.fingerprint())
    h.update(b"|q|")
    h.update(query.fingerprint())
    return h.hexdigest()


class TeacherCache:
    """A key -> teacher-output store on disk (``directory``; ``None``: stores nothing, every
    ``get`` is a miss). Averaged targets are memoised in memory by
    :class:`~m2iv.train.teacher.Teacher`, so this is read at most once per entry and run."""

    def __init__(self, directory: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32):
        self.directory = os.fspath(directory) if directory is not None else None
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
        self.dtype = dtype
        self.hits = 0
        self.misses = 0
        self.writes = 0

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key + ".safetensors")

    def get(self, key: str, hidden_layers=None) -> dict[str, torch.Tensor] | None:
        """The entry, or None (a miss) if absent, unreadable, or lacking the decoder-layer
        outputs of ``hidden_layers`` (a sequence of layer indices) when those are asked for."""
        entry = None
        if self.directory:
            path = self._path(key)
            if os.path.exists(path):
                try:
                    from safetensors.torch import load_file
                    entry = load_file(path)
                except Exception:  # noqa: BLE001 - corrupt: recompute and overwrite
                    entry = None
        if entry is not None and hidden_layers is not None and (
                "hidden" not in entry
                or not set(hidden_layers) <= set(entry["hidden_layers"].tolist())):
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store ``entry`` (converted to CPU and the cache dtype); returns the stored form."""
        entry = {k: (v.detach().to("cpu", self.dtype) if v.is_floating_point()
                     else v.detach().cpu()).contiguous() for k, v in entry.items()}
        if self.directory:
            from safetensors.torch import save

            path = self._path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = save(entry, metadata={"m2iv_teacher": json.dumps({"key": key})})
            atomic_write(path, data, durable=False)
            self.writes += 1
        return entry

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes}
