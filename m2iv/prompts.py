"""Interleaved multimodal in-context prompts: k demonstrations, then the query.

A :class:`PromptBuilder` turns (demonstrations, query) items (:class:`m2iv.data.Item`) into a
padded batch of model inputs (:class:`EncodedBatch`). Two kinds:

* :class:`HFPromptBuilder` wraps a model's own Hugging Face processor, which expands every
  image placeholder into the exact image tokens the family expects (LLaVA's ``<image>`` x N,
  Qwen2-VL's ``<|vision_start|><|image_pad|>...<|vision_end|>``, Idefics3's tiles, Gemma 3's
  ``<start_of_image>`` block, Mllama's ``<|image|>`` plus cross-attention mask ...).

  - ``template="chat"`` (the default when the processor has a chat template): one user turn
    (image, question) and one assistant turn (answer) per demonstration, then the query's user
    turn and the generation prompt, rendered by ``processor.apply_chat_template``. The answer
    tokens are what the template renders for the query's assistant turn (so they include the
    end-of-turn marker: the model learns to stop).
  - ``template="plain"`` (the fallback)::

        <image>\\n{question}\\nAnswer: {answer}\\n      (per demonstration)
        <image>\\n{question}\\nAnswer:                  (the query; answer tokens " {answer}\\n")

    where ``<image>`` is the family's placeholder (:func:`image_placeholder`).

* the digits testbed's builder (:class:`m2iv.testbed.prompts.TestbedPromptBuilder`), whose
  16-token vocabulary has no text.

Teacher forcing: ``encode(..., with_answer=True)`` appends the answer tokens to every prompt
(right padding); ``answer_positions[b, j]`` is the position whose next-token logits predict
``answer_ids[b, j]``. ``with_answer=False`` gives left-padded prompts for ``generate()``.

For random-weight models (tests, benchmarks), :func:`m2iv.testing.build_offline_processor`
builds a working processor from the config alone.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .data import Item
from .families import family_of

__all__ = ["EncodedBatch", "PromptBuilder", "HFPromptBuilder", "make_prompt_builder",
           "image_placeholder"]

# per-token model inputs that must be extended when answer tokens are appended:
# name -> value for appended tokens ("last" = copy the last real token's value) and for padding
_PER_TOKEN = {"attention_mask": (1, 0), "token_type_ids": (0, 0), "mm_token_type_ids": (0, 0),
              "cross_attention_mask": ("last", 0)}


@dataclass
class EncodedBatch:
    """A padded batch of prompts.

    * ``inputs``: the model's keyword arguments (``input_ids``, ``attention_mask``,
      ``pixel_values`` and whatever else the family's processor returns);
    * ``answer_ids`` ``LongTensor[B, A]``: answer tokens (``-100`` where a row has fewer);
    * ``answer_positions`` ``LongTensor[B, A]``: the position whose logits predict each answer
      token (0 where padded); ``answer_mask`` ``BoolTensor[B, A]``;
    * ``prompt_lengths`` ``LongTensor[B]``: tokens before the answer (padding excluded);
    * ``answers``: the answer strings, ``ids``: the query item ids.
    """

    inputs: dict
    answer_ids: torch.Tensor
    answer_positions: torch.Tensor
    answer_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    answers: list
    ids: list

    def __len__(self) -> int:
        return self.inputs["input_ids"].shape[0]

    @property
    def query_positions(self) -> torch.Tensor:
        """``LongTensor[B]``: the last prompt token of each row (predicts the first answer
        token)."""
        return self.answer_positions[:, 0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> EncodedBatch:
        """Move to ``device``; ``dtype`` casts the floating-point inputs (pixel values)."""
        inputs = {}
        for k, v in self.inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            inputs[k] = v
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["inputs"] = inputs
        for k in ("answer_ids", "answer_positions", "answer_mask", "prompt_lengths"):
            out[k] = out[k].to(device)
        return EncodedBatch(**out)


def _pad_answers(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    A = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), max(A, 1)), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, ids != -100


class PromptBuilder:
    """Builds k-shot (or zero-shot) prompts for one model. Subclasses implement
    :meth:`_encode_rows` / :meth:`decode`."""

    #: token ids that end an answer (besides max_new_tokens) in generation
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    #: strings that end a generated answer (cut in :meth:`clean_generation`)
    stop_strings: tuple[str, ...] = ("\n",)

    def encode(self, queries: Sequence[Item], demos: Sequence[Sequence[Item]] | None = None,
               *, with_answer: bool = True) -> EncodedBatch:
        """Encode ``queries[b]`` preceded by ``demos[b]`` (a list of items, possibly empty).

        ``with_answer=True``: teacher forcing, answers appended, right padding.
        ``with_answer=False``: prompts only, left padding (for ``generate``).
        """
        queries = list(queries)
        if not queries:
            raise ValueError("encode needs at least one query")
        demos = [list(d) for d in demos] if demos is not None else [[] for _ in queries]
        if len(demos) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(demos)} demonstration lists")
        return self._encode(queries, demos, with_answer)

    def _encode(self, queries, demos, with_answer) -> EncodedBatch:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def clean_generation(self, text: str) -> str:
        """A generated continuation cut at the first stop string and stripped."""
        for s in self.stop_strings:
            if s and s in text:
                text = text.split(s, 1)[0]
        return text.strip()

    def fingerprint(self) -> str:
        """Identifies everything that shapes the prompts (used in teacher-cache keys)."""
        raise NotImplementedError

    def generate_kwargs(self) -> dict:
        return {}


def _finish(rows_ids: list[list[int]], extra: dict, answers: list[list[int]] | None,
            answer_strings, ids, pad_id: int, padding_side: str) -> EncodedBatch:
    """Pad token rows (with per-token tensors in ``extra`` given per row as lists of tensors
    ``[T_b, ...]``) and compute the answer bookkeeping."""
    B = len(rows_ids)
    prompt_len = torch.tensor([len(r) for r in rows_ids], dtype=torch.long)
    full = [r + (answers[b] if answers is not None else []) for b, r in enumerate(rows_ids)]
    T = max(len(r) for r in full)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    offs = []
    for b, r in enumerate(full):
        off = 0 if padding_side == "right" else T - len(r)
        offs.append(off)
        input_ids[b, off:off + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[b, off:off + len(r)] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attn}
    inputs.update(extra)
    if answers is not None:
        a_ids, a_mask = _pad_answers(answers)
        pos = torch.zeros_like(a_ids)
        for b in range(B):
            n = len(answers[b])
            pos[b, :n] = offs[b] + prompt_len[b] - 1 + torch.arange(n)
    else:
        a_ids = torch.full((B, 1), -100, dtype=torch.long)
        a_mask = torch.zeros(B, 1, dtype=torch.bool)
        pos = torch.tensor(offs, dtype=torch.long)[:, None] + prompt_len[:, None] - 1
    return EncodedBatch(inputs, a_ids, pos, a_mask, prompt_len, list(answer_strings), list(ids))


# ---------------------------------------------------------------------------- HF processors
def _model_type(model_or_config) -> str | None:
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "model_type", None)


def image_placeholder(processor, model_type: str | None = None) -> str:
    """The text a plain prompt puts where an image goes, for ``processor`` to expand: the
    family's ``image_placeholder`` fact (:mod:`m2iv.families.table`); without a model type, a
    processor with a vision start token is taken as Qwen-VL-like."""
    kind = family_of(model_type).image_placeholder if model_type is not None else (
        "wrapped" if hasattr(processor, "vision_start_token") else "image_token")
    if kind == "wrapped":
        tok = processor.tokenizer
        start = getattr(processor, "vision_start_token", None) or getattr(
            tok, "vision_start_token", "<|vision_start|>")
        end = getattr(processor, "vision_end_token", None) or getattr(
            tok, "vision_end_token", "<|vision_end|>")
        return f"{start}{processor.image_token}{end}"
    if kind == "boi":
        return getattr(processor, "boi_token", None) or processor.image_token
    tok = getattr(processor, "image_token", None)
    if not tok:
        raise ValueError(f"the processor {type(processor).__name__} has no image_token: pass "
                         "image_text= to HFPromptBuilder")
    return tok


class HFPromptBuilder(PromptBuilder):
    """Prompts through a Hugging Face processor (see the module docstring).

    Args:
        processor: the model's processor (``AutoProcessor.from_pretrained(...)`` or
            :func:`m2iv.testing.build_offline_processor`).
        model: the model (or its config), for the family's image placeholder.
        template: ``"auto"`` (chat if the processor has a chat template, else plain),
            ``"chat"`` or ``"plain"``.
        instruction: optional text put before the demonstrations (plain) or in the first user
            turn (chat).
        image_text: override the plain format's image placeholder.
    """

    def __init__(self, processor, model=None, template: str = "auto",
                 instruction: str | None = None, image_text: str | None = None):
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template must be 'auto', 'chat' or 'plain', got {template!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{type(processor).__name__} has no tokenizer")
        self.model_type = _model_type(model) if model is not None else None
        has_chat = bool(getattr(processor, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ValueError("template='chat' but the processor has no chat template")
        self.template = ("chat" if has_chat else "plain") if template == "auto" else template
        self.instruction = instruction
        self.image_text = image_text or image_placeholder(processor, self.model_type)
        tok = self.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else (
            tok.eos_token_id if tok.eos_token_id is not None else 0)
        stops = []
        for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
                  if "<|im_end|>" in tok.get_vocab() else None,
                  tok.convert_tokens_to_ids("<end_of_turn>")
                  if "<end_of_turn>" in tok.get_vocab() else None,
                  tok.convert_tokens_to_ids("<end_of_utterance>")
                  if "<end_of_utterance>" in tok.get_vocab() else None):
            if isinstance(t, int) and t not in stops:
                stops.append(t)
        self.stop_token_ids = tuple(stops)
        self.stop_strings = ("\n",) if self.template == "plain" else ()
        self._bos = tok.bos_token

    # ------------------------------------------------------------------ text rendering
    def _messages(self, demos: list[Item], query: Item, with_query_answer: bool):
        msgs = []
        for i, it in enumerate(demos + [query]):
            content = []
            if i == 0 and self.instruction:
                content.append({"type": "text", "text": self.instruction + "\n"})
            content.append({"type": "image"})
            if it.question:
                content.append({"type": "text", "text": it.question})
            msgs.append({"role": "user", "content": content})
            if it is not query or with_query_answer:
                msgs.append({"role": "assistant",
                             "content": [{"type": "text", "text": it.answer}]})
        return msgs

    def render(self, demos: list[Item], query: Item) -> tuple[str, str]:
        """``(prompt_text, answer_text)``: the prompt with image placeholders, and the text
        that follows it when the query is answered."""
        if self.template == "chat":
            p = self.processor
            prompt = p.apply_chat_template(self._messages(demos, query, False),
                                           add_generation_prompt=True, tokenize=False)
            full = p.apply_chat_template(self._messages(demos, query, True),
                                         add_generation_prompt=False, tokenize=False)
            if full.startswith(prompt) and full[len(prompt):].strip():
                answer = full[len(prompt):].rstrip()
            else:
                answer = query.answer
            return prompt, answer
        parts = [self.instruction + "\n"] if self.instruction else []
        for it in demos:
            q = f"{it.question}\n" if it.question else ""
            parts.append(f"{self.image_text}\n{q}Answer: {it.answer}\n")
        q = f"{query.question}\n" if query.question else ""
        parts.append(f"{self.image_text}\n{q}Answer:")
        return "".join(parts), f" {query.answer}\n"

    def answer_ids(self, prompt_text: str, answer_text: str) -> list[int]:
        """Tokens of ``answer_text`` as they continue ``prompt_text`` (tokenized together, so
        merges across the boundary are respected; the answer alone if they do not split)."""
        tok = self.tokenizer
        tail = prompt_text[-64:]
        a = tok(tail, add_special_tokens=False)["input_ids"]
        b = tok(tail + answer_text, add_special_tokens=False)["input_ids"]
        if b[:len(a)] == a and len(b) > len(a):
            return list(b[len(a):])
        return list(tok(answer_text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ encoding
    def _encode(self, queries, demos, with_answer):
        texts, answer_texts, images = [], [], []
        for q, d in zip(queries, demos):
            prompt, ans = self.render(d, q)
            texts.append(prompt)
            answer_texts.append(ans)
            images.append([it.load_image().convert("RGB") for it in d + [q]])
        tok = self.tokenizer
        add_special = not (self._bos and all(t.startswith(self._bos) for t in texts))
        old_side = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = self.processor(text=texts, images=images, padding=True, return_tensors="pt",
                                 add_special_tokens=add_special, padding_side="right")
        finally:
            tok.padding_side = old_side
        enc = dict(enc)
        ids = enc.pop("input_ids")
        mask = enc.pop("attention_mask", None)
        if mask is None:
            mask = (ids != self.pad_token_id).long()
        lengths = mask.sum(1).tolist()
        if any(int(mask[b, :n].sum()) != n for b, n in enumerate(lengths)):
            raise RuntimeError("the processor did not right-pad its output")
        rows = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
        answers = ([self.answer_ids(t, a) for t, a in zip(texts, answer_texts)]
                   if with_answer else None)
        side = "right" if with_answer else "left"
        extra = {}
        T = max(len(r) + (len(answers[b]) if answers else 0) for b, r in enumerate(rows))
        for k, v in enc.items():
            if not isinstance(v, torch.Tensor):
                extra[k] = v
                continue
            if k in _PER_TOKEN:
                extra[k] = _repad(v, lengths, answers, T, side, *_PER_TOKEN[k])
            elif v.dim() >= 2 and v.shape[:2] == ids.shape and ids.shape[1] > 1 and k not in (
                    "pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes"):
                raise RuntimeError(f"the processor returned a per-token input {k!r} "
                                   f"{tuple(v.shape)} that m2iv.prompts does not know how to "
                                   "extend; add it to _PER_TOKEN")
            else:
                extra[k] = v
        extra.pop("attention_mask", None)
        return _finish(rows, extra, answers, [q.answer for q in queries],
                       [q.id for q in queries], self.pad_token_id, side)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        tok = self.tokenizer
        h.update(type(self.processor).__name__.encode())
        h.update(json.dumps([self.template, self.instruction, self.image_text,
                             getattr(self.processor, "chat_template", None)]).encode())
        ip = getattr(self.processor, "image_processor", None)
        if ip is not None:
            try:
                h.update(ip.to_json_string().encode())
            except Exception:  # noqa: BLE001 - best effort
                h.update(repr(ip).encode())
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        h.update(hashlib.sha256(json.dumps(vocab).encode()).digest())
        return h.hexdigest()[:32]

    def generate_kwargs(self) -> dict:
        kw = {"pad_token_id": self.pad_token_id}
        if self.stop_token_ids:
            kw["eos_token_id"] = list(self.stop_token_ids)
        return kw


def _repad(v: torch.Tensor, lengths, answers, T: int, side: str, ext, pad) -> torch.Tensor:
    """Re-pad a per-token tensor ``[B, T0, ...]`` (right-padded) to ``[B, T, ...]`` with the
    answer tokens appended (value ``ext``, or a copy of the last real token for "last")."""
    B = v.shape[0]
    out = torch.full((B, T, *v.shape[2:]), pad, dtype=v.dtype)
    for b, n in enumerate(lengths):
        row = v[b, :n]
        if answers is not None and answers[b]:
            a = len(answers[b])
            tail = (row[-1:].expand(a, *row.shape[1:]) if ext == "last"
                    else torch.full((a, *row.shape[1:]), ext, dtype=v.dtype))
            row = torch.cat([row, tail])
        off = 0 if side == "right" else T - len(row)
        out[b, off:off + len(row)] = row
    return out


def make_prompt_builder(model, processor=None, template: str = "auto",
                        instruction: str | None = None) -> PromptBuilder:
    """The prompt builder for ``model``: the testbed's for the digits testbed, else an
    :class:`HFPromptBuilder` over ``processor`` (required)."""
    if hasattr(model, "testbed_config"):
        from .testbed.prompts import TestbedPromptBuilder

        return TestbedPromptBuilder(model)
    if processor is None:
        raise ValueError("a processor is needed to build prompts for this model (load it with "
                         "AutoProcessor.from_pretrained, or m2iv.testing.build_offline_processor"
                         "(model) for a random-weight model)")
    return HFPromptBuilder(processor, model, template=template, instruction=instruction)
