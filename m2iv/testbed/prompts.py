"""Prompts for the digits testbed through the generic :class:`~m2iv.prompts.PromptBuilder`
interface, so that ``m2iv train`` / ``m2iv eval`` treat the testbed like any Hugging Face LVLM.

The 16-token vocabulary has no text: ``BOS``, then per demonstration the image tokens and the
label token, then the query's image tokens (the same layout as :mod:`m2iv.testbed.task`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import DataError, Item
from ..prompts import PromptBuilder, _finish
from .data import get_data
from .model import BOS_ID, IMAGE_ID, LABEL_OFFSET, PAD_ID

__all__ = ["TestbedPromptBuilder"]


class TestbedPromptBuilder(PromptBuilder):
    """Prompts for the digits testbed model (:mod:`m2iv.testbed`).

    Images: any PIL image, converted to greyscale, resized to 8x8, pixel values mapped to the
    digits' 0..16 range (``x * 16 / 255``) and standardised like the testbed's own images.
    Answers must be the label ``"0"`` .. ``"9"``; questions must be empty (the vocabulary has no
    text).

    Each image is decoded once: its pixels are memoised by the item's content digest, so the
    many-shot teacher (thousands of prompts re-using the same pool images) does not re-read PNGs.
    """

    __test__ = False

    def __init__(self, model_or_config):
        cfg = getattr(model_or_config, "testbed_config", model_or_config)
        self.tokens_per_image = cfg.tokens_per_image
        self.image_size = cfg.image_size
        self.variant = cfg.variant
        self._data = get_data()
        self.pad_token_id = PAD_ID
        self.stop_token_ids = ()
        self.stop_strings = ()
        self._pixel_memo: dict[bytes, torch.Tensor] = {}

    def _label(self, it: Item) -> int:
        a = it.answer.strip()
        if a not in {str(i) for i in range(10)}:
            raise DataError(f"{it.where()}: the testbed model's answers are the labels 0..9; "
                            f"got {it.answer!r}")
        return LABEL_OFFSET + int(a)

    def _pixels(self, it: Item) -> torch.Tensor:
        key = it.fingerprint()
        px = self._pixel_memo.get(key)
        if px is None:
            import numpy as np

            im = it.load_image().convert("L")
            if im.size != (self.image_size, self.image_size):
                im = im.resize((self.image_size, self.image_size))
            raw = np.asarray(im, dtype=np.float32) * (16.0 / 255.0)
            px = self._pixel_memo[key] = self._data.standardise(raw)  # [1, 8, 8]
        return px

    def _encode(self, queries, demos, with_answer):
        P = self.tokens_per_image
        rows, answers, pix = [], [], []
        for q, d in zip(queries, demos):
            if q.question.strip():
                raise DataError(f"{q.where()}: the testbed model takes no question text; "
                                f"got {q.question!r}")
            ids = [BOS_ID]
            for it in d:
                ids += [IMAGE_ID] * P + [self._label(it)]
                pix.append(self._pixels(it))
            ids += [IMAGE_ID] * P
            pix.append(self._pixels(q))
            rows.append(ids)
            answers.append([self._label(q)])
        extra = {"pixel_values": torch.stack(pix)}
        return _finish(rows, extra, answers if with_answer else None,
                       [q.answer for q in queries], [q.id for q in queries], self.pad_token_id,
                       "right" if with_answer else "left")

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(str(i - LABEL_OFFSET) for i in ids
                       if LABEL_OFFSET <= i < LABEL_OFFSET + 10)

    def fingerprint(self) -> str:
        return f"testbed-{self.variant}-p{self.tokens_per_image}"

    def generate_kwargs(self) -> dict:
        return {"pad_token_id": self.pad_token_id, "max_new_tokens": 1}
