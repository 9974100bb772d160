"""Data of the testbed: digit images, the fixed held-out splits, label maps and episodes.

Images are the 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (shipped with scikit-learn,
nothing is downloaded), standardised per pixel with the mean and standard deviation of the
training split (the standard deviation floored at 1 grey level of 16, so near-constant border
pixels do not blow up).

Splits (fixed, stratified per class, seed :data:`SPLIT_SEED`):

* ``"train"``: 60 % of each class, the only images pre-training ever sees;
* ``"demo"``: 20 %, held out: the demonstration pool for evaluation and for M2IV distillation;
* ``"test"``: 20 %, held out: evaluation queries.

Label maps are ``LongTensor[10]`` sending digit ``d`` to label index ``map[d]`` (0..9, token
``LABEL_OFFSET + map[d]``). Two settings share one checkpoint:

* (a) *novel mapping*: each training episode without a family map uses a fresh uniformly random
  permutation; the :data:`NUM_HELDOUT_MAPS` permutations of :func:`heldout_maps` are rejected
  during sampling, so training never sees them;
* (b) *task identification*: a fraction :data:`FAMILY_FRACTION` of training episodes uses one of
  the fixed, meaningful maps of :func:`family_maps` (identity, 9-d, d+1, d+5 mod 10, parity), so
  the demonstrations must identify which one is active.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .model import BOS_ID, IMAGE_ID, LABEL_OFFSET, NUM_LABELS

SPLIT_SEED = 0
SPLIT_FRACTIONS = {"test": 0.2, "demo": 0.2}  # the rest is "train"
SPLITS = ("train", "demo", "test")
HELDOUT_MAP_SEED = 2024
NUM_HELDOUT_MAPS = 8
FAMILY_FRACTION = 0.25
MAX_PAIRS = 17  # 16 demonstrations + the query


# ----------------------------------------------------------------------------------- label maps
def family_maps() -> dict[str, torch.Tensor]:
    """The fixed maps of setting (b): name -> ``LongTensor[10]`` (digit -> label index)."""
    d = torch.arange(10)
    return {
        "identity": d.clone(),
        "reverse": 9 - d,
        "succ": (d + 1) % 10,
        "shift5": (d + 5) % 10,
        "parity": d % 2,  # even -> label 0, odd -> label 1 (two "words")
    }


def heldout_maps() -> list[torch.Tensor]:
    """The fixed permutations of setting (a) that training never uses (``LongTensor[10]`` each).

    None of them equals a family map, and none fixes more than 2 digits.
    """
    g = torch.Generator().manual_seed(HELDOUT_MAP_SEED)
    fam = {tuple(m.tolist()) for m in family_maps().values()}
    out: list[torch.Tensor] = []
    while len(out) < NUM_HELDOUT_MAPS:
        p = torch.randperm(10, generator=g)
        if tuple(p.tolist()) in fam or int((p == torch.arange(10)).sum()) > 2:
            continue
        if any(torch.equal(p, q) for q in out):
            continue
        out.append(p)
    return out


def map_key(m: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(x) for x in m.tolist())


# ------------------------------------------------------------------------------------- images
def _shift(raw: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift raw images ``[N, 8, 8]`` by (dy, dx) pixels with zero fill."""
    out = np.zeros_like(raw)
    h, w = raw.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = raw[..., ys, xs]
    return out


class DigitData:
    """The digits, their splits and standardisation.

    Attributes:
        images: ``FloatTensor[1797, 1, 8, 8]``, standardised.
        digits: ``LongTensor[1797]``, the class 0..9 of each image.
        split_indices: ``{"train"|"demo"|"test": LongTensor[n]}``, indices into ``images``
            (disjoint, sorted).
        mean, std: ``FloatTensor[8, 8]``, the standardisation (raw pixels are 0..16).
        prototypes: ``FloatTensor[10, 1, 8, 8]``, standardised class means of the train split.
    """

    def __init__(self):
        from sklearn.datasets import load_digits

        ds = load_digits()
        raw = np.asarray(ds.images, dtype=np.float32)  # [N, 8, 8], 0..16
        digits = np.asarray(ds.target, dtype=np.int64)
        rng = np.random.RandomState(SPLIT_SEED)
        parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        for c in range(10):
            idx = np.flatnonzero(digits == c)
            idx = idx[rng.permutation(len(idx))]
            n_test = int(round(SPLIT_FRACTIONS["test"] * len(idx)))
            n_demo = int(round(SPLIT_FRACTIONS["demo"] * len(idx)))
            parts["test"].append(idx[:n_test])
            parts["demo"].append(idx[n_test:n_test + n_demo])
            parts["train"].append(idx[n_test + n_demo:])
        self.split_indices = {s: torch.from_numpy(np.sort(np.concatenate(parts[s])))
                              for s in SPLITS}
        train = raw[self.split_indices["train"].numpy()]
        self._mean_np = train.mean(0)
        self._std_np = np.maximum(train.std(0), 1.0)
        self.raw = raw
        self.mean = torch.from_numpy(self._mean_np)
        self.std = torch.from_numpy(self._std_np)
        self.images = self.standardise(raw)
        self.digits = torch.from_numpy(digits)
        tr = self.split_indices["train"]
        self.prototypes = torch.stack(
            [self.images[tr[self.digits[tr] == c]].mean(0) for c in range(10)])
        # per split and class: LongTensor of global indices
        self.by_class = {s: [ix[self.digits[ix] == c] for c in range(10)]
                         for s, ix in self.split_indices.items()}
        self._shifted: torch.Tensor | None = None

    def standardise(self, raw: np.ndarray) -> torch.Tensor:
        """Raw ``[..., 8, 8]`` pixels (0..16) -> standardised ``FloatTensor[..., 1, 8, 8]``."""
        x = (np.asarray(raw, dtype=np.float32) - self._mean_np) / self._std_np
        return torch.from_numpy(x).unsqueeze(-3).contiguous()

    def shifted_images(self) -> torch.Tensor:
        """``FloatTensor[9, 1797, 1, 8, 8]``: every image shifted by (dy, dx) in {-1, 0, 1}^2,
        zero-filled in raw pixel space, then standardised (index 4 is the unshifted image)."""
        if self._shifted is None:
            self._shifted = torch.stack([self.standardise(_shift(self.raw, dy, dx))
                                         for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        return self._shifted

    def fingerprint(self) -> dict:
        """Sizes and index sums of the splits: identifies the split a checkpoint was made with."""
        return {s: [len(ix), int(ix.sum())] for s, ix in self.split_indices.items()}


_DATA: DigitData | None = None


def get_data() -> DigitData:
    """The process-wide :class:`DigitData` (built once)."""
    global _DATA
    if _DATA is None:
        _DATA = DigitData()
    return _DATA


# ------------------------------------------------------------------------------------ prompts
def build_input_ids(labels: torch.Tensor, tokens_per_image: int,
                    with_last_label: bool = False) -> torch.Tensor:
    """Token ids of a batch of episodes.

    Args:
        labels: ``LongTensor[B, n]`` label indices (0..9) of the n pairs; the last pair is the
            query, whose label is appended only when ``with_last_label`` (training).
        tokens_per_image: image tokens per image (1 or 4).

    Returns:
        ``LongTensor[B, 1 + n * (P + 1) - (0 if with_last_label else 1)]``: ``BOS`` then, per pair,
        ``P`` image tokens and the label token.
    """
    B, n = labels.shape
    P = tokens_per_image
    pair = torch.full((B, n, P + 1), IMAGE_ID, dtype=torch.long)
    pair[:, :, P] = labels + LABEL_OFFSET
    ids = torch.cat([torch.full((B, 1), BOS_ID, dtype=torch.long), pair.reshape(B, -1)], 1)
    return ids if with_last_label else ids[:, :-1]


def label_positions(n_pairs: int, tokens_per_image: int) -> torch.Tensor:
    """``LongTensor[n_pairs]``: for each pair, the position whose next-token logits predict its
    label (the last image token of that pair)."""
    P = tokens_per_image
    return torch.arange(n_pairs) * (P + 1) + P


# ---------------------------------------------------------------------------- training episodes
@dataclass
class Curriculum:
    """The pre-training schedule under which in-context learning emerges in the testbed.

    * bursty episodes (only 2-3 classes) from ``bursty_start`` of the episodes at step 0 to
      ``bursty_end`` at ``bursty_steps``;
    * class-mean prototype images instead of real digits (per image) with probability 1 until
      ``proto_until``, falling linearly to 0 at ``proto_end``;
    * the vision tower frozen until ``unfreeze_step``, then trained at ``vision_lr_mult`` x LR;
    * shift augmentation (+-1 pixel, probability ``shift_prob`` per real image) from
      ``shift_start`` (later than unfreezing; ``None`` disables it);
    * a short context of ``short_pairs`` pairs until ``short_until`` (the 4-token variant);
    * a fraction ``family_fraction`` of episodes uses a family map (setting (b)).
    """

    bursty_start: float = 1.0
    bursty_end: float = 0.3
    bursty_steps: int = 3000
    proto_until: int = 400
    proto_end: int = 1600
    unfreeze_step: int = 600
    vision_lr_mult: float = 0.1
    shift_start: int | None = 1800
    shift_prob: float = 0.5
    short_pairs: int = 9
    short_until: int = 0
    family_fraction: float = FAMILY_FRACTION

    def p_bursty(self, step: int) -> float:
        t = min(max(step / max(self.bursty_steps, 1), 0.0), 1.0)
        return self.bursty_start + t * (self.bursty_end - self.bursty_start)

    def p_proto(self, step: int) -> float:
        if step < self.proto_until:
            return 1.0
        if step >= self.proto_end:
            return 0.0
        return 1.0 - (step - self.proto_until) / (self.proto_end - self.proto_until)

    def p_shift(self, step: int) -> float:
        return 0.0 if self.shift_start is None or step < self.shift_start else self.shift_prob

    def n_pairs(self, step: int) -> int:
        return self.short_pairs if step < self.short_until else MAX_PAIRS


class EpisodeSampler:
    """Training episodes: ``MAX_PAIRS`` (image, label) pairs from the train split only.

    Each episode uses a family map with probability ``curriculum.family_fraction`` (uniform over
    the family), otherwise a fresh random permutation that is never one of :func:`heldout_maps`.
    """

    def __init__(self, tokens_per_image: int, curriculum: Curriculum | None = None,
                 seed: int = 0, data: DigitData | None = None):
        self.data = data or get_data()
        self.P = tokens_per_image
        self.cur = curriculum or Curriculum()
        self.g = torch.Generator().manual_seed(seed)
        self.family = torch.stack(list(family_maps().values()))  # [F, 10]
        self.heldout = {map_key(m) for m in heldout_maps()}
        self.train_by_class = self.data.by_class["train"]
        self.rejected = 0  # random permutations rejected because they were held out

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g)

    def sample_map(self) -> tuple[torch.Tensor, bool]:
        """One label map for an episode: ``(LongTensor[10], is_family)``."""
        if float(self._rand(())) < self.cur.family_fraction:
            i = int(torch.randint(len(self.family), (), generator=self.g))
            return self.family[i], True
        while True:
            p = torch.randperm(10, generator=self.g)
            if map_key(p) not in self.heldout:
                return p, False
            self.rejected += 1

    def sample_digits(self, n: int, bursty: bool) -> torch.Tensor:
        if not bursty:
            return torch.randint(10, (n,), generator=self.g)
        c = 2 + int(torch.randint(2, (), generator=self.g))
        classes = torch.randperm(10, generator=self.g)[:c]
        return classes[torch.randint(c, (n,), generator=self.g)]

    def sample(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """A training batch.

        Returns a dict with ``input_ids`` ``[B, T]``, ``pixel_values`` ``[B*n, 1, 8, 8]``,
        ``targets`` ``[B, T]`` (label token id where a loss is taken, -100 elsewhere: every label
        from the second pair on), ``digits``/``labels`` ``[B, n]``, ``is_family`` ``[B]`` and
        ``maps`` ``[B, 10]``.
        """
        n = self.cur.n_pairs(step)
        p_bursty, p_proto, p_shift = (self.cur.p_bursty(step), self.cur.p_proto(step),
                                      self.cur.p_shift(step))
        digits = torch.empty(batch_size, n, dtype=torch.long)
        maps = torch.empty(batch_size, 10, dtype=torch.long)
        is_family = torch.zeros(batch_size, dtype=torch.bool)
        for b in range(batch_size):
            maps[b], is_family[b] = self.sample_map()
            digits[b] = self.sample_digits(n, float(self._rand(())) < p_bursty)
        labels = torch.gather(maps, 1, digits)
        # one random train image per slot
        flat = digits.reshape(-1)
        idx = torch.empty_like(flat)
        for c in range(10):
            sel = (flat == c).nonzero().squeeze(1)
            if len(sel):
                pool = self.train_by_class[c]
                idx[sel] = pool[torch.randint(len(pool), (len(sel),), generator=self.g)]
        if p_shift > 0:
            shifts = torch.randint(9, (len(flat),), generator=self.g)
            keep = torch.full_like(shifts, 4)  # index 4 = no shift
            shifts = torch.where(self._rand(len(flat)) < p_shift, shifts, keep)
            images = self.data.shifted_images()[shifts, idx]
        else:
            images = self.data.images[idx]
        if p_proto > 0:
            use = self._rand(len(flat)) < p_proto
            images = torch.where(use[:, None, None, None], self.data.prototypes[flat], images)
        input_ids = build_input_ids(labels, self.P, with_last_label=True)
        targets = torch.full_like(input_ids, -100)
        pos = label_positions(n, self.P)[1:]  # loss from the second pair on
        targets[:, pos] = labels[:, 1:] + LABEL_OFFSET
        return {"input_ids": input_ids, "pixel_values": images.contiguous(), "targets": targets,
                "digits": digits, "labels": labels, "is_family": is_family, "maps": maps,
                "image_indices": idx.reshape(batch_size, n)}


def sample_balanced_classes(k: int, g: torch.Generator) -> torch.Tensor:
    """Classes of ``k`` class-balanced demonstrations: every class ``k // 10`` times, plus
    ``k % 10`` further distinct classes chosen at random; shuffled. ``LongTensor[k]``."""
    reps = torch.arange(10).repeat(k // 10)
    extra = torch.randperm(10, generator=g)[: k % 10]
    cls = torch.cat([reps, extra])
    return cls[torch.randperm(len(cls), generator=g)]
