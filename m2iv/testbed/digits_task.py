"""The built-in example task: the testbed's digits written as an ordinary task directory
(``data.jsonl`` + PNGs, :mod:`m2iv.data`'s format), so that ``m2iv train`` / ``m2iv eval`` run
on it exactly as on a user's data (``m2iv data make-digits DIR``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ..data import DATA_FILE, SPLITS, TaskData
from .data import family_maps, get_data, heldout_maps

__all__ = ["make_digits", "digits_to_pil"]

DIGITS_PIXEL_SCALE = 255.0 / 16.0  # scikit-learn digit pixels are 0..16


def digits_to_pil(raw):
    """An 8x8 scikit-learn digit (0..16 floats) as an 8x8 greyscale PIL image."""
    import numpy as np
    from PIL import Image

    arr = np.clip(np.rint(np.asarray(raw, dtype=np.float64) * DIGITS_PIXEL_SCALE), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def make_digits(directory: str | os.PathLike, label_map: str | Sequence[int] = "heldout0",
                pool_size: int | None = None, train_size: int | None = None,
                eval_size: int | None = None, seed: int = 0) -> TaskData:
    """Write the built-in example task to ``directory`` and return it.

    The images are scikit-learn's bundled 8x8 digits (nothing is downloaded). The answer to an
    image of digit ``d`` is ``str(label_map[d])``; the default ``"heldout0"`` is a permutation
    that the testbed model (:mod:`m2iv.testbed`) never saw in pre-training, so the answer is only
    knowable from the demonstrations: zero-shot accuracy is chance and k-shot ICL is high, which
    is what an M2IV must distil. Questions are empty (the task is defined by its examples).

    Splits follow the testbed's fixed held-out splits: ``pool`` = its ``demo`` images, ``train``
    = its ``train`` images, ``eval`` = its ``test`` images; ``*_size`` takes a seeded subset.
    """
    import numpy as np

    directory = os.fspath(directory)
    data = get_data()
    if isinstance(label_map, str):
        maps = dict(family_maps())
        maps.update({f"heldout{i}": m for i, m in enumerate(heldout_maps())})
        if label_map not in maps:
            raise ValueError(f"unknown label map {label_map!r}; choose from {sorted(maps)}")
        lm, map_name = [int(x) for x in maps[label_map].tolist()], label_map
    else:
        lm = [int(x) for x in label_map]
        if len(lm) != 10:
            raise ValueError("label_map must give one label for each of the 10 digits")
        map_name = "custom"
    rng = np.random.RandomState(seed)
    sizes = {"pool": pool_size, "train": train_size, "eval": eval_size}
    src = {"pool": "demo", "train": "train", "eval": "test"}
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    items = []
    for split in SPLITS:
        ix = data.split_indices[src[split]].numpy()
        if sizes[split] is not None:
            if sizes[split] > len(ix):
                raise ValueError(f"{split}_size {sizes[split]} > {len(ix)} available images")
            ix = np.sort(rng.permutation(ix)[: sizes[split]])
        for i in ix.tolist():
            rel = f"images/{i:04d}.png"
            digits_to_pil(data.raw[i]).save(os.path.join(directory, rel), format="PNG")
            items.append({"id": f"digit{i:04d}", "image": rel, "question": "",
                          "answer": str(lm[int(data.digits[i])]), "split": split,
                          "digit": int(data.digits[i])})
    with open(os.path.join(directory, DATA_FILE), "w", encoding="utf-8") as f:
        for rec in items:
            f.write(json.dumps(rec) + "\n")
    with open(os.path.join(directory, "task.json"), "w", encoding="utf-8") as f:
        json.dump({"name": f"digits-{map_name}", "label_map": lm, "source":
                   "sklearn.datasets.load_digits", "model": "testbed"}, f, indent=1)
    return TaskData.from_dir(directory, name=f"digits-{map_name}")
