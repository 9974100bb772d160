"""The many-shot teacher: per query, the mean of the k-shot answer distributions over ``m``
demonstration sets drawn from the pool (``TrainConfig.teacher_sets``).

One k-shot prompt is a noisy teacher: which ``k`` demonstrations it happens to show changes its
answer. Averaging the answer *distributions* (probabilities, not logits) over ``m`` sets gives
the target a vector should carry: what the model does given the whole pool, ``m * k``
demonstrations that no single context holds. At temperature ``tau`` the target is
``log mean_j softmax(z_j / tau)``.

Cost: the ``m`` forwards of a query are paid once. Missing (query, set) prompts are batched
(``batch_size`` rows per forward), each set's answer logits go to the disk cache
(:class:`~m2iv.train.teacher_cache.TeacherCache`, if it has a directory), and the averaged
target is memoised in memory (up to ``memory_bytes``), so later epochs and the periodic
evaluation cost no teacher forward at all.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from ..data import Item
from ..prompts import PromptBuilder
from .forward import AnswerForward
from .sampling import Sampler
from .teacher_cache import TeacherCache, prompt_key

__all__ = ["Teacher", "mean_answer_log_probs", "unsteered"]


def mean_answer_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log mean_j softmax(logits[j] / temperature)``: ``[m, ..., V]`` -> ``[..., V]`` (fp32)."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return torch.logsumexp(logp, 0) - math.log(logits.shape[0])


class Teacher:
    """Teacher targets for queries (see the module docstring).

    Args:
        forward: the model's :class:`~m2iv.train.forward.AnswerForward`.
        unsteered: a context manager factory under which the model runs unsteered.
        builder, sampler: the prompts and the demonstration sets.
        sets, temperature: ``m`` and ``tau``.
        batch_size: prompts per teacher forward.
        cache: per-set answer logits (and hidden states); keys from the fingerprints.
        layers: the steered layers (for hidden-state targets).
    """

    def __init__(self, forward: AnswerForward, unsteered: Callable, builder: PromptBuilder,
                 sampler: Sampler, *, sets: int, temperature: float, batch_size: int,
                 cache: TeacherCache, model_fp: str, builder_fp: str,
                 layers: Sequence[int], memory_bytes: int = 2 << 30):
        self.forward, self.unsteered = forward, unsteered
        self.builder, self.sampler = builder, sampler
        self.sets, self.temperature, self.batch_size = sets, temperature, batch_size
        self.cache, self.model_fp, self.builder_fp = cache, model_fp, builder_fp
        self.layers = tuple(layers)
        self.memory_bytes = memory_bytes
        self._memo: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._memo_bytes = 0
        self.forwards = 0  # teacher prompts run (cache misses), for the log

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def targets(self, queries: Sequence[Item], need_hidden: bool = False
                ) -> dict[str, torch.Tensor]:
        """Padded targets on the model's device: ``logp [B, A, V]`` (log of the averaged
        answer distribution at temperature ``tau``), ``answer_ids [B, A]`` (-100 where
        padded), ``mask [B, A]`` and, with ``need_hidden``, ``hidden [B, L, A, D]`` (the mean
        over sets of the steered layers' outputs at the answer positions)."""
        keys = [(self._query_key(q), need_hidden) for q in queries]
        entries: list[dict | None] = [self._memo_get(k) for k in keys]
        todo = [i for i, e in enumerate(entries) if e is None]
        if todo:
            per_set = self._set_entries([queries[i] for i in todo], need_hidden)
            for i, sets in zip(todo, per_set):
                entries[i] = self._average(sets, need_hidden, queries[i])
                self._memo_put(keys[i], entries[i])
        return self._stack(entries, need_hidden)

    def set_logits(self, query: Item) -> torch.Tensor:
        """``[m, A, V]``: the answer logits of each of ``query``'s demonstration sets."""
        return torch.stack([e["logits"].float() for e in self._set_entries([query], False)[0]])

    # ------------------------------------------------------------------ per-set entries
    def _query_key(self, q: Item) -> str:
        return q.fingerprint().hex()

    def _set_entries(self, queries: Sequence[Item], need_hidden: bool) -> list[list[dict]]:
        """For each query, its ``m`` per-set entries (from the cache, else batched forwards)."""
        layers = self.layers if need_hidden else None
        rows = []  # (query index, set index, demos, key)
        out: list[list[dict | None]] = []
        for qi, q in enumerate(queries):
            sets = self.sampler.teacher_demos(q, self.sets)
            out.append([None] * self.sets)
            for j, d in enumerate(sets):
                key = prompt_key(self.model_fp, self.builder_fp, d, q)
                e = self.cache.get(key, layers)
                if e is None:
                    rows.append((qi, j, d, key))
                else:
                    out[qi][j] = e
        if rows:
            with self.unsteered():
                for s in range(0, len(rows), self.batch_size):
                    chunk = rows[s:s + self.batch_size]
                    enc = self.builder.encode([queries[qi] for qi, _, _, _ in chunk],
                                              [d for _, _, d, _ in chunk], with_answer=True)
                    logits, hidden = self.forward(enc, capture=need_hidden)
                    for r, (qi, j, _, key) in enumerate(chunk):
                        n = int(enc.answer_mask[r].sum())
                        e = {"logits": logits[r, :n], "answer_ids": enc.answer_ids[r, :n]}
                        if need_hidden:
                            e["hidden"] = hidden[r, :, :n]
                            e["hidden_layers"] = torch.tensor(self.layers, dtype=torch.long)
                        out[qi][j] = self.cache.put(key, e)
                    self.forwards += len(chunk)
        return out

    def _average(self, sets: list[dict], need_hidden: bool, q: Item) -> dict[str, torch.Tensor]:
        ids = sets[0]["answer_ids"]
        if any(not torch.equal(e["answer_ids"], ids) for e in sets[1:]):
            raise RuntimeError(f"{q.where()}: the answer tokens differ between demonstration "
                               "sets: the prompt format tokenizes the answer differently "
                               "after different demonstrations")
        out = {"logp": mean_answer_log_probs(torch.stack([e["logits"] for e in sets]),
                                             self.temperature), "answer_ids": ids}
        if need_hidden:
            hs = []
            for e in sets:
                have = e["hidden_layers"].tolist()
                hs.append(e["hidden"][[have.index(i) for i in self.layers]].float())
            out["hidden"] = torch.stack(hs).mean(0)
        return out

    # ------------------------------------------------------------------ memo
    def _memo_get(self, key):
        for k in ((key,) if key[1] else (key, (key[0], True))):  # hidden entries serve too
            e = self._memo.get(k)
            if e is not None:
                self._memo.move_to_end(k)
                return e
        return None

    def _memo_put(self, key, entry) -> None:
        size = sum(v.numel() * v.element_size() for v in entry.values())
        self._memo[key] = entry
        self._memo_bytes += size
        while self._memo_bytes > self.memory_bytes and len(self._memo) > 1:
            _, old = self._memo.popitem(last=False)
            self._memo_bytes -= sum(v.numel() * v.element_size() for v in old.values())

    # ------------------------------------------------------------------ batching
    def _stack(self, entries: list[dict], need_hidden: bool) -> dict[str, torch.Tensor]:
        B = len(entries)
        A = max(e["answer_ids"].numel() for e in entries)
        V = entries[0]["logp"].shape[-1]
        logp = torch.zeros(B, A, V)
        ids = torch.full((B, A), -100, dtype=torch.long)
        hidden = None
        if need_hidden:
            _, _, D = entries[0]["hidden"].shape
            hidden = torch.zeros(B, len(self.layers), A, D)
        for b, e in enumerate(entries):
            n = e["answer_ids"].numel()
            logp[b, :n] = e["logp"]
            ids[b, :n] = e["answer_ids"]
            if need_hidden:
                hidden[b, :, :n] = e["hidden"]
        dev = self.forward.device
        out = {"logp": logp.to(dev), "answer_ids": ids.to(dev), "mask": (ids != -100).to(dev)}
        if hidden is not None:
            out["hidden"] = hidden.to(dev)
        return out


@contextlib.contextmanager
def unsteered(handle):
    """Run ``handle``'s patched model unsteered (strength 0) inside the block."""
    old = handle.strength
    handle.set_strength(0.0)
    try:
        yield
    finally:
        handle.set_strength(old)
