"""VLibrary: storage, retrieval, composition, durability, safety, GGUF interop, task embeddings."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import sqlite3
import time
import warnings

import numpy as np
import pytest
import torch

from m2iv.errors import IncompatibleVectorsError, VectorsFormatError, VectorsMismatchError
from m2iv.library import (ControlVectorFormatError, EntryNotFoundError, LibraryError,
                          LibraryIntegrityError, ModelSpec, UnsafePathError, VLibrary, files,
                          index)
from m2iv.library import gguf_io
from m2iv.task_embedding import embed_examples, embed_task
from m2iv.vectors import M2IV

D, H, DH, NL = 32, 4, 8, 2


def vec(seed: int = 0, layers=(0, 1), d: int = D, h: int = H, dh: int = DH,
        model_type: str | None = "llama", num_layers: int | None = NL, **meta) -> M2IV:
    g = torch.Generator().manual_seed(seed)
    L = len(layers)
    return M2IV(torch.randn(L, h, dh, generator=g), torch.rand(L, h, generator=g) + 0.5,
                torch.randn(L, d, generator=g), torch.rand(L, generator=g) + 0.5, layers,
                {"model_type": model_type, "num_layers": num_layers, **meta})


def effect(v: M2IV):
    return v.mha_gates[..., None] * v.mha, v.mlp_gates[..., None] * v.mlp


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, vocab_size=100))
    return model.eval()


@pytest.fixture
def lib(tmp_path):
    with VLibrary(tmp_path / "lib") as library:
        yield library


def _ctx():
    """Child processes for the concurrency/crash tests: a forkserver (imports once, forks clean
    children that never inherit torch's thread pools) where there is one, spawn elsewhere."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["m2iv.library", "tests.test_library"])
        return ctx
    return mp.get_context("spawn")


def _run_child(target, *args, timeout: float = 120) -> int:
    p = _ctx().Process(target=target, args=args)
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"child {target.__name__} hung")
    return p.exitcode


# ---------------------------------------------------------------------------- round trips


def test_add_get_roundtrip_and_entry_fields(lib):
    v = vec(1, task="vqa", shots=16)
    emb = torch.randn(D)
    e = lib.add(v, "vqa", tags=["vqa", "qa"], description="VQA vectors", pool_size=512,
                metrics={"loss": 0.25, "acc": [0.5, 0.75]}, embedding=emb,
                model_name="tiny/llama", extra={"seed": 3})
    assert (e.name, e.version, e.ref) == ("vqa", 1, "vqa:1")
    assert (e.model_type, e.model_name, e.hidden_size, e.num_heads, e.head_dim, e.num_layers) \
        == ("llama", "tiny/llama", D, H, DH, NL)
    assert e.layers == (0, 1) and e.n_bank is None
    assert (e.task, e.shots, e.pool_size, e.description) == ("vqa", 16, 512, "VQA vectors")
    assert e.tags == ("qa", "vqa") and e.metrics == {"loss": 0.25, "acc": [0.5, 0.75]}
    assert e.extra == {"seed": 3} and abs(e.created_at - time.time()) < 60
    assert e.embedding_dim == D and np.array_equal(e.embedding, emb.numpy())
    path = lib.path_of("vqa")
    assert path.startswith(lib.root + os.sep)
    with open(path, "rb") as f:
        data = f.read()
    assert e.sha256 == hashlib.sha256(data).hexdigest() and e.size == len(data)

    w = lib.get("vqa")
    for name in ("mha", "mha_gates", "mlp", "mlp_gates"):
        assert torch.equal(getattr(w, name), getattr(v, name)), name
    assert w.layers == v.layers
    assert w.meta["task"] == "vqa" and w.meta["pool_size"] == 512
    assert w.meta["library"] == {"name": "vqa", "version": 1, "sha256": e.sha256}
    # the stored file is a plain M2IV file
    assert torch.equal(M2IV.load(path).mlp, v.mlp)
    # reopening sees the same thing
    with VLibrary(lib.root, create=False) as again:
        assert again.entry("vqa:1") == e
    d = e.to_dict()
    assert d["ref"] == "vqa:1" and d["tags"] == ["qa", "vqa"] and "embedding" not in d


def test_bank_roundtrip(lib):
    bank = M2IV.stack([vec(1), vec(2)])
    e = lib.add(bank, "bank")
    assert e.n_bank == 2
    got = lib.get("bank")
    assert got.is_bank and torch.equal(got.mlp, bank.mlp)


def test_versions_latest_and_never_reused(lib):
    for i in range(3):
        lib.add(vec(i), "t")
    assert [e.version for e in lib.list(name="t")] == [1, 2, 3]
    assert lib.entry("t").version == 3 and lib.entry("t:latest").version == 3
    assert torch.equal(lib.get("t", 2).mlp, vec(1).mlp)
    assert torch.equal(lib.get("t:1").mlp, vec(0).mlp)
    lib.remove("t:3")
    assert lib.entry("t").version == 2
    assert lib.add(vec(9), "t").version == 4  # 3 is never handed out again
    with pytest.raises(EntryNotFoundError, match=r"'t' has no version 3 \(versions: \[1, 2, 4\]\)"):
        lib.get("t:3")
    with pytest.raises(EntryNotFoundError, match="no entry named 'nope'"):
        lib.entry("nope")
    with pytest.raises(LibraryError, match="all_versions"):
        lib.remove("t")
    assert len(lib.remove("t", all_versions=True)) == 3 and len(lib) == 0
    assert "t" not in lib


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x:1", " a", "a" * 200, ".hidden"])
def test_bad_names_refused(lib, bad):
    with pytest.raises(LibraryError):
        lib.add(vec(), bad)


def test_bad_arguments_refused(lib):
    with pytest.raises(LibraryError, match="tag"):
        lib.add(vec(), "a", tags=["a,b"])
    with pytest.raises(LibraryError, match="NaN"):
        lib.add(vec(), "a", metrics={"loss": float("nan")})
    with pytest.raises(LibraryError, match="all zeros"):
        lib.add(vec(), "a", embedding=torch.zeros(D))
    with pytest.raises(LibraryError, match="1-D"):
        lib.add(vec(), "a", embedding=torch.zeros(2, 3))
    with pytest.raises(LibraryError, match="M2IV"):
        lib.add({"mlp": 1}, "a")
    assert len(lib) == 0 and os.listdir(os.path.join(lib.root, "vectors")) == []


def test_update(lib):
    lib.add(vec(), "a", tags=["x"])
    e = lib.update("a", add_tags=["y"], remove_tags=["x"], task="caption",
                   embedding=torch.ones(D))
    assert e.tags == ("y",) and e.task == "caption" and e.embedding_dim == D
    assert lib.get("a").meta["task"] == "caption"  # the index wins over the file's meta


# ---------------------------------------------------------------------------- retrieval


def test_list_filters(lib, tiny_llama):
    lib.add(vec(1, task="vqa"), "vqa", tags=["vqa", "en"])
    lib.add(vec(2, task="vqa"), "vqa", tags=["vqa"])
    lib.add(vec(3, task="caption"), "cap", tags=["en"])
    lib.add(vec(4, d=64, h=8, dh=8, model_type="llama"), "wide", tags=["en"])
    lib.add(vec(5, model_type="mistral"), "mis", tags=["en"])
    lib.add(vec(6, layers=(1,)), "one_layer")

    def refs(**kw):
        return [e.ref for e in lib.list(**kw)]

    assert refs(tags=["en"]) == ["cap:1", "mis:1", "vqa:1", "wide:1"]
    assert refs(tags=["en", "vqa"]) == ["vqa:1"]
    assert refs(task="vqa") == ["vqa:1", "vqa:2"]
    assert refs(task="vqa", latest_only=True) == ["vqa:2"]
    assert refs(model_type="mistral") == ["mis:1"]
    assert refs(hidden_size=64) == ["wide:1"]
    # compatible with the tiny llama: right shapes and model type; subsets of layers fit
    assert refs(compatible_with=tiny_llama) == ["cap:1", "one_layer:1", "vqa:1", "vqa:2"]
    # compatible with vectors: could be combined with them (same layers, shapes, model)
    assert refs(compatible_with=vec(0)) == ["cap:1", "vqa:1", "vqa:2"]
    assert refs(compatible_with=lib.entry("one_layer")) == ["one_layer:1"]


def _unit(i, n=D):
    x = torch.zeros(n)
    x[i] = 1.0
    return x


def test_search_ranking_on_constructed_embeddings(lib):
    q = _unit(0)
    # cosines with q: a=1.0, b=cos(30deg), c=cos(60deg), d=0, e=-1
    lib.add(vec(1), "c", embedding=0.5 * _unit(0) + (3 ** 0.5 / 2) * _unit(1))
    lib.add(vec(2), "a", embedding=3.0 * _unit(0))  # the norm does not matter
    lib.add(vec(3), "e", embedding=-_unit(0))
    lib.add(vec(4), "b", embedding=(3 ** 0.5 / 2) * _unit(0) + 0.5 * _unit(2))
    lib.add(vec(5), "d", embedding=_unit(5))
    lib.add(vec(6), "noemb")
    lib.add(vec(7, d=64, h=8), "wide", embedding=torch.cat([q, q]))  # other model and size
    lib.add(vec(8, model_type="mistral"), "other_model", embedding=q)  # same dims, other type

    hits = lib.search(q, k=3, compatible_with=vec(0))
    assert [h.entry.name for h in hits] == ["a", "b", "c"]
    assert [round(h.score, 5) for h in hits] == [1.0, round(3 ** 0.5 / 2, 5), 0.5]
    everything = lib.search(q, k=10, compatible_with=vec(0))
    assert [h.entry.name for h in everything] == ["a", "b", "c", "d", "e"]
    assert everything[-1].score == pytest.approx(-1.0)
    # incompatible entries are never ranked unless asked explicitly
    with pytest.raises(LibraryError, match="compatible_with"):
        lib.search(q)
    anyone = lib.search(q, k=10, allow_incompatible=True)
    assert {h.entry.name for h in anyone} == {"a", "b", "c", "d", "e", "other_model"}
    # filters and versions
    lib.add(vec(9), "a", embedding=_unit(3))  # a:2 points elsewhere
    assert lib.search(q, k=1, compatible_with=vec(0))[0].entry.name == "b"
    top = lib.search(q, k=1, compatible_with=vec(0), latest_only=False)[0]
    assert top.entry.ref == "a:1"
    with pytest.raises(LibraryError, match="all zeros"):
        lib.search(torch.zeros(D), compatible_with=vec(0))


def test_search_examples_with_model_embeddings(lib, tiny_llama):
    task_a = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [3, 4, 5, 6, 7]]
    task_b = [[60, 61, 62], [70, 71, 72, 73], [80, 81]]
    spec = ModelSpec.of(tiny_llama)
    va = M2IV.zeros_like(tiny_llama)
    lib.add(va, "task_a", embedding=embed_task(tiny_llama, task_a), model=tiny_llama)
    lib.add(va, "task_b", embedding=embed_task(tiny_llama, task_b), model=tiny_llama)
    hits = lib.search_examples(tiny_llama, task_a[:2], k=2)
    assert hits[0].entry.name == "task_a" and hits[0].score > hits[1].score
    assert lib.entry("task_a").model_types == tuple(sorted(spec.types()))


# ---------------------------------------------------------------------------- combining


def test_compose_math(lib):
    a, b, c = vec(1), vec(2), vec(3)
    for name, v in (("a", a), ("b", b), ("c", c)):
        lib.add(v, name, task=name)
    out = lib.compose({"a": 1.0, "b:1": -0.5, "c": 2.0})
    mha = effect(a)[0] * 1.0 + effect(b)[0] * -0.5 + effect(c)[0] * 2.0
    mlp = effect(a)[1] * 1.0 + effect(b)[1] * -0.5 + effect(c)[1] * 2.0
    torch.testing.assert_close(effect(out)[0], mha)
    torch.testing.assert_close(effect(out)[1], mlp)
    assert [(m["ref"], m["weight"]) for m in out.meta["components"]] == \
        [("a:1", 1.0), ("b:1", -0.5), ("c:1", 2.0)]
    assert "library" not in out.meta
    assert out.meta["description"] == "compose: 1*a:1 + -0.5*b:1 + 2*c:1"
    # a single entry at weight w is that entry scaled
    torch.testing.assert_close(effect(lib.compose([("a", 0.25)]))[1], 0.25 * effect(a)[1])
    # the composition can be stored and comes back exactly
    e = lib.add(out, "mix")
    assert torch.equal(lib.get(e.ref).mlp, out.mlp)
    with pytest.raises(LibraryError, match="finite"):
        lib.compose({"a": float("inf")})


def test_compose_and_stack_refuse_incompatible(lib, tiny_llama):
    lib.add(vec(1), "a")
    lib.add(vec(2, layers=(1,)), "one_layer")
    lib.add(vec(3, model_type="mistral"), "mistral")
    lib.add(vec(4, d=64, h=8), "wide")
    lib.add(M2IV.stack([vec(5), vec(6)]), "bank")
    with pytest.raises(IncompatibleVectorsError,
                       match=r"cannot combine a:1 with one_layer:1: they cover different layers "
                             r"\(one_layer:1 \[1\], a:1 \[0, 1\]\)"):
        lib.compose({"a": 1, "one_layer": 1})
    with pytest.raises(IncompatibleVectorsError, match="model type 'mistral'"):
        lib.compose({"a": 1, "mistral": 1})
    with pytest.raises(IncompatibleVectorsError, match="hidden_size differs"):
        lib.stack(["a", "wide"])
    with pytest.raises(IncompatibleVectorsError, match="is a bank"):
        lib.compose({"bank": 1})
    with pytest.raises(VectorsMismatchError, match="wide:1 does not fit this model"):
        lib.compose({"wide": 1}, model=tiny_llama)


def test_stack_bank_serves_each_row(lib, tiny_llama):
    import m2iv

    a = M2IV.random_like(tiny_llama, seed=1)
    b = M2IV.random_like(tiny_llama, seed=2)
    lib.add(a, "a", task="A")
    lib.add(b, "b", task="B")
    bank = lib.stack(["b", "a"], model=tiny_llama)
    assert bank.is_bank and bank.n_bank == 2
    assert [r["library_ref"] for r in bank.meta["bank"]] == ["b:1", "a:1"]
    assert torch.equal(bank.mlp[0], b.mlp) and torch.equal(bank.mha[1], a.mha)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        with m2iv.steer(tiny_llama, bank, backend="torch") as handle:
            handle.select(torch.tensor([0, 1]))
            mixed = tiny_llama(ids).logits
        with m2iv.steer(tiny_llama, b, backend="torch"):
            only_b = tiny_llama(ids[:1]).logits
        with m2iv.steer(tiny_llama, a, backend="torch"):
            only_a = tiny_llama(ids[1:]).logits
    torch.testing.assert_close(mixed[0], only_b[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], only_a[0], rtol=1e-4, atol=1e-4)


def test_incompatible_model_refusal(lib, tiny_llama):
    lib.add(vec(1, d=64, h=8), "wide")
    lib.add(vec(2, model_type="mistral"), "mistral")  # same shapes, other model family
    lib.add(vec(3, num_layers=4, layers=(2, 3)), "deep")
    lib.add(vec(4), "ok")
    for ref, why in (("wide", "hidden_size differs"), ("mistral", "model type 'mistral'"),
                     ("deep", "deep:1 was made for a model with 4 decoder layers, the model "
                              "has 2")):
        with pytest.raises(VectorsMismatchError, match=why):
            lib.get(ref, model=tiny_llama)
        assert lib.get(ref, model=tiny_llama, allow_incompatible=True) is not None
    assert lib.get("ok", model=tiny_llama).hidden_size == D
    assert [e.name for e in lib.list(compatible_with=tiny_llama)] == ["ok"]


def test_add_checks_the_model(lib, tiny_llama):
    with pytest.raises(VectorsMismatchError):
        lib.add(vec(1, d=64, h=8, model_type=None, num_layers=None), "x", model=tiny_llama)
    e = lib.add(vec(2, model_type=None, num_layers=None), "y", model=tiny_llama)
    assert (e.model_type, e.num_layers) == ("llama", NL)


# ---------------------------------------------------------------------------- durability


def _add_many(root: str, worker: int, n: int) -> None:
    lib = VLibrary(root)
    for i in range(n):
        lib.add(vec(worker * 1000 + i), "shared", tags=[f"w{worker}"], metrics={"i": i})
        lib.add(vec(i), f"w{worker}")
    lib.close()


def test_concurrent_adds_lose_nothing(tmp_path):
    root = str(tmp_path / "lib")
    VLibrary(root).close()
    ctx = _ctx()
    procs = [ctx.Process(target=_add_many, args=(root, w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    lib = VLibrary(root)
    shared = lib.list(name="shared")
    assert sorted(e.version for e in shared) == list(range(1, 201))  # no gap, no duplicate
    for w in range(4):
        assert [e.version for e in lib.list(name=f"w{w}")] == list(range(1, 51))
        assert len(lib.list(name="shared", tags=[f"w{w}"])) == 50
    assert len(lib) == 400
    rep = lib.verify()
    assert rep.clean and rep.checked == 400 and rep.ok == 400, str(rep)
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_failed_commit_rolls_back_in_process(lib, monkeypatch):
    lib.add(vec(0), "keep")

    def boom(conn):
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(index, "commit", boom)
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        lib.add(vec(1), "lost")
    monkeypatch.undo()
    assert [e.ref for e in lib.list()] == ["keep:1"]
    assert len(os.listdir(os.path.join(lib.root, "vectors"))) == 1  # the rename was undone
    assert lib.verify().clean
    assert lib.add(vec(1), "lost").version == 1  # the failed add used no version


def _crash_at_commit(root: str) -> None:
    lib = VLibrary(root)
    index.commit = lambda conn: os._exit(17)  # die after rename + INSERT, before COMMIT
    lib.add(vec(1), "crashed")


def _crash_while_staging(root: str) -> None:
    lib = VLibrary(root)

    def half_save(self, path):
        with open(path, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
        os._exit(18)

    M2IV.save = half_save
    lib.add(vec(2), "crashed")


def _crash_in_remove(root: str, ref: str) -> None:
    lib = VLibrary(root)
    os.unlink = lambda *a, **k: os._exit(19)  # die after the COMMIT, before the unlink
    lib.remove(ref)


def test_write_lock_timeout_is_a_clear_error(tmp_path):
    root = tmp_path / "lib"
    VLibrary(root).close()
    other = sqlite3.connect(root / "index.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with VLibrary(root, timeout=0.2) as lib:
            with pytest.raises(LibraryError, match="write lock for more than 0.2 s"):
                lib.add(vec(0), "a")
            assert os.listdir(root / "vectors") == [] and os.listdir(root / "tmp") == []
    finally:
        other.execute("ROLLBACK")
        other.close()
    with VLibrary(root) as lib:
        assert lib.add(vec(0), "a").version == 1 and lib.verify().clean


def test_crash_between_file_write_and_commit(tmp_path, monkeypatch):
    root = str(tmp_path / "lib")
    with VLibrary(root) as lib:
        before = lib.add(vec(0), "keep")
    assert _run_child(_crash_at_commit, root) == 17
    lib = VLibrary(root)
    # old state: the index never saw the crashed add, the kept entry is intact
    assert [e.ref for e in lib.list()] == ["keep:1"] and lib.entry("keep") == before
    assert torch.equal(lib.get("keep").mlp, vec(0).mlp)
    rep = lib.verify()
    assert len(rep.orphaned) == 1 and rep.ok == 1 and not rep.clean
    assert "orphaned" in str(rep)
    rep = lib.verify(repair=True)
    assert rep.healthy and any("deleted orphaned" in r for r in rep.repaired)
    assert lib.verify().clean
    assert lib.add(vec(1), "crashed").version == 1


def test_crash_while_staging_leaves_only_stale_temp(tmp_path, monkeypatch):
    root = str(tmp_path / "lib")
    VLibrary(root).close()
    assert _run_child(_crash_while_staging, root) == 18
    lib = VLibrary(root)
    assert len(lib) == 0 and os.listdir(os.path.join(root, "vectors")) == []
    monkeypatch.setattr(files, "STAGE_GRACE_S", 1e9)
    assert len(lib.verify(repair=True).in_progress) == 1  # too young to judge: left alone
    monkeypatch.setattr(files, "STAGE_GRACE_S", 0.0)
    rep = lib.verify()
    assert len(rep.stale_temp) == 1 and not rep.clean
    assert lib.verify(repair=True).healthy
    assert lib.verify().clean and os.listdir(os.path.join(root, "tmp")) == []


def test_live_staging_is_never_reaped(lib, monkeypatch):
    fcntl = pytest.importorskip("fcntl")

    monkeypatch.setattr(files, "STAGE_GRACE_S", 0.0)
    d = os.path.join(lib.root, "tmp", "ab" * 16)
    os.mkdir(d)
    fd = os.open(os.path.join(d, "lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live add holds this
    try:
        rep = lib.verify(repair=True)
        assert rep.in_progress == [f"tmp/{'ab' * 16}"] and rep.clean and os.path.isdir(d)
    finally:
        os.close(fd)
    rep = lib.verify(repair=True)
    assert rep.stale_temp == [f"tmp/{'ab' * 16}"] and not os.path.exists(d)


def test_crash_in_remove_leaves_only_an_orphan(tmp_path):
    root = str(tmp_path / "lib")
    with VLibrary(root) as lib:
        lib.add(vec(0), "a")
        lib.add(vec(1), "b")
    assert _run_child(_crash_in_remove, root, "a:1") == 19
    lib = VLibrary(root)
    assert [e.ref for e in lib.list()] == ["b:1"]
    rep = lib.verify(repair=True)
    assert len(rep.orphaned) == 1 and rep.healthy
    assert lib.verify().clean


# ---------------------------------------------------------------------------- corruption, safety


def test_corrupt_stored_file_is_detected_and_repaired(lib):
    lib.add(vec(0), "good")
    e = lib.add(vec(1), "bad")
    path = lib.path_of("bad")
    with open(path, "r+b") as f:
        f.seek(e.size - 5)
        byte = f.read(1)
        f.seek(e.size - 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(LibraryIntegrityError, match=r"bad:1: .* is corrupt: sha256"):
        lib.get("bad")
    with pytest.raises(LibraryIntegrityError):
        lib.compose({"good": 1, "bad": 1})
    rep = lib.verify()
    assert [c["ref"] for c in rep.corrupt] == ["bad:1"] and rep.ok == 1
    rep = lib.verify(repair=True)
    assert rep.healthy and any("quarantine" in r for r in rep.repaired)
    assert [x.ref for x in lib.list()] == ["good:1"]
    assert len(os.listdir(os.path.join(lib.root, "quarantine"))) == 1
    assert lib.verify().clean


def test_truncated_and_missing_stored_files(lib):
    e = lib.add(vec(0), "trunc")
    lib.add(vec(1), "gone")
    with open(lib.path_of("trunc"), "r+b") as f:
        f.truncate(e.size // 2)
    os.unlink(lib.path_of("gone"))
    with pytest.raises(LibraryIntegrityError, match="corrupt"):
        lib.get("trunc")
    with pytest.raises(LibraryIntegrityError, match="gone:1: its file .* is missing"):
        lib.get("gone")
    rep = lib.verify()
    assert [m["ref"] for m in rep.missing] == ["gone:1"]
    assert rep.corrupt[0]["reason"].startswith("size")
    assert lib.verify(repair=True).healthy and len(lib) == 0 and lib.verify().clean


def test_foreign_files_rejected_without_unpickling(lib, tmp_path, monkeypatch):
    def no_unpickling(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    from safetensors.torch import save_file

    pt = tmp_path / "vectors.pt"
    with open(pt, "wb") as f:  # what torch.save writes: a zip holding a pickle
        torch.serialization.save({"mlp": torch.zeros(2)}, f)
    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"mlp": [0.0]}, protocol=4))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    good = tmp_path / "good.safetensors"
    vec(0).save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(good.read_bytes()[:40])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    gg = tmp_path / "cv.gguf"
    gguf_io.write_control_vector(gg, {1: np.ones(D, np.float32)})

    cases = [(pt, "zip archive"), (raw_pickle, "pickle"), (foreign, "no 'm2iv' entry"),
             (truncated, "corrupt or truncated"), (header_cut, "truncated"),
             (garbage, "not a safetensors file"), (empty, "empty file"),
             (gg, "GGUF file")]
    for path, why in cases:
        with pytest.raises(VectorsFormatError, match=why):
            lib.add_file(path, "x")
    with pytest.raises(FileNotFoundError):
        lib.add_file(tmp_path / "nope.safetensors", "x")
    assert len(lib) == 0
    assert lib.add_file(good, "x").version == 1


def test_paths_from_the_index_cannot_escape(lib, tmp_path):
    outside = tmp_path / "outside.safetensors"
    vec(0).save(outside)
    lib.add(vec(1), "dotdot")
    lib.add(vec(2), "absolute")
    lib.add(vec(3), "link")
    db = sqlite3.connect(os.path.join(lib.root, "index.sqlite"))
    with db:
        db.execute("UPDATE entries SET file = ? WHERE name = 'dotdot'",
                   ("vectors/../../outside.safetensors",))
        db.execute("UPDATE entries SET file = ? WHERE name = 'absolute'", (str(outside),))
    db.close()
    link_path = lib.path_of("link")
    os.unlink(link_path)
    os.symlink(outside, link_path)
    for ref in ("dotdot", "absolute", "link"):
        with pytest.raises(UnsafePathError, match="refused"):
            lib.get(ref)
    rep = lib.verify()
    assert sorted(u["ref"] for u in rep.unsafe) == ["absolute:1", "dotdot:1", "link:1"]
    lib.remove("dotdot:1")
    lib.remove("absolute:1")
    assert outside.exists()  # never touched
    assert lib.verify(repair=True).healthy and outside.exists()
    assert lib.verify().clean


def test_unexpected_files_are_reported_and_quarantined(lib):
    lib.add(vec(0), "a")
    stray = os.path.join(lib.root, "vectors", "notes.txt")
    with open(stray, "w") as f:
        f.write("hello")
    rep = lib.verify()
    assert rep.unexpected == ["vectors/notes.txt"]
    assert lib.verify(repair=True).healthy and not os.path.exists(stray)
    assert lib.verify().clean


def test_not_a_library(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "thesis.tex").write_text("x")
    with pytest.raises(LibraryError, match="not empty and is not a VLibrary"):
        VLibrary(tmp_path / "stuff")
    with pytest.raises(LibraryError, match="no VLibrary"):
        VLibrary(tmp_path / "absent", create=False)
    bad = tmp_path / "badindex"
    bad.mkdir()
    (bad / "index.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LibraryError, match="not a usable SQLite index"):
        VLibrary(bad)
    newer = tmp_path / "newer"
    VLibrary(newer).close()
    db = sqlite3.connect(newer / "index.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(LibraryError, match="newer m2iv"):
        VLibrary(newer)


def test_connection_is_not_shared_across_fork(lib):
    lib.add(vec(0), "a")
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    lib._pid = -1  # what a forked child sees: the connection belongs to another process
    assert lib.entry("a").version == 1


# ---------------------------------------------------------------------------- GGUF interop


def test_gguf_written_by_gguf_writer_reads_back_exactly(tmp_path):
    import gguf

    rng = np.random.default_rng(0)
    dirs = {k: rng.standard_normal(D).astype(np.float32) for k in (1, 2, 3)}
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")  # what repeng's export_gguf does
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(dirs))
    for k, d in dirs.items():
        writer.add_tensor(f"direction.{k}", d)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    cv = gguf_io.read_control_vector(path)
    assert cv.model_hint == "llama" and cv.layer_count == 3 and cv.layers == (1, 2, 3)
    v = gguf_io.load_control_vector(path, num_heads=H, head_dim=DH, num_layers=4)
    assert v.layers == (1, 2, 3) and v.meta["model_type"] == "llama"
    for i, k in enumerate((1, 2, 3)):
        assert torch.equal(v.mlp[i], torch.from_numpy(dirs[k]))  # bit for bit
    assert torch.equal(v.mlp_gates, torch.ones(3))
    assert torch.equal(v.mha, torch.zeros(3, H, DH))
    with pytest.raises(ValueError, match="num_heads"):
        gguf_io.load_control_vector(path)
    with pytest.raises(ControlVectorFormatError, match="4 decoder layers|decoder layers"):
        gguf_io.load_control_vector(path, num_heads=H, head_dim=DH, num_layers=3)


def test_gguf_export_import_roundtrip_mlp_exact(tmp_path):
    v = vec(1, layers=(1, 2, 3), num_layers=4)
    path = tmp_path / "out.gguf"
    with pytest.warns(UserWarning, match="DROPPED"):  # non-zero MHA part, no model to fold it
        rep = gguf_io.save_control_vector(v, path)
    assert rep["mha"] == "dropped" and rep["layers"] == [1, 2, 3]
    back = gguf_io.load_control_vector(path, model=v)
    assert torch.equal(back.mlp, v.mlp_gates[:, None] * v.mlp)
    assert back.layers == v.layers and back.meta["model_type"] == "llama"
    # re-exporting the import gives the same file contents
    rep2 = gguf_io.save_control_vector(back, tmp_path / "again.gguf", warn=False)
    assert rep2["mha"] == "none"
    again = gguf_io.read_control_vector(tmp_path / "again.gguf")
    first = gguf_io.read_control_vector(path)
    assert all(np.array_equal(again.directions[k], first.directions[k]) for k in (1, 2, 3))


def test_gguf_export_folds_mha_through_o_proj(tmp_path, tiny_llama):
    v = M2IV.random_like(tiny_llama, seed=3)
    path = tmp_path / "fold.gguf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = gguf_io.save_control_vector(v, path, model=tiny_llama, keep_layer_zero=True)
    said = " ".join(str(w.message) for w in caught)
    assert "APPROXIMATION" in said and "llama.cpp will reject" in said
    assert rep["mha"] == "folded" and rep["layers"] == [0, 1]
    back = gguf_io.load_control_vector(path, model=tiny_llama)
    for i, layer in enumerate(v.layers):
        o_proj = tiny_llama.model.layers[layer].self_attn.o_proj
        head_space = (v.mha_gates[i, :, None] * v.mha[i]).reshape(-1)
        with torch.no_grad():
            folded = o_proj(head_space) - o_proj(torch.zeros_like(head_space))
        torch.testing.assert_close(back.mlp[i], v.mlp_gates[i] * v.mlp[i] + folded)
    # default: layer 0 is dropped (llama.cpp rejects direction.0) and said so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = gguf_io.save_control_vector(v, tmp_path / "d.gguf", model=tiny_llama)
    assert any("refuses direction.0" in str(w.message) for w in caught)
    assert rep["layers"] == [1] and rep["dropped_layers"] == [0]
    with pytest.raises(ValueError, match="only layer 0"):
        gguf_io.save_control_vector(vec(0, layers=(0,)), tmp_path / "z.gguf", warn=False)


def test_gguf_import_matches_a_layer_output_control_vector(tiny_llama, tmp_path):
    """The mapping direction.k -> mlp[k] (gate 1) steers exactly like llama.cpp: the direction
    is added to decoder layer k's output at every position."""
    import m2iv

    rng = np.random.default_rng(1)
    direction = rng.standard_normal(D).astype(np.float32)
    path = tmp_path / "cv.gguf"
    gguf_io.write_control_vector(path, {1: direction}, "llama")
    v = gguf_io.load_control_vector(path, model=tiny_llama)
    ids = torch.tensor([[3, 4, 5, 6, 7]])

    def add_to_output(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + torch.from_numpy(direction),) + output[1:]
        return output + torch.from_numpy(direction)

    with torch.no_grad():
        hook = tiny_llama.model.layers[1].register_forward_hook(add_to_output)
        try:
            reference = tiny_llama(ids).logits
        finally:
            hook.remove()
        with m2iv.steer(tiny_llama, v, backend="torch"):
            steered = tiny_llama(ids).logits
        plain = tiny_llama(ids).logits
    assert not torch.allclose(plain, reference)
    torch.testing.assert_close(steered, reference, rtol=1e-5, atol=1e-5)


def test_bad_gguf_files_rejected(tmp_path):
    import gguf

    other = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, D), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ControlVectorFormatError, match="architecture 'llama'"):
        gguf_io.read_control_vector(other)

    f16 = tmp_path / "f16.gguf"
    w = gguf.GGUFWriter(str(f16), "controlvector")
    w.add_tensor("direction.1", np.zeros(D, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ControlVectorFormatError, match="F32"):
        gguf_io.read_control_vector(f16)

    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "controlvector")
    w.add_tensor("direction.one", np.zeros(D, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ControlVectorFormatError, match="unexpected tensor 'direction.one'"):
        gguf_io.read_control_vector(odd)

    good = tmp_path / "good.gguf"
    gguf_io.write_control_vector(good, {1: np.ones(D, np.float32), 2: np.ones(D, np.float32)})
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ControlVectorFormatError, match="truncated|damaged|not a readable"):
        gguf_io.read_control_vector(truncated)
    st = tmp_path / "vectors.safetensors"
    vec(0).save(st)
    with pytest.raises(ControlVectorFormatError, match="not a readable GGUF"):
        gguf_io.read_control_vector(st)
    with pytest.raises(ControlVectorFormatError, match="hidden size"):
        gguf_io.load_control_vector(good, num_heads=8, head_dim=8,
                                    model=ModelSpec(hidden_size=64, num_heads=8, head_dim=8))
    with pytest.raises(ValueError, match="bank"):
        gguf_io.save_control_vector(M2IV.stack([vec(0), vec(1)]), tmp_path / "b.gguf")


def test_library_gguf_import_export(lib, tmp_path, tiny_llama):
    path = tmp_path / "cv.gguf"
    gguf_io.write_control_vector(path, {1: np.arange(D, dtype=np.float32)}, "llama")
    e = lib.import_gguf(path, "cv", model=tiny_llama, tags=["imported"])
    assert e.layers == (1,) and e.tags == ("imported",) and e.num_layers == NL
    assert e.extra["imported_from"]["format"] == "gguf-controlvector"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MLP-only, layer >= 1: nothing approximate to say
        rep = lib.export_gguf("cv", tmp_path / "out.gguf", model=tiny_llama)
    assert rep["mha"] == "none" and rep["notes"] == []
    back = gguf_io.read_control_vector(tmp_path / "out.gguf")
    assert np.array_equal(back.directions[1], np.arange(D, dtype=np.float32))
    assert back.model_hint == "llama"


# ---------------------------------------------------------------------------- task embeddings


def test_embed_task_is_the_mean_hidden_state(tiny_llama):
    examples = [[1, 2, 3], [4, 5, 6, 7]]
    with torch.no_grad():
        rows = []
        for ex in examples:
            hs = tiny_llama(torch.tensor([ex]), output_hidden_states=True).hidden_states
            rows.append(hs[len(hs) // 2][0].mean(0))
    expected = torch.stack(rows).mean(0)
    torch.testing.assert_close(embed_task(tiny_llama, examples), expected)
    # a padded batch (right padding, attention_mask) gives the same embedding
    batch = {"input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    torch.testing.assert_close(embed_task(tiny_llama, [batch]), expected, rtol=1e-5, atol=1e-5)
    assert embed_examples(tiny_llama, [batch]).shape == (2, D)
    last = embed_task(tiny_llama, examples, layer="last")
    assert last.shape == (D,) and not torch.allclose(last, expected)
    with pytest.raises(ValueError, match="tokenizer"):
        embed_task(tiny_llama, ["some text"])
    with pytest.raises(ValueError, match="layer"):
        embed_task(tiny_llama, examples, layer=99)
    assert tiny_llama.training is False


def test_embed_task_on_an_lvlm_with_images():
    from m2iv.testing import IMAGE_TOKEN, build

    model = build("llava")
    n_img = 4  # 28x28 image, 14x14 patches
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * n_img + [5, 6, 7]])
    pixels = torch.randn(1, 3, 28, 28)
    e_img = embed_task(model, [{"input_ids": ids, "pixel_values": pixels}])
    e_other = embed_task(model, [{"input_ids": ids, "pixel_values": pixels + 1.0}])
    e_text = embed_task(model, [[1, 5, 6, 7]])
    assert e_img.shape == e_text.shape == (D,)
    assert torch.isfinite(e_img).all() and not torch.allclose(e_img, e_other)
    spec = ModelSpec.of(model)
    assert {"llava", "llama"} <= spec.types() and spec.hidden_size == D
