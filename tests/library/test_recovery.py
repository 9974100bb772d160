"""A damaged index (issue 16): a clear error naming the fix, never a raw ``sqlite3`` error, and
a rebuild from the stored files that loses nothing the files hold."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
import torch

from m2iv.cli import main
from m2iv.library import LibraryError, LibraryIndexError, VLibrary
from m2iv.vectors import M2IV

from .test_library import D, vec

PAGE = 4096


def _fill(root) -> list[dict]:
    """A library with versions, a removed version, tags, metrics, extra and embeddings; the
    entries as dicts (embedding included, row ids left out)."""
    with VLibrary(root) as lib:
        for i in range(9):
            emb = np.random.default_rng(i).standard_normal(D).astype(np.float32)
            lib.add(vec(i, task=f"task{i % 3}"), f"n{i % 3}", tags=["t", f"t{i}"],
                    embedding=emb if i % 2 else None, metrics={"loss": i / 7},
                    extra={"seed": i}, description=f"entry {i}", shots=i, pool_size=10 * i)
        lib.add(M2IV.stack([vec(20), vec(21)]), "bank", tags=["bank"])
        lib.remove("n1:2")
        return _entries(lib)


def _entries(lib) -> list[dict]:
    out = []
    for e in lib.list(embeddings=True):
        d = e.to_dict(embedding=True)
        d.pop("id")
        out.append(d)
    return out


def _damage_page(root, page: int) -> None:
    idx = os.path.join(root, "index.sqlite")
    with open(idx, "r+b") as f:
        f.seek(page * PAGE)
        f.write(np.random.default_rng(page).integers(0, 256, PAGE, dtype=np.uint8).tobytes())


def _files(root) -> dict[str, bytes]:
    d = os.path.join(root, "vectors")
    return {fn: open(os.path.join(d, fn), "rb").read() for fn in sorted(os.listdir(d))}


def test_corrupt_index_is_a_clear_error_and_a_rebuild_restores_every_entry(tmp_path):
    root = str(tmp_path / "lib")
    before, stored = _fill(root), None
    stored = _files(root)
    damaged = None
    for page in range(1, 12):  # find a page whose damage SQLite notices on `list`
        trial = str(tmp_path / f"trial{page}")
        shutil.copytree(root, trial)
        _damage_page(trial, page)
        try:
            with VLibrary(trial, create=False) as lib:
                lib.list()
        except LibraryIndexError as err:
            damaged = trial
            assert "corrupt" in str(err) and "--rebuild-index" in str(err)
            assert not isinstance(err, sqlite3.Error)
            break
    assert damaged is not None

    rep = VLibrary.rebuild_index(damaged)
    assert rep.damage and rep.old_index.startswith("quarantine/")
    assert os.path.exists(os.path.join(damaged, rep.old_index))  # kept, never deleted
    assert sorted(rep.restored) == sorted(e["ref"] for e in before)
    assert not rep.recovered and not rep.renumbered and not rep.quarantined
    with VLibrary(damaged, create=False) as lib:
        assert _entries(lib) == before  # names, versions, tags, metrics, embeddings, times
        assert lib.verify().clean
        assert torch.equal(lib.get("n0:1").mlp, vec(0).mlp)
        assert lib.add(vec(30), "n1").version == 4  # numbers are never reused
    assert {k: v for k, v in _files(damaged).items() if k in stored} == stored


def test_truncated_index_is_a_clear_error_and_is_rebuilt(tmp_path):
    root = str(tmp_path / "lib")
    before = _fill(root)
    idx = os.path.join(root, "index.sqlite")
    with open(idx, "r+b") as f:
        f.truncate(os.path.getsize(idx) // 3)
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        if os.path.exists(os.path.join(root, name)):
            os.unlink(os.path.join(root, name))
    with pytest.raises(LibraryIndexError, match="not a usable SQLite index.*corrupt or "
                       "truncated.*m2iv library verify --rebuild-index"):
        VLibrary(root, create=False)
    code = main(["library", "verify", "--rebuild-index", "--root", root])
    assert code == 0
    with VLibrary(root, create=False) as lib:
        assert _entries(lib) == before


def test_lost_index_is_refused_not_replaced_and_rebuilt(tmp_path):
    """Opening a library whose index is gone must not make an empty one (every file would
    then be an 'orphan' that verify(repair=True) deletes)."""
    root = str(tmp_path / "lib")
    before = _fill(root)
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        if os.path.exists(os.path.join(root, name)):
            os.unlink(os.path.join(root, name))
    with pytest.raises(LibraryIndexError, match="9 stored vector file.*but no index"):
        VLibrary(root)
    assert not os.path.exists(os.path.join(root, "index.sqlite"))
    rep = VLibrary.rebuild_index(root)
    assert rep.damage == "missing" and rep.old_index is None
    with VLibrary(root, create=False) as lib:
        assert _entries(lib) == before


def test_healthy_index_is_rebuilt_only_when_forced(tmp_path, capsys):
    root = str(tmp_path / "lib")
    _fill(root)
    with VLibrary(root) as lib:
        lib.update("n0:1", add_tags=["edited"])  # lives in the index only
        before = _entries(lib)
    with pytest.raises(LibraryError, match="healthy.*force=True"):
        VLibrary.rebuild_index(root)
    assert main(["library", "verify", "--rebuild-index", "--root", root]) == 1
    assert "Pass --force" in capsys.readouterr().err  # the flag, not the keyword
    rep = VLibrary.rebuild_index(root, force=True)
    assert rep.damage is None
    with VLibrary(root, create=False) as lib:
        after = _entries(lib)
    n0 = [e["ref"] for e in before].index("n0:1")
    assert before[n0]["tags"] == ["edited", "t", "t0"] and after[n0]["tags"] == ["t", "t0"]
    assert [e["ref"] for e in after] == [e["ref"] for e in before]


def test_rebuild_recovers_old_files_renumbers_conflicts_quarantines_corrupt(tmp_path):
    from safetensors.torch import save_file

    root = str(tmp_path / "lib")
    with VLibrary(root) as lib:
        lib.add(vec(0, task="vqa"), "vqa")
        keep = lib.add(vec(1, task="vqa"), "vqa")
        dup = lib.path_of("vqa:2")
        bad = lib.add(vec(2), "other")
        bad_path = lib.path_of(bad.ref)
    vectors = os.path.join(root, "vectors")
    # a file stored before records existed (no meta['library'], no checksum)
    old = vec(3, task="caption")
    save_file({k: t.contiguous() for k, t in old.tensors().items()},
              os.path.join(vectors, "a" * 32 + ".safetensors"),
              metadata={"m2iv": json.dumps(dict(old.meta, layers=list(old.layers)))})
    # an older file claiming vqa:2 too (the leftover of an add that crashed before its commit)
    claim = M2IV.load(dup)
    claim.meta["library"]["created_at"] -= 100
    claim.save(os.path.join(vectors, "b" * 32 + ".safetensors"))
    # a stored file with a flipped byte
    raw = bytearray(open(bad_path, "rb").read())
    raw[-2] ^= 1
    open(bad_path, "wb").write(bytes(raw))

    rep = VLibrary.rebuild_index(root, force=True)
    assert sorted(rep.restored) == ["vqa:1", "vqa:2"]
    assert rep.recovered == [{"file": f"vectors/{'a' * 32}.safetensors", "ref": "caption:1"}]
    assert rep.renumbered == [{"file": f"vectors/{'b' * 32}.safetensors", "claimed": "vqa:2",
                               "ref": "vqa:3"}]
    assert [q["file"] for q in rep.quarantined] == [bad.file]
    assert "checksum mismatch" in rep.quarantined[0]["reason"]
    assert os.path.exists(os.path.join(root, rep.quarantined[0]["moved"]))
    assert "recovered as caption:1" in str(rep) and "renumbered" in str(rep)
    with VLibrary(root, create=False) as lib:
        assert lib.entry("vqa:2").sha256 == keep.sha256  # the newer claim keeps the version
        assert lib.entry("caption").tags == ("recovered",)
        assert torch.equal(lib.get("caption").mlp, old.mlp)
        assert "other" not in lib and lib.verify().clean


def test_rm_of_a_missing_entry_says_so(tmp_path, capsys):
    root = str(tmp_path / "lib")
    with VLibrary(root) as lib:
        lib.add(vec(0), "a")
        lib.add(vec(1), "a")
    assert main(["library", "rm", "ghost", "--root", root]) == 1
    assert "no entry named 'ghost'" in capsys.readouterr().err
    assert main(["library", "rm", "a", "--root", root]) == 1
    err = capsys.readouterr().err
    assert "versions [1, 2]" in err and "--all" in err and "all_versions" not in err
    with VLibrary(root) as lib:
        assert [e.ref for e in lib.list()] == ["a:1", "a:2"]
