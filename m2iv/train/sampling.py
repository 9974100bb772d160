"""Which queries and demonstrations a run sees: every draw a pure function of the seed.

* the demonstration pool: ``pool_size`` items of the ``pool`` split (a seeded subset);
* the validation queries: ``val_queries`` items (at most a quarter of the split) held out of
  the ``train`` split: the plateau rule's held-out set, which training never sees;
* the training queries: the rest of ``train``, streamed as one fresh seeded permutation per
  epoch; step ``s``, micro-batch ``u`` takes items ``(s * grad_accum + u) * batch_size ...``;
* the evaluation queries: ``eval_queries`` items of the ``eval`` split (final metrics only);
* the teacher's demonstration sets: set ``j`` of query ``q`` is drawn from a generator seeded by
  ``(seed, q, j)``, so a query keeps its sets across epochs (its teacher target is computed
  once) and set ``j`` is the same whatever the number of sets (a cache made with 32 sets serves
  a run with 16).

So a resumed run sees the same data as an uninterrupted one, and data-parallel ranks agree on
the global batch and each take a contiguous shard of it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..data import DataError, Item, TaskData

__all__ = ["Sampler", "seed_of"]


def seed_of(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes and platforms)."""
    h = hashlib.sha256(("|".join(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _subset(items: list[Item], n: int | None, seed: int, salt: str) -> list[Item]:
    if n is None or n >= len(items):
        return list(items)
    g = torch.Generator().manual_seed(seed_of(seed, salt))
    order = torch.randperm(len(items), generator=g)[:n].tolist()
    return [items[i] for i in sorted(order)]


def _key(q: Item) -> str:
    return str(q.id) if q.id is not None else q.fingerprint().hex()


class Sampler:
    """The run's data (see the module docstring)."""

    def __init__(self, data: TaskData, shots: int, pool_size: int | None = None,
                 batch_size: int = 8, grad_accum: int = 1, seed: int = 0,
                 eval_queries: int | None = 64, val_queries: int = 0):
        self.data, self.shots, self.seed = data, shots, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        if pool_size is not None and pool_size > len(data.pool):
            raise DataError(f"pool_size={pool_size} is more than the {len(data.pool)} items of "
                            f"the pool split of task {data.name!r}")
        self.pool: list[Item] = _subset(data.pool, pool_size, seed, "pool")
        if len(self.pool) < shots:
            raise DataError(f"shots={shots} is more than the {len(self.pool)} items of the "
                            f"demonstration pool of task {data.name!r}")
        train = list(data.train)
        # at most a quarter of a small train split is held out
        n_val = min(val_queries, len(train) // 4)
        g = torch.Generator().manual_seed(seed_of(seed, "val"))
        held = set(torch.randperm(len(train), generator=g)[:n_val].tolist())
        self.val: list[Item] = [it for i, it in enumerate(train) if i in held]
        train = [it for i, it in enumerate(train) if i not in held]
        self.train: list[Item] = train
        self.eval: list[Item] = _subset(data.eval, eval_queries or None, seed, "eval")
        self._by_answer: dict[str, list[int]] | None = None

    # ------------------------------------------------------------------ demonstrations
    def demos(self, queries: Sequence[Item], k: int, salt: str = "demos",
              keys: Sequence | None = None, balanced: bool = False) -> list[list[Item]]:
        """``k`` distinct pool items per query (never the query itself). Query ``i`` draws from
        a generator seeded by ``(seed, salt, keys[i])`` (default ``keys[i] = i``).

        ``balanced``: class-balanced over the pool's distinct answers (each answer
        ``k // C`` times plus ``k % C`` further distinct random answers, shuffled), the usual
        "balanced demonstrations" of ICL evaluations; else uniformly at random.
        """
        if k > len(self.pool):
            raise DataError(f"{k} demonstrations requested but the pool has {len(self.pool)}")
        keys = range(len(queries)) if keys is None else keys
        out = []
        for q, key in zip(queries, keys):
            g = torch.Generator().manual_seed(seed_of(self.seed, salt, key))
            out.append(self._balanced(q, k, g) if balanced else self._random(q, k, g))
        return out

    def _random(self, q: Item, k: int, g: torch.Generator) -> list[Item]:
        perm = torch.randperm(len(self.pool), generator=g)[:k + 1].tolist()
        return [self.pool[i] for i in perm if self.pool[i].id != q.id][:k]

    def _balanced(self, q: Item, k: int, g: torch.Generator) -> list[Item]:
        if self._by_answer is None:
            self._by_answer = {}
            for i, it in enumerate(self.pool):
                self._by_answer.setdefault(it.answer.strip(), []).append(i)
        answers = sorted(self._by_answer)
        C = len(answers)
        extra = torch.randperm(C, generator=g)[:k % C].tolist()
        classes = [c for c in range(C) for _ in range(k // C)] + extra
        need: dict[int, int] = {}
        for c in classes:
            need[c] = need.get(c, 0) + 1
        chosen = []
        for c, n in sorted(need.items()):
            cand = [i for i in self._by_answer[answers[c]] if self.pool[i].id != q.id]
            if len(cand) < n:
                raise DataError(f"balanced demonstrations: the pool has {len(cand)} items "
                                f"answered {answers[c]!r}, {n} needed")
            pick = torch.randperm(len(cand), generator=g)[:n].tolist()
            chosen += [cand[i] for i in pick]
        order = torch.randperm(len(chosen), generator=g).tolist()
        return [self.pool[chosen[i]] for i in order]

    def teacher_demos(self, query: Item, sets: int) -> list[list[Item]]:
        """The ``sets`` demonstration sets (``shots`` items each) of ``query``'s teacher."""
        return [self.demos([query], self.shots, "teacher", [f"{_key(query)}|{j}"])[0]
                for j in range(sets)]

    # ------------------------------------------------------------------ training stream
    def queries(self, start: int, n: int) -> list[Item]:
        """Items ``start .. start + n`` of the training-query stream (a fresh seeded
        permutation of the training queries per epoch)."""
        m = len(self.train)
        if m == 0:
            raise DataError(f"task {self.data.name!r} has no train items")
        out, perms = [], {}
        for p in range(start, start + n):
            epoch, j = divmod(p, m)
            if epoch not in perms:
                g = torch.Generator().manual_seed(seed_of(self.seed, "epoch", epoch))
                perms[epoch] = torch.randperm(m, generator=g).tolist()
            out.append(self.train[perms[epoch][j]])
        return out

    def batch(self, step: int, micro: int) -> list[Item]:
        """The queries of global micro-batch ``micro`` of optimizer step ``step``."""
        return self.queries((step * self.grad_accum + micro) * self.batch_size,
                            self.batch_size)
