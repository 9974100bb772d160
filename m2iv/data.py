"""Task data for training and evaluating M2IVs: (image, question, answer) items and their splits.

On-disk format (LLaVA-style JSON conventions): a directory holding ``data.jsonl`` (one JSON
object per line) and the images, with image paths relative to the directory::

    mytask/
      data.jsonl
      images/0001.png ...

    {"image": "images/0001.png", "question": "What is shown?", "answer": "a cat",
     "split": "pool", "id": "0001"}

* ``image`` (required): path relative to the directory (absolute paths are accepted too).
* ``question`` (required, may be empty: e.g. a fixed task whose instruction is the demonstrations).
* ``answer`` (required, non-empty after stripping whitespace).
* ``split`` (optional): ``"pool"`` (the demonstration pool), ``"train"`` (training queries) or
  ``"eval"`` (evaluation queries). Items without one are assigned by :meth:`TaskData.assign_splits`
  (seeded, reproducible).
* ``id`` (optional): unique; defaults to the line number.

An optional ``task.json`` beside it holds task-level facts: ``{"name": "...", "model": "testbed"}``
(the name goes into the vectors' metadata; ``model`` is the default for ``m2iv train --model``).

A LLaVA conversation record is accepted in place of ``question``/``answer``: ``"conversations":
[{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]`` (the first
human/gpt pair; the ``<image>`` placeholder is removed). A ``data.json`` holding a JSON list of
such objects is read as well. Any other keys are kept in :attr:`Item.extra`.

Validation is strict: a missing or unreadable image, an empty answer, a wrong type, an unknown
split or a duplicate id raises :class:`DataError` naming the file, line and id of every bad item
(up to 20 listed). Nothing is skipped silently.

Python API: :meth:`TaskData.from_items` accepts any iterable of dicts or :class:`Item` with
PIL images or paths. The built-in example task (scikit-learn's 8x8 digits) is written by
:func:`m2iv.testbed.digits_task.make_digits`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import M2IVError

__all__ = ["DataError", "Item", "TaskData", "SPLITS", "load_task", "DATA_FILE"]

SPLITS = ("pool", "train", "eval")
DATA_FILE = "data.jsonl"
_MAX_LISTED = 20
_KNOWN_KEYS = {"image", "question", "answer", "split", "id", "conversations"}


class DataError(M2IVError, ValueError):
    """Malformed task data: the message names every bad item (file, line, id) and the problem."""


@dataclass
class Item:
    """One (image, question, answer) example.

    ``image`` is a PIL image or a path (str / os.PathLike), loaded on demand by
    :meth:`load_image`. ``source`` says where the item came from (``"data.jsonl line 12"``) and
    is used in error messages.
    """

    image: Any
    question: str
    answer: str
    split: str | None = None
    id: str | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def where(self) -> str:
        s = self.source or "item"
        return f"{s} (id {self.id!r})" if self.id is not None else s

    def load_image(self):
        """The image as a PIL image (``DataError`` naming the item if it cannot be read)."""
        return _open_image(self.image, self.where())

    def fingerprint(self) -> bytes:
        """A stable digest of the item's content (image bytes, question, answer): keys the
        teacher cache. Memoised (items are treated as immutable once built)."""
        memo = self.__dict__.get("_fp")
        if memo is not None and memo[0] == (self.question, self.answer, id(self.image)):
            return memo[1]
        h = hashlib.sha256()
        h.update(self.question.encode())
        h.update(b"\x00")
        h.update(self.answer.encode())
        h.update(b"\x00")
        h.update(_image_digest(self.image))
        self.__dict__["_fp"] = ((self.question, self.answer, id(self.image)), h.digest())
        return h.digest()


_DIGESTS: dict[tuple, bytes] = {}


def _image_digest(image) -> bytes:
    if isinstance(image, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(image))
        try:
            st = os.stat(path)
        except OSError:
            return hashlib.sha256(path.encode()).digest()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            with open(path, "rb") as f:
                _DIGESTS[key] = hashlib.sha256(f.read()).digest()
        return _DIGESTS[key]
    try:  # a PIL image
        return hashlib.sha256(image.mode.encode() + str(image.size).encode()
                              + image.tobytes()).digest()
    except AttributeError:
        return hashlib.sha256(repr(image).encode()).digest()


def _open_image(image, where: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise DataError(f"{where}: image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{where}: cannot read image {path}: {err}") from None
    raise DataError(f"{where}: image must be a PIL image or a path, got {type(image).__name__}")


def _check_image_file(path: str) -> str | None:
    """None if ``path`` is a readable image, else the reason."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        return f"image file not found: {path}"
    if os.path.isdir(path):
        return f"image path is a directory: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"cannot read image {path}: {err}"
    return None


def _from_conversations(conv, where: str) -> tuple[str, str]:
    if not isinstance(conv, list):
        raise DataError(f"{where}: 'conversations' must be a list of turns")
    q = a = None
    for turn in conv:
        if not isinstance(turn, dict) or "value" not in turn:
            raise DataError(f"{where}: every conversation turn needs 'from' and 'value'")
        role = turn.get("from", turn.get("role"))
        if role in ("human", "user") and q is None:
            q = turn["value"]
        elif role in ("gpt", "assistant") and q is not None and a is None:
            a = turn["value"]
    if q is None or a is None:
        raise DataError(f"{where}: 'conversations' has no human turn followed by a gpt turn")
    if not isinstance(q, str) or not isinstance(a, str):
        raise DataError(f"{where}: conversation values must be strings")
    q = q.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()
    return q, a


def _parse_record(rec, where: str, root: str | None, errors: list[str],
                  check_images: bool) -> Item | None:
    """An :class:`Item` from one record, or None with the problems appended to ``errors``."""
    if isinstance(rec, Item):
        rec = {"image": rec.image, "question": rec.question, "answer": rec.answer,
               "split": rec.split, "id": rec.id, **rec.extra}
    if not isinstance(rec, dict):
        errors.append(f"{where}: expected a JSON object / dict, got {type(rec).__name__}")
        return None
    item_id = rec.get("id")
    if item_id is not None:
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            errors.append(f"{where}: 'id' must be a string or an integer, got {item_id!r}")
            return None
        item_id = str(item_id)
        where = f"{where} (id {item_id!r})"
    problems = []
    if "conversations" in rec and ("question" not in rec and "answer" not in rec):
        try:
            question, answer = _from_conversations(rec["conversations"], where)
        except DataError as err:
            errors.append(str(err))
            return None
    else:
        question, answer = rec.get("question"), rec.get("answer")
        if question is None:
            problems.append("missing 'question' (use \"\" for none)")
        elif not isinstance(question, str):
            problems.append(f"'question' must be a string, got {type(question).__name__}")
        if answer is None:
            problems.append("missing 'answer'")
        elif not isinstance(answer, str):
            problems.append(f"'answer' must be a string, got {type(answer).__name__}")
    if isinstance(answer, str) and not answer.strip():
        problems.append("empty answer")
    split = rec.get("split")
    if split is not None and split not in SPLITS:
        problems.append(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    image = rec.get("image")
    if image is None:
        problems.append("missing 'image'")
    elif isinstance(image, (str, os.PathLike)):
        if not os.fspath(image):
            problems.append("empty 'image' path")
        else:
            path = os.fspath(image)
            if root is not None and not os.path.isabs(path):
                path = os.path.join(root, path)
            image = path
            if check_images:
                why = _check_image_file(path)
                if why:
                    problems.append(why)
    else:
        try:
            from PIL import Image
            ok = isinstance(image, Image.Image)
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            problems.append(f"'image' must be a path or a PIL image, got {type(image).__name__}")
    if problems:
        errors.append(f"{where}: " + "; ".join(problems))
        return None
    extra = {k: v for k, v in rec.items() if k not in _KNOWN_KEYS}
    return Item(image=image, question=question, answer=answer, split=split, id=item_id,
                source=where.split(" (id ")[0], extra=extra)


def _raise(errors: list[str], what: str) -> None:
    if not errors:
        return
    shown = errors[:_MAX_LISTED]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    raise DataError(f"{what}: {len(errors)} bad item(s):\n  " + "\n  ".join(shown) + more)


class TaskData:
    """A task's items and their splits (``pool``, ``train``, ``eval``).

    Build with :meth:`from_dir` (the on-disk format), :meth:`from_items` (any iterable of dicts
    or :class:`Item`), or :func:`load_task` (either). Every item is validated on construction.
    """

    def __init__(self, items: Sequence[Item], name: str = "task", root: str | None = None):
        self.items: list[Item] = list(items)
        self.name = name
        self.root = root
        if not self.items:
            raise DataError(f"task {name!r} has no items")
        seen: dict[str, str] = {}
        errors = []
        for i, it in enumerate(self.items):
            if it.id is None:
                it.id = str(i)
            if it.id in seen:
                errors.append(f"{it.where()}: duplicate id {it.id!r} (first at {seen[it.id]})")
            else:
                seen[it.id] = it.source or f"item {i}"
        _raise(errors, f"task {name!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_items(cls, items: Iterable, name: str = "task", root: str | None = None,
                   check_images: bool = True) -> TaskData:
        """Items from dicts (``image``, ``question``, ``answer``, optional ``split``, ``id``) or
        :class:`Item` s. Relative image paths are resolved against ``root``."""
        errors: list[str] = []
        out = []
        for i, rec in enumerate(items):
            where = rec.source if isinstance(rec, Item) and rec.source else f"item {i}"
            it = _parse_record(rec, where, root, errors, check_images)
            if it is not None:
                out.append(it)
        _raise(errors, f"task {name!r}")
        return cls(out, name=name, root=root)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, name: str | None = None,
                 check_images: bool = True) -> TaskData:
        """Read a task directory (``data.jsonl`` or ``data.json``) or a ``.jsonl`` / ``.json``
        file directly; image paths are relative to the file's directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            for fname in (DATA_FILE, "data.json"):
                if os.path.exists(os.path.join(path, fname)):
                    file = os.path.join(path, fname)
                    break
            else:
                raise DataError(f"{path}: no {DATA_FILE} (or data.json) in this directory")
        elif os.path.exists(path):
            file = path
        else:
            raise DataError(f"task data not found: {path}")
        root = os.path.dirname(os.path.abspath(file))
        fname = os.path.basename(file)
        name = name or task_info(root).get("name") or os.path.basename(root.rstrip(os.sep)) \
            or "task"
        errors: list[str] = []
        records: list[tuple[str, Any]] = []
        with open(file, encoding="utf-8") as f:
            text = f.read()
        if file.endswith(".json") and text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}: invalid JSON: {err}") from None
            records = [(f"{fname} item {i}", r) for i, r in enumerate(data)]
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{fname} line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    errors.append(f"{fname} line {n}: invalid JSON ({err.msg} at column "
                                  f"{err.colno})")
        items = []
        for where, rec in records:
            it = _parse_record(rec, where, root, errors, check_images)
            if it is not None:
                items.append(it)
        _raise(errors, file)
        if not items:
            raise DataError(f"{file}: no items")
        return cls(items, name=name, root=root)

    # ------------------------------------------------------------------ splits
    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def split(self, name: str) -> list[Item]:
        """The items of split ``name`` (``"pool"``, ``"train"`` or ``"eval"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [it for it in self.items if it.split == name]

    @property
    def pool(self) -> list[Item]:
        return self.split("pool")

    @property
    def train(self) -> list[Item]:
        return self.split("train")

    @property
    def eval(self) -> list[Item]:
        return self.split("eval")

    def counts(self) -> dict[str, int]:
        c = {s: 0 for s in SPLITS}
        c["unassigned"] = 0
        for it in self.items:
            c[it.split or "unassigned"] += 1
        return c

    def assign_splits(self, pool: float | int = 0.4, train: float | int = 0.4,
                      eval: float | int | None = None, seed: int = 0) -> TaskData:
        """Give a split to every item that has none (in place; returns self).

        Sizes are fractions (of the unassigned items) or counts; ``eval=None`` takes the rest.
        The assignment is a seeded shuffle, so it is reproducible.
        """
        free = [it for it in self.items if it.split is None]
        if not free:
            return self
        n = len(free)

        def count(x):
            return int(round(x * n)) if isinstance(x, float) else int(x)

        n_pool, n_train = count(pool), count(train)
        n_eval = n - n_pool - n_train if eval is None else count(eval)
        if min(n_pool, n_train, n_eval) < 0 or n_pool + n_train + n_eval > n:
            raise DataError(f"task {self.name!r}: cannot split {n} unassigned items into pool "
                            f"{n_pool}, train {n_train}, eval {n_eval}")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        for j, i in enumerate(order):
            free[i].split = ("pool" if j < n_pool else "train" if j < n_pool + n_train
                             else "eval" if j < n_pool + n_train + n_eval else None)
        return self

    def require_splits(self, *names: str) -> None:
        """Raise :class:`DataError` if one of the named splits is empty."""
        empty = [s for s in names if not self.split(s)]
        if empty:
            raise DataError(f"task {self.name!r}: split(s) {', '.join(empty)} are empty "
                            f"(counts: {self.counts()}); give items a 'split' field or call "
                            "assign_splits()")

    # ------------------------------------------------------------------ writing
    def save(self, directory: str | os.PathLike, image_dir: str = "images") -> str:
        """Write the on-disk format (``data.jsonl`` + images as PNG, and the task name in
        ``task.json``); returns the JSONL path.

        Path images inside ``directory`` are referenced in place; others are copied as PNG.
        """
        directory = os.fspath(directory)
        os.makedirs(os.path.join(directory, image_dir), exist_ok=True)
        lines = []
        for it in self.items:
            if isinstance(it.image, (str, os.PathLike)):
                src = os.path.abspath(os.fspath(it.image))
                if src.startswith(os.path.abspath(directory) + os.sep):
                    rel = os.path.relpath(src, directory)
                else:
                    rel = os.path.join(image_dir, f"{_safe(it.id)}{os.path.splitext(src)[1]}")
                    with open(src, "rb") as fi, open(os.path.join(directory, rel), "wb") as fo:
                        fo.write(fi.read())
            else:
                rel = os.path.join(image_dir, f"{_safe(it.id)}.png")
                it.image.save(os.path.join(directory, rel), format="PNG")
            rec = {"id": it.id, "image": rel.replace(os.sep, "/"), "question": it.question,
                   "answer": it.answer}
            if it.split:
                rec["split"] = it.split
            rec.update(it.extra)
            lines.append(json.dumps(rec, ensure_ascii=False))
        out = os.path.join(directory, DATA_FILE)
        with open(out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        info = dict(task_info(directory), name=self.name)
        with open(os.path.join(directory, "task.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        return out

    def __repr__(self) -> str:
        return f"TaskData({self.name!r}, {len(self)} items, {self.counts()})"


def _safe(s: str | None) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))


def load_task(data, name: str | None = None, check_images: bool = True) -> TaskData:
    """A :class:`TaskData` from a directory / JSONL path, an existing TaskData, or an iterable
    of items."""
    if isinstance(data, TaskData):
        return data
    if isinstance(data, (str, os.PathLike)):
        return TaskData.from_dir(data, name=name, check_images=check_images)
    return TaskData.from_items(data, name=name or "task", check_images=check_images)


def task_info(directory: str | os.PathLike) -> dict:
    """The optional ``task.json`` next to ``data.jsonl`` (name, default model, ...), or {}."""
    p = os.path.join(os.fspath(directory), "task.json")
    if os.path.isdir(os.fspath(directory)) and os.path.exists(p):
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    return {}
