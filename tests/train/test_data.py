"""Task data: the on-disk format, the Python API, splits, the built-in digits task, and clear
errors for bad items (nothing skipped silently)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from m2iv.data import DataError, Item, TaskData, load_task
from m2iv.testbed.digits_task import make_digits


def _img(seed=0, size=8):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size) * 255).astype("uint8"), mode="L")


def _write(tmp_path, records, images=("a.png", "b.png")):
    os.makedirs(tmp_path / "img", exist_ok=True)
    for i, name in enumerate(images):
        _img(i).save(tmp_path / "img" / name)
    with open(tmp_path / "data.jsonl", "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return tmp_path


def test_from_dir_and_splits(tmp_path):
    recs = [{"image": "img/a.png", "question": "q?", "answer": "yes", "split": "pool"},
            {"image": "img/b.png", "question": "", "answer": "no", "split": "train", "id": "x"},
            {"image": "img/a.png", "question": "q2", "answer": "2", "split": "eval",
             "extra": 1}]
    t = TaskData.from_dir(_write(tmp_path, recs))
    assert len(t) == 3 and t.counts() == {"pool": 1, "train": 1, "eval": 1, "unassigned": 0}
    assert [it.id for it in t] == ["0", "x", "2"]  # default id: position
    assert t.eval[0].extra == {"extra": 1}
    assert t.pool[0].load_image().size == (8, 8)
    assert os.path.isabs(t.pool[0].image)
    # a .jsonl path works too, and load_task accepts either
    assert len(load_task(str(tmp_path / "data.jsonl"))) == 3


def test_conversations_and_json_list(tmp_path):
    _img().save(tmp_path / "a.png")
    rec = {"id": "c1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "data.json").write_text(json.dumps([rec]))
    t = TaskData.from_dir(tmp_path)
    assert (t.items[0].question, t.items[0].answer) == ("What color?", "red")


def test_python_api_pil_and_paths(tmp_path):
    _img(3).save(tmp_path / "p.png")
    items = [{"image": _img(1), "question": "q", "answer": "a"},
             Item(image=str(tmp_path / "p.png"), question="q", answer="b"),
             {"image": "p.png", "question": "q", "answer": "c"}]
    t = TaskData.from_items(items, name="api", root=str(tmp_path))
    assert len(t) == 3 and t.counts()["unassigned"] == 3
    t.assign_splits(pool=1, train=1, seed=0)
    assert t.counts() == {"pool": 1, "train": 1, "eval": 1, "unassigned": 0}
    again = TaskData.from_items(items, name="api", root=str(tmp_path)).assign_splits(
        pool=1, train=1, seed=0)
    assert [i.split for i in t] == [i.split for i in again]
    # save -> from_dir round trip (PIL images written as PNG)
    t.save(tmp_path / "out")
    back = TaskData.from_dir(tmp_path / "out")
    assert [(i.answer, i.split) for i in back] == [(i.answer, i.split) for i in t]


def test_bad_items_are_all_named(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    recs = [{"image": "img/a.png", "question": "fine", "answer": "ok"},
            {"image": "img/missing.png", "question": "q", "answer": "a", "id": "m1"},
            {"image": "img/broken.png", "question": "q", "answer": "a"},
            {"image": "img/a.png", "question": "q", "answer": "   "},
            "{not json",
            {"image": "img/a.png", "question": "q", "answer": "a", "split": "test"},
            {"image": "img/a.png", "answer": "a"},
            {"image": "img/a.png", "question": "q", "answer": 3}]
    _write(tmp_path, recs, images=("a.png",))
    with pytest.raises(DataError) as e:
        TaskData.from_dir(tmp_path)
    msg = str(e.value)
    assert "7 bad item(s)" in msg
    for needle in ("line 2 (id 'm1'): image file not found", "line 3: cannot read image",
                   "line 4: empty answer", "line 5: invalid JSON", "unknown split 'test'",
                   "line 7: missing 'question'", "line 8: 'answer' must be a string"):
        assert needle in msg, (needle, msg)
    assert "line 1" not in msg


def test_duplicate_ids_and_empty(tmp_path):
    recs = [{"image": "img/a.png", "question": "", "answer": "a", "id": "d"},
            {"image": "img/b.png", "question": "", "answer": "b", "id": "d"}]
    with pytest.raises(DataError, match="duplicate id 'd'"):
        TaskData.from_dir(_write(tmp_path, recs))
    with pytest.raises(DataError, match="no items"):
        TaskData.from_items([], name="empty")
    with pytest.raises(DataError, match="no data.jsonl"):
        TaskData.from_dir(tmp_path / "img")
    with pytest.raises(DataError, match="image must be a path or a PIL image|'image' must be"):
        TaskData.from_items([{"image": 3, "question": "", "answer": "a"}])


def test_require_splits_and_unreadable_at_load_time(tmp_path):
    t = TaskData.from_items([{"image": _img(), "question": "", "answer": "a", "split": "pool"}])
    with pytest.raises(DataError, match="split\\(s\\) train, eval are empty"):
        t.require_splits("pool", "train", "eval")
    # check_images=False defers the check to load time, which still names the item
    t = TaskData.from_items([{"image": str(tmp_path / "gone.png"), "question": "",
                              "answer": "a"}], check_images=False)
    with pytest.raises(DataError, match="item 0.*not found"):
        t.items[0].load_image()


def test_make_digits(tmp_path):
    from m2iv.testbed.data import get_data, heldout_maps

    t = make_digits(tmp_path / "digits", pool_size=20, train_size=10, eval_size=5)
    assert t.counts() == {"pool": 20, "train": 10, "eval": 5, "unassigned": 0}
    assert t.name == "digits-heldout0"
    m = heldout_maps()[0].tolist()
    raw = get_data().raw
    for it in t:
        assert it.question == "" and it.answer == str(m[it.extra["digit"]])
        idx = int(it.id[len("digit"):])
        px = np.asarray(it.load_image(), dtype=np.float32) * 16 / 255
        assert np.abs(px - raw[idx]).max() < 0.04  # PNG round trip of the 0..16 pixels
    again = TaskData.from_dir(tmp_path / "digits")
    assert [i.id for i in again] == [i.id for i in t]
