"""The library's records and argument rules: :class:`Entry` (one index row),
:class:`SearchResult`, :class:`VerifyReport`, entry references (``name[:version]``), names,
tags and task embeddings."""
from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from ..errors import VectorsFormatError
from ..vectors import M2IV
from .errors import LibraryError
from ..families.fit import ModelSpec

__all__ = ["Entry", "SearchResult", "VerifyReport", "RebuildReport", "parse_ref",
           "default_library_path", "as_embedding", "check_name", "check_tags", "opt_int",
           "to_json", "new_entry", "file_record", "from_file_record"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_TAG_MAX = 64


def default_library_path() -> str:
    """``$M2IV_LIBRARY``, else ``$XDG_DATA_HOME/m2iv/library`` (``~/.local/share/...``)."""
    env = os.environ.get("M2IV_LIBRARY")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(base, "m2iv", "library")


def parse_ref(ref: str, version: int | str | None = None) -> tuple[str, int | None]:
    """``"name"`` / ``"name:3"`` / ``"name:latest"`` -> ``(name, version or None)``."""
    if not isinstance(ref, str) or not ref:
        raise LibraryError(f"an entry is named by a non-empty string, got {ref!r}")
    name, sep, ver = ref.rpartition(":")
    if not sep:
        name, ver = ref, None
    elif version is not None:
        raise LibraryError(f"{ref!r} already names a version; do not pass version= too")
    else:
        version = ver
    if version is None or version == "latest":
        return name, None
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise LibraryError(f"bad version {version!r} in {ref!r}: expected a positive integer or "
                           "'latest'") from None
    if v < 1:
        raise LibraryError(f"bad version {v} for {name!r}: versions start at 1")
    return name, v


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise LibraryError(f"invalid entry name {name!r}: use 1-128 characters from letters, "
                           "digits and . _ + - (starting with a letter or digit)")
    return name


def check_tags(tags: Iterable[str] | str | None) -> tuple[str, ...]:
    if tags is None:
        return ()
    if isinstance(tags, str):
        tags = [tags]
    out = []
    for t in tags:
        if not isinstance(t, str) or not t.strip() or len(t) > _TAG_MAX or "," in t or \
                t != t.strip() or any(ord(c) < 32 for c in t):
            raise LibraryError(f"invalid tag {t!r}: tags are 1-{_TAG_MAX} printable characters, "
                               "no commas, no leading/trailing spaces")
        if t not in out:
            out.append(t)
    return tuple(sorted(out))


def opt_int(value, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise LibraryError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def to_json(value, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise LibraryError(f"{what} must be JSON-serialisable without NaN/inf: {err}") from None


def as_embedding(embedding) -> np.ndarray:
    """A task embedding as a 1-D little-endian float32 array (finite, not all zero)."""
    if isinstance(embedding, torch.Tensor):
        embedding = embedding.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(embedding, dtype=np.float32)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1 or arr.size == 0:
        raise LibraryError(f"a task embedding is a 1-D vector, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise LibraryError("the task embedding holds NaN or inf")
    if not np.any(arr):
        raise LibraryError("the task embedding is all zeros (cosine similarity is undefined)")
    return arr.astype("<f4", copy=False)


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Entry:
    """One stored vector set (an index row). ``ref`` is ``"name:version"``."""

    id: int
    name: str
    version: int
    file: str
    sha256: str
    size: int
    model_type: str | None
    model_types: tuple[str, ...]
    model_name: str | None
    hidden_size: int | None
    num_layers: int | None
    num_heads: int | None
    head_dim: int | None
    layers: tuple[int, ...]
    n_bank: int | None
    task: str | None
    description: str
    tags: tuple[str, ...]
    shots: int | None
    pool_size: int | None
    metrics: dict
    extra: dict
    created_at: float
    embedding_dim: int | None
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def __repr__(self) -> str:
        model = self.model_type or "?"
        shape = f"L={len(self.layers)}/{self.num_layers or '?'} H={self.num_heads} " \
                f"Dh={self.head_dim} D={self.hidden_size}"
        bank = f", bank={self.n_bank}" if self.n_bank else ""
        return (f"Entry({self.ref}, model={model}, {shape}{bank}, task={self.task!r}, "
                f"tags={list(self.tags)}, sha256={self.sha256[:12]}..)")

    @property
    def created(self) -> str:
        """Creation time, ISO 8601 in UTC."""
        return _dt.datetime.fromtimestamp(self.created_at, _dt.timezone.utc).isoformat(
            timespec="seconds")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model_type=self.model_type, hidden_size=self.hidden_size,
                         num_heads=self.num_heads, head_dim=self.head_dim,
                         num_layers=self.num_layers, model_name=self.model_name,
                         model_types=frozenset(self.model_types), layers=self.layers)

    def to_dict(self, embedding: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "embedding"}
        d.update(ref=self.ref, created=self.created, tags=list(self.tags),
                 layers=list(self.layers), model_types=list(self.model_types))
        if embedding:
            d["embedding"] = None if self.embedding is None else self.embedding.tolist()
        return d


@dataclass(frozen=True)
class SearchResult:
    entry: Entry
    score: float  # cosine similarity in [-1, 1]

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.entry.ref, "score": self.score, "entry": self.entry.to_dict()}


@dataclass
class VerifyReport:
    """What :meth:`VLibrary.verify` found (and, with ``repair=True``, did).

    Problems: ``missing`` (a row whose file is gone), ``corrupt`` (size or sha256 differ from
    the index), ``unsafe`` (a row whose file name is not a generated library name, or a
    symbolic link), ``orphaned`` (a stored file no row names: an add that crashed before its
    commit, or a remove that crashed before its unlink), ``stale_temp`` (staging leftovers of a
    dead process), ``unexpected`` (foreign files in ``vectors/``), ``index_errors`` (SQLite's
    integrity check). ``in_progress`` lists staging directories of live adds (not problems).
    """

    root: str
    checked: int = 0
    ok: int = 0
    missing: list[dict] = field(default_factory=list)
    corrupt: list[dict] = field(default_factory=list)
    unsafe: list[dict] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    stale_temp: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    index_errors: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    repair: bool = False

    @property
    def problems(self) -> int:
        return (len(self.missing) + len(self.corrupt) + len(self.unsafe) + len(self.orphaned)
                + len(self.stale_temp) + len(self.unexpected) + len(self.index_errors))

    @property
    def clean(self) -> bool:
        """No problem found."""
        return self.problems == 0

    @property
    def healthy(self) -> bool:
        """Clean, or every problem found was repaired."""
        return self.clean or (self.repair and not self.unrepaired)

    def to_dict(self) -> dict[str, Any]:
        keys = ("root", "checked", "ok", "missing", "corrupt", "unsafe", "orphaned",
                "stale_temp", "unexpected", "index_errors", "in_progress", "repaired",
                "unrepaired", "repair")
        d = {k: getattr(self, k) for k in keys}
        d.update(problems=self.problems, clean=self.clean, healthy=self.healthy)
        return d

    def __str__(self) -> str:
        lines = [f"{self.root}: {self.checked} entries checked, {self.ok} ok, "
                 f"{self.problems} problem(s)"]
        for what in ("missing", "corrupt", "unsafe"):
            for item in getattr(self, what):
                lines.append(f"  {what}: {item['ref']} ({item['file']})"
                             + (f": {item['reason']}" if item.get("reason") else ""))
        for what in ("orphaned", "stale_temp", "unexpected", "index_errors", "in_progress"):
            for item in getattr(self, what):
                lines.append(f"  {what}: {item}")
        for item in self.repaired:
            lines.append(f"  repaired: {item}")
        for item in self.unrepaired:
            lines.append(f"  NOT repaired: {item}")
        return "\n".join(lines)

@dataclass
class RebuildReport:
    """What :meth:`VLibrary.rebuild_index` did.

    ``restored``: refs rebuilt exactly from the files' own records; ``recovered``: files
    stored before records existed, re-entered under a new name (their meta's task, else
    ``recovered``) and tagged ``recovered``; ``renumbered``: files claiming a name and version
    another file also claims (e.g. the leftover of an add that crashed before its commit),
    kept under the next free version; ``quarantined``: files that fail to load (checksum
    mismatch, corrupt), moved to ``quarantine/``; ``old_index``: where the previous index went.
    """

    root: str
    old_index: str | None = None
    damage: str | None = None
    restored: list[str] = field(default_factory=list)
    recovered: list[dict] = field(default_factory=list)
    renumbered: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __str__(self) -> str:
        n = len(self.restored) + len(self.recovered) + len(self.renumbered)
        lines = [f"{self.root}: index rebuilt from {n} stored file(s)"
                 + (f" (the old index: {self.damage})" if self.damage else "")]
        if self.old_index:
            lines.append(f"  the old index was moved to {self.old_index}")
        for ref in self.restored:
            lines.append(f"  restored: {ref}")
        for item in self.recovered:
            lines.append(f"  recovered as {item['ref']}: {item['file']} (stored without a "
                         "record: tags, metrics and embedding unknown)")
        for item in self.renumbered:
            lines.append(f"  renumbered: {item['file']} claimed {item['claimed']}, now "
                         f"{item['ref']}")
        for item in self.quarantined:
            lines.append(f"  quarantined: {item['file']} -> {item['moved']}: {item['reason']}")
        return "\n".join(lines)


def file_record(row: dict[str, Any], tags: Iterable[str]) -> dict[str, Any]:
    """What a stored file keeps of its index row (in ``meta['library']``) beyond its own
    metadata, so that the index can be rebuilt from the files alone."""
    emb = row.get("embedding")
    return {"name": row["name"], "version": row["version"], "tags": list(tags),
            "metrics": json.loads(row["metrics"]), "extra": json.loads(row["extra"]),
            "model_types": json.loads(row["model_types"]), "created_at": row["created_at"],
            "embedding": None if emb is None else base64.b64encode(emb).decode("ascii")}


def from_file_record(v: M2IV, name: str, record: Mapping[str, Any] | None,
                     ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The index row (all columns but id, version, file, sha256, size and created_at) and tags
    of a stored file: its metadata plus its record (:func:`file_record`; ``None`` for files
    stored before records existed)."""
    rec = dict(record or {})
    emb = rec.get("embedding")
    _, row, tags = new_entry(
        v, name, tags=rec.get("tags"), metrics=rec.get("metrics"), extra=rec.get("extra"),
        embedding=None if emb is None else np.frombuffer(base64.b64decode(emb), dtype="<f4"))
    if rec.get("model_types") is not None:
        row["model_types"] = json.dumps(sorted(rec["model_types"]))
    return row, tags


def new_entry(vectors: M2IV, name: str, *, tags=None, task=None, description=None, shots=None,
              pool_size=None, metrics=None, embedding=None, model=None, model_name=None,
              extra=None) -> tuple[M2IV, dict[str, Any], tuple[str, ...]]:
    """Check the arguments of :meth:`VLibrary.add` and build what it stores: the vectors with
    their final ``meta``, the index row (all columns but id, version, file, sha256, size and
    created_at) and the tags."""
    if not isinstance(vectors, M2IV):
        raise LibraryError(f"add() stores an M2IV, got {type(vectors).__name__}")
    name = check_name(name)
    tag_list = check_tags(tags)
    shots = opt_int(vectors.meta.get("shots") if shots is None else shots, "shots")
    pool_size = opt_int(vectors.meta.get("pool_size") if pool_size is None else pool_size,
                         "pool_size")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise LibraryError("metrics must be a mapping (a JSON object)")
    metrics_json = to_json(dict(metrics or {}), "metrics")
    if extra is not None and not isinstance(extra, Mapping):
        raise LibraryError("extra must be a mapping (a JSON object)")
    extra_json = to_json(dict(extra or {}), "extra")
    emb = None if embedding is None else as_embedding(embedding)
    task = vectors.meta.get("task") if task is None else task
    description = vectors.meta.get("description") or "" if description is None else description
    if task is not None and not isinstance(task, str):
        raise LibraryError(f"task must be a string, got {task!r}")
    if not isinstance(description, str):
        raise LibraryError(f"description must be a string, got {description!r}")

    meta = dict(vectors.meta)
    meta.pop("library", None)
    spec = ModelSpec.from_vectors(vectors)
    types = set(spec.types())
    if model is not None:
        mspec = ModelSpec.of(model)
        if isinstance(model, torch.nn.Module):
            vectors.check_model(model)
        if meta.get("model_type") is None:
            meta["model_type"] = mspec.model_type
        if meta.get("num_layers") is None and mspec.num_layers is not None:
            meta["num_layers"] = mspec.num_layers
        model_name = model_name or mspec.model_name
        types |= mspec.types()
    model_name = model_name or meta.get("model_name")
    if model_name is not None:
        meta["model_name"] = str(model_name)
    meta.update(task=task, description=description, shots=shots)
    if pool_size is not None:
        meta["pool_size"] = pool_size
    try:
        to_store = M2IV(vectors.mha, vectors.mha_gates, vectors.mlp, vectors.mlp_gates,
                        vectors.layers, meta, check_finite=True)
    except VectorsFormatError as err:
        raise VectorsFormatError(f"cannot add {name!r}: {err}") from None
    types.discard(None)
    if meta.get("model_type"):
        types.add(meta["model_type"])
    row = dict(name=name, model_type=meta.get("model_type"),
               model_types=json.dumps(sorted(types)), model_name=meta.get("model_name"),
               hidden_size=to_store.hidden_size, num_layers=meta.get("num_layers"),
               num_heads=to_store.num_heads, head_dim=to_store.head_dim,
               layers=json.dumps(list(to_store.layers)), n_bank=to_store.n_bank, task=task,
               description=description, shots=shots, pool_size=pool_size,
               metrics=metrics_json, extra=extra_json,
               embedding=None if emb is None else emb.tobytes(),
               embedding_dim=None if emb is None else int(emb.size))
    return to_store, row, tag_list
