"""The downstream API: prompts for k-shot teachers and zero-shot students on the testbed.

A prompt is ``BOS`` followed by k demonstrations (``P`` image tokens then the label token each,
``P`` = tokens per image) and the query's ``P`` image tokens; the next-token logits at the last
position (``answer_positions``) predict the query's label token. All prompts of one
:class:`PromptBatch` have the same k, hence the same length: no padding, ``attention_mask`` is all
ones and ``answer_positions == T - 1``.

Typical distillation step::

    model, task = load_testbed("1tok")
    m = task.label_map("heldout0")                      # or "identity", "reverse", ...
    pool = task.demo_pool(128, seed=0)                  # a fixed many-shot pool (held-out images)
    g = torch.Generator().manual_seed(step)
    q = task.sample_queries(32, generator=g, split="train")   # queries for training vectors
    teacher = task.prompts(q, m, task.sample_demos(32, 16, generator=g, pool=pool))
    student = task.prompts(q, m)                        # zero-shot: BOS + the query only
    t_logits = label_logits(model, teacher)             # [32, 10]
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .data import (DigitData, build_input_ids, family_maps, get_data, heldout_maps,
                   sample_balanced_classes)
from .model import LABEL_IDS, LABEL_OFFSET, TestbedModelConfig


@dataclass
class PromptBatch:
    """A batch of k-shot prompts (k may be 0) sharing one label map.

    Shapes (B prompts, T = 1 + k * (P + 1) + P tokens, P image tokens per image):

    * ``input_ids``, ``attention_mask``: ``LongTensor[B, T]``;
    * ``pixel_values``: ``FloatTensor[B * (k + 1), 1, 8, 8]``, the images in the order their
      image tokens appear (row by row, demonstrations then the query);
    * ``answer_positions``: ``LongTensor[B]``, the position whose next-token logits predict the
      answer (always ``T - 1``);
    * ``answer_tokens``: ``LongTensor[B]``, the correct label token id
      (``LABEL_OFFSET + answer_labels``);
    * ``answer_labels``: ``LongTensor[B]``, the correct label index 0..9;
    * ``query_digits``, ``query_indices``: ``LongTensor[B]``, the query's class and image index;
    * ``demo_indices``: ``LongTensor[B, k]``, image indices of the demonstrations;
    * ``label_map``: ``LongTensor[10]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    answer_positions: torch.Tensor
    answer_tokens: torch.Tensor
    answer_labels: torch.Tensor
    query_digits: torch.Tensor
    query_indices: torch.Tensor
    demo_indices: torch.Tensor
    label_map: torch.Tensor

    @property
    def k(self) -> int:
        return self.demo_indices.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """``dict(input_ids=..., attention_mask=..., pixel_values=...)`` for ``model(**...)``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "pixel_values": self.pixel_values}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PromptBatch":
        """Move every tensor to ``device``; ``dtype`` casts ``pixel_values`` only."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name).to(device)
            if f.name == "pixel_values" and dtype is not None:
                v = v.to(dtype)
            out[f.name] = v
        return PromptBatch(**out)


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else seed)


class TestbedTask:
    """Label maps, held-out image splits and prompt construction for one testbed variant.

    Attributes:
        tokens_per_image: P, image tokens per image (1 or 4).
        data: the :class:`~m2iv.testbed.data.DigitData` (``images``, ``digits``,
            ``split_indices``).
        maps: ``{name: LongTensor[10]}``: ``"heldout0"`` .. ``"heldout7"`` (setting (a), never
            seen in training) and the family maps ``"identity"``, ``"reverse"``, ``"succ"``,
            ``"shift5"``, ``"parity"`` (setting (b)).
        heldout_map_names, family_map_names: the names of each setting.
    """

    __test__ = False  # not a pytest class

    def __init__(self, variant: str | TestbedModelConfig = "1tok", data: DigitData | None = None):
        cfg = variant if isinstance(variant, TestbedModelConfig) else \
            TestbedModelConfig.for_variant(variant)
        self.variant = cfg.variant
        self.tokens_per_image = cfg.tokens_per_image
        self.data = data or get_data()
        held = heldout_maps()
        fam = family_maps()
        self.heldout_map_names = [f"heldout{i}" for i in range(len(held))]
        self.family_map_names = list(fam)
        self.maps = dict(zip(self.heldout_map_names, held))
        self.maps.update(fam)
        self.label_ids = torch.tensor(LABEL_IDS)

    # ------------------------------------------------------------------------------ maps
    def label_map(self, m: str | int | torch.Tensor | list) -> torch.Tensor:
        """A label map ``LongTensor[10]`` from a name, a held-out index or explicit values."""
        if isinstance(m, str):
            return self.maps[m]
        if isinstance(m, int):
            return self.maps[self.heldout_map_names[m]]
        m = torch.as_tensor(m, dtype=torch.long)
        if m.shape != (10,) or int(m.min()) < 0 or int(m.max()) > 9:
            raise ValueError("a label map is 10 label indices in 0..9 (one per digit)")
        return m

    # --------------------------------------------------------------------------- sampling
    def split(self, name: str) -> torch.Tensor:
        """``LongTensor[n]``: image indices of split ``"train"``, ``"demo"`` or ``"test"``."""
        return self.data.split_indices[name]

    def sample_queries(self, n: int, seed: int | None = 0, split: str = "test",
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """``LongTensor[n]`` query image indices from ``split``: a random permutation of the
        split, cycled (each image once before any repeats)."""
        g = _generator(seed, generator)
        ix = self.split(split)
        reps = -(-n // len(ix))
        order = torch.cat([ix[torch.randperm(len(ix), generator=g)] for _ in range(reps)])
        return order[:n]

    def demo_pool(self, size: int, seed: int | None = 0, split: str = "demo",
                  balanced: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """``LongTensor[size]``: a fixed pool of distinct demonstration images (class-balanced
        unless ``balanced=False``), e.g. 128 images for many-shot distillation."""
        g = _generator(seed, generator)
        ix = self.split(split)
        if size > len(ix):
            raise ValueError(f"split {split!r} has only {len(ix)} images")
        if not balanced:
            return ix[torch.randperm(len(ix), generator=g)[:size]]
        by_class = [c[torch.randperm(len(c), generator=g)] for c in self.data.by_class[split]]
        counts = torch.bincount(sample_balanced_classes(size, g), minlength=10)
        return torch.cat([by_class[c][: int(counts[c])] for c in range(10)])[
            torch.randperm(size, generator=g)]

    def sample_demos(self, n_rows: int, k: int, seed: int | None = 0, split: str = "demo",
                     balanced: bool = False, pool: torch.Tensor | None = None,
                     exclude: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """``LongTensor[n_rows, k]``: demonstration image indices, distinct within a row.

        Drawn from ``pool`` (image indices) if given, else from the whole ``split``.
        ``balanced=False``: uniformly at random (so the query's class may be missing);
        ``balanced=True``: class-balanced (every class ``k // 10`` times plus ``k % 10``
        further distinct random classes, shuffled; for k < 10 that is k distinct classes).
        ``exclude`` (``LongTensor[n_rows]``) removes one image per row, e.g. the query itself
        when queries and demonstrations come from the same split.
        """
        g = _generator(seed, generator)
        cand = self.split(split) if pool is None else torch.as_tensor(pool, dtype=torch.long)
        if k == 0:
            return torch.empty(n_rows, 0, dtype=torch.long)
        if not balanced:
            score = torch.rand(n_rows, len(cand), generator=g)
            if exclude is not None:
                score[cand[None, :] == exclude[:, None]] = 2.0
            return cand[score.argsort(1)[:, :k]]
        digits = self.data.digits[cand]
        by_class = [cand[digits == c] for c in range(10)]
        out = torch.empty(n_rows, k, dtype=torch.long)
        for r in range(n_rows):
            cls = sample_balanced_classes(k, g)
            row = torch.empty(k, dtype=torch.long)
            for c in cls.unique().tolist():
                avail = by_class[c]
                if exclude is not None:
                    avail = avail[avail != exclude[r]]
                sel = (cls == c).nonzero().squeeze(1)
                if len(avail) < len(sel):
                    raise ValueError(f"not enough images of class {c} for balanced demos")
                row[sel] = avail[torch.randperm(len(avail), generator=g)[: len(sel)]]
            out[r] = row
        return out

    # ---------------------------------------------------------------------------- prompts
    def prompts(self, query_indices: torch.Tensor, label_map, demo_indices: torch.Tensor | None
                = None) -> PromptBatch:
        """Build a :class:`PromptBatch`.

        Args:
            query_indices: ``LongTensor[B]`` image indices of the queries.
            label_map: anything :meth:`label_map` accepts.
            demo_indices: ``LongTensor[B, k]`` demonstration image indices, or ``None`` for the
                zero-shot prompt ``BOS`` + query.
        """
        m = self.label_map(label_map)
        q = torch.as_tensor(query_indices, dtype=torch.long).reshape(-1)
        B = len(q)
        d = (torch.empty(B, 0, dtype=torch.long) if demo_indices is None
             else torch.as_tensor(demo_indices, dtype=torch.long).reshape(B, -1))
        all_ix = torch.cat([d, q[:, None]], 1)  # [B, k+1]
        labels = m[self.data.digits[all_ix]]
        ids = build_input_ids(labels, self.tokens_per_image, with_last_label=False)
        return PromptBatch(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=self.data.images[all_ix.reshape(-1)].contiguous(),
            answer_positions=torch.full((B,), ids.shape[1] - 1, dtype=torch.long),
            answer_tokens=labels[:, -1] + LABEL_OFFSET,
            answer_labels=labels[:, -1].clone(),
            query_digits=self.data.digits[q],
            query_indices=q,
            demo_indices=d,
            label_map=m,
        )

    def sample_prompts(self, label_map, k: int, batch_size: int, seed: int | None = 0,
                       balanced: bool = False, query_split: str = "test",
                       demo_split: str = "demo", pool: torch.Tensor | None = None,
                       generator: torch.Generator | None = None
                       ) -> tuple[PromptBatch, PromptBatch]:
        """``(teacher, student)``: ``batch_size`` random queries as k-shot prompts (teacher) and
        as zero-shot prompts (student), the same queries in the same order."""
        g = _generator(seed, generator)
        q = self.sample_queries(batch_size, split=query_split, generator=g)
        same = pool is None and query_split == demo_split
        d = self.sample_demos(batch_size, k, split=demo_split, balanced=balanced, pool=pool,
                              exclude=q if same or pool is not None else None, generator=g)
        return self.prompts(q, label_map, d), self.prompts(q, label_map)
