"""k-shot multimodal prompts: every LVLM family the patcher supports, through its own processor
(built offline: a local character-level tokenizer + the family's image processor class), with
the chat template and the plain fallback; the testbed's prompts; answer-token bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m2iv.data import DataError, Item
from m2iv.prompts import HFPromptBuilder, make_prompt_builder
from m2iv.testbed.prompts import TestbedPromptBuilder
from m2iv.testing import build, build_offline_processor

LVLMS = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
         "idefics3", "gemma3", "mllama", "internvl"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _item(i, q="what?", a="yes", size=8):
    rng = np.random.RandomState(i)
    return Item(Image.fromarray((rng.rand(size, size) * 255).astype("uint8"), mode="L"), q, a,
                id=str(i))


def _image_token_count(model, ids):
    cfg = model.config
    tok = getattr(cfg, "image_token_id", None)
    tok = tok if tok is not None else getattr(cfg, "image_token_index")
    return int((ids == tok).sum())


@pytest.mark.parametrize("family", LVLMS)
def test_family_prompts(family):
    model = build(family)
    q = [_item(0), _item(1, q="", a="no way")]
    d = [[_item(2), _item(3, size=12)], [_item(4)]]
    counts = {}
    for template in ("plain", "chat"):
        proc = build_offline_processor(model, chat_template="default")
        b = make_prompt_builder(model, proc, template=template)
        assert isinstance(b, HFPromptBuilder) and b.template == template
        enc = b.encode(q, d)
        ids = enc.inputs["input_ids"]
        # the model itself checks that image tokens and image features agree
        with torch.no_grad():
            logits = model(**enc.inputs).logits
        # answer bookkeeping: positions predict the answer tokens, which are in the sequence
        for r in range(2):
            n = int(enc.answer_mask[r].sum())
            pos = enc.answer_positions[r, :n]
            assert torch.equal(ids[r, pos + 1], enc.answer_ids[r, :n])
            assert int(enc.prompt_lengths[r]) == int(pos[0]) + 1
            text = b.decode(enc.answer_ids[r, :n].tolist())
            assert q[r].answer in text
        # the prompt-only (left-padded) encoding predicts the first answer token identically
        gen = b.encode(q, d, with_answer=False)
        assert gen.inputs["attention_mask"][:, -1].all()
        with torch.no_grad():
            last = model(**gen.inputs).logits[:, -1]
        torch.testing.assert_close(last, logits[torch.arange(2), enc.query_positions],
                                   rtol=1e-4, atol=1e-4)
        counts[template] = _image_token_count(model, ids)
        # zero-shot prompts carry exactly one image each (OneVision gives a lone image more
        # tokens than one of several: anyres only for single-image prompts)
        zs = b.encode(q, None)
        with torch.no_grad():
            model(**zs.inputs)
        if family != "llava_onevision":
            assert _image_token_count(model, zs.inputs["input_ids"]) * 5 == counts[template] * 2
    assert counts["plain"] == counts["chat"] > 0


def test_chat_and_plain_text():
    model = build("llava")
    b = make_prompt_builder(model, build_offline_processor(model, chat_template="default"))
    prompt, ans = b.render([_item(1, "q1", "a1")], _item(2, "q2", "a2"))
    assert prompt == "<s>USER: <image>\nq1 ASSISTANT: a1</s>USER: <image>\nq2 ASSISTANT:"
    assert ans == " a2</s>"  # the end-of-turn marker belongs to the answer: the model stops
    assert b.stop_token_ids == (2,)
    plain = HFPromptBuilder(build_offline_processor(model), model, instruction="Name it.")
    assert plain.template == "plain"
    prompt, ans = plain.render([_item(1, "q1", "a1")], _item(2, "", "a2"))
    assert prompt == "Name it.\n<image>\nq1\nAnswer: a1\n<image>\nAnswer:"
    assert ans == " a2\n"
    assert plain.clean_generation(" a2\nmore") == "a2"
    qwen = build("qwen2_vl")
    qb = make_prompt_builder(qwen, build_offline_processor(qwen, chat_template="default"))
    prompt, ans = qb.render([], _item(2, "q2", "a2"))
    assert prompt.endswith("<|im_start|>assistant\n") and ans == "a2<|im_end|>"
    with pytest.raises(ValueError, match="processor is needed"):
        make_prompt_builder(model)
    with pytest.raises(ValueError, match="no chat template"):
        HFPromptBuilder(build_offline_processor(model), model, template="chat")


def test_testbed_prompts():
    from m2iv.testbed.model import BOS_ID, IMAGE_ID, LABEL_OFFSET, build_model

    for variant, P in (("1tok", 1), ("4tok", 4)):
        model = build_model(variant)
        b = make_prompt_builder(model)
        assert isinstance(b, TestbedPromptBuilder)
        q = [_item(0, "", "3"), _item(1, "", "7")]
        d = [[_item(2, "", "1"), _item(3, "", "0")], [_item(4, "", "9")]]
        enc = b.encode(q, d)
        ids = enc.inputs["input_ids"]
        row0 = [BOS_ID] + [IMAGE_ID] * P + [LABEL_OFFSET + 1] + [IMAGE_ID] * P + [
            LABEL_OFFSET] + [IMAGE_ID] * P + [LABEL_OFFSET + 3]
        assert ids[0].tolist() == row0
        assert enc.inputs["pixel_values"].shape == (5, 1, 8, 8)
        assert enc.answer_ids[:, 0].tolist() == [LABEL_OFFSET + 3, LABEL_OFFSET + 7]
        with torch.no_grad():
            model(**enc.inputs)
        assert b.decode([LABEL_OFFSET + 5]) == "5"
    with pytest.raises(DataError, match="labels 0..9"):
        b.encode([_item(0, "", "cat")])
    with pytest.raises(DataError, match="no question text"):
        b.encode([_item(0, "what?", "1")])
