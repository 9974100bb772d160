"""The M2IV vectors object: validation, arithmetic, banks, safetensors round trip, file errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from m2iv import (M2IV, IncompatibleVectorsError, M2IVError, UnsupportedModelError,
                  VectorsFormatError, VectorsMismatchError)
from m2iv.vectors import FORMAT_VERSION, METADATA_KEY
from m2iv.testing import build

L, H, DH, D = 3, 4, 8, 32


def make(seed: int = 0, *, layers=(0, 1, 2), dtype=torch.float32, **meta) -> M2IV:
    g = torch.Generator().manual_seed(seed)
    n = len(layers)
    return M2IV(torch.randn(n, H, DH, generator=g).to(dtype),
                (torch.rand(n, H, generator=g) + 0.5).to(dtype),
                torch.randn(n, D, generator=g).to(dtype),
                (torch.rand(n, generator=g) + 0.5).to(dtype), layers,
                dict({"model_type": "llama", "num_layers": 4, "task": f"task{seed}"}, **meta))


def effective(v: M2IV) -> tuple[torch.Tensor, torch.Tensor]:
    return (v.mha_gates[..., None] * v.mha).float(), (v.mlp_gates[..., None] * v.mlp).float()


def same(a: M2IV, b: M2IV) -> bool:
    return a.layers == b.layers and all(
        x.dtype == y.dtype and torch.equal(x, y)
        for x, y in zip(a.tensors().values(), b.tensors().values()))


@pytest.fixture(scope="module")
def llava():
    return build("llava")


# ---------------------------------------------------------------------- construction

def test_properties_and_meta_defaults():
    v = make()
    assert (v.num_heads, v.head_dim, v.hidden_size, v.num_layers) == (H, DH, D, L)
    assert not v.is_bank and v.n_bank is None
    for key in ("format_version", "model_type", "hidden_size", "num_heads", "head_dim",
                "num_layers", "task", "shots", "description", "package_version"):
        assert key in v.meta
    assert v.meta["format_version"] == FORMAT_VERSION
    assert (v.meta["hidden_size"], v.meta["num_heads"], v.meta["head_dim"]) == (D, H, DH)
    json.dumps(v.meta)
    assert "bank" not in repr(v) and "layers=0..2" in repr(v)


@pytest.mark.parametrize("change, message", [
    (dict(mha=torch.zeros(3, 4)), "mha must be"),
    (dict(mha_gates=torch.ones(3, 5)), "mha_gates must have shape"),
    (dict(mlp=torch.zeros(3, 32, 1)), "mlp must be"),
    (dict(mlp_gates=torch.ones(2)), "mlp_gates must have shape"),
    (dict(mlp=torch.zeros(2, 32), mlp_gates=torch.ones(2)), "disagree on the layer count"),
    (dict(layers=(0, 2, 1)), "strictly increasing"),
    (dict(layers=(0, 1)), "lists 2 indices"),
    (dict(layers=(-1, 0, 1)), "non-negative"),
    (dict(mha=torch.zeros(3, 4, 8, dtype=torch.int32)), "float tensor"),
    (dict(mlp_gates=[1.0, 1.0, 1.0]), "must be a torch.Tensor"),
    (dict(meta={"hidden_size": 64}), "meta['hidden_size'] = 64 disagrees"),
    (dict(meta={"num_layers": 2}), "go past the model's num_layers"),
    (dict(meta={"format_version": 99}), "unsupported format_version"),
    (dict(meta={"x": object()}), "JSON-serialisable"),
])
def test_constructor_rejects(change, message):
    args = dict(mha=torch.zeros(3, 4, 8), mha_gates=torch.ones(3, 4), mlp=torch.zeros(3, 32),
                mlp_gates=torch.ones(3), layers=(0, 1, 2), meta=None)
    args.update(change)
    with pytest.raises(VectorsFormatError, match=message.replace("[", r"\[").replace("(", r"\(")):
        M2IV(**args)


@pytest.mark.parametrize("name", ["mha", "mha_gates", "mlp", "mlp_gates"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rejected_naming_tensor_and_layer(name, bad):
    v = make()
    t = v.tensors()
    t[name] = t[name].clone()
    t[name].view(L, -1)[2, 0] = bad
    with pytest.raises(VectorsFormatError, match=f"{name} holds NaN or inf.*layer 2"):
        M2IV(**t, layers=v.layers)


def test_errors_are_valueerrors():
    for cls in (VectorsFormatError, VectorsMismatchError, IncompatibleVectorsError,
                UnsupportedModelError):
        assert issubclass(cls, M2IVError) and issubclass(cls, ValueError)


# ---------------------------------------------------------------------- arithmetic

def test_to_scale_mul():
    v = make()
    h = v.to(dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in h.tensors().values())
    assert v.to(torch.float16).dtype == torch.float16
    assert v.to("cpu").mha is v.mha  # nothing to convert: no copy
    s = v.scale(0.5)
    torch.testing.assert_close(s.mha_gates, v.mha_gates * 0.5)
    torch.testing.assert_close(s.mlp_gates, v.mlp_gates * 0.5)
    assert torch.equal(s.mha, v.mha)
    assert same(2.0 * v, v * 2.0) and same(v * 2, v.scale(2))
    with pytest.raises(ValueError):
        v.scale(float("nan"))


def test_weighted_sum_is_sum_of_effective_steering():
    a, b = make(1), make(2)
    w = M2IV.weighted_sum([(a, 0.25), (b, -1.5)])
    ea, eb, ew = effective(a), effective(b), effective(w)
    torch.testing.assert_close(ew[0], 0.25 * ea[0] - 1.5 * eb[0])
    torch.testing.assert_close(ew[1], 0.25 * ea[1] - 1.5 * eb[1])
    assert torch.all(w.mha_gates == 1) and torch.all(w.mlp_gates == 1)
    assert w.meta["components"] == [{"task": "task1", "weight": 0.25},
                                    {"task": "task2", "weight": -1.5}]
    s = a + b
    torch.testing.assert_close(effective(s)[0], ea[0] + eb[0])


@pytest.mark.parametrize("other, reason", [
    (lambda: make(layers=(0, 1, 3)), "different layers"),
    (lambda: make(model_type="qwen2"), "different models"),
    (lambda: make(num_layers=8), "different models"),
    (lambda: M2IV.stack([make(), make()]), "bank"),
    (lambda: M2IV(torch.zeros(3, 2, 16), torch.ones(3, 2), torch.zeros(3, 32), torch.ones(3),
                  (0, 1, 2)), "num_heads differs"),
    (lambda: M2IV(torch.zeros(3, 4, 8), torch.ones(3, 4), torch.zeros(3, 16), torch.ones(3),
                  (0, 1, 2)), "hidden_size differs"),
])
def test_incompatible(other, reason):
    a, b = make(), other()
    assert reason in a.compatibility(b)
    with pytest.raises(IncompatibleVectorsError, match=reason):
        M2IV.weighted_sum([(a, 1.0), (b, 1.0)])
    assert a.compatibility(make(5)) is None


def test_weighted_sum_empty_and_bad_weight():
    with pytest.raises(IncompatibleVectorsError, match="at least one"):
        M2IV.weighted_sum([])
    with pytest.raises(IncompatibleVectorsError, match="weight of item 1"):
        M2IV.weighted_sum([(make(), 1.0), (make(), float("inf"))])


# ---------------------------------------------------------------------- banks

def test_stack_and_index():
    items = [make(i) for i in range(3)]
    bank = M2IV.stack(items)
    assert bank.is_bank and bank.n_bank == 3 and len(bank) == 3
    assert bank.mha.shape == (3, L, H, DH) and bank.mlp_gates.shape == (3, L)
    for i, v in enumerate(items):
        assert same(bank[i], v)
        assert bank[i].meta["task"] == f"task{i}"
    assert bank[-1].meta["task"] == "task2"
    sub = bank[1:]
    assert sub.n_bank == 2 and sub[0].meta["task"] == "task1"
    assert [v.meta["task"] for v in bank] == ["task0", "task1", "task2"]
    with pytest.raises(IndexError):
        bank[3]
    with pytest.raises(TypeError):
        items[0][0]
    with pytest.raises(IncompatibleVectorsError, match="item 1"):
        M2IV.stack([make(), make(layers=(0, 1, 3))])
    with pytest.raises(IncompatibleVectorsError, match="already a bank"):
        M2IV.stack([bank])


# ---------------------------------------------------------------------- files

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_roundtrip_exact(tmp_path, dtype):
    v = make(3, dtype=dtype, shots=16, description="caption, 16-shot", extra={"k": [1, 2]})
    path = tmp_path / "v.safetensors"
    v.save(path)
    w = M2IV.load(path)
    assert same(v, w) and w.meta == v.meta
    assert M2IV.read_meta(path)["layers"] == [0, 1, 2]
    assert M2IV.read_meta(path)["shots"] == 16
    c = M2IV.load(path, dtype=torch.float32)
    assert c.dtype == torch.float32
    assert os.listdir(tmp_path) == ["v.safetensors"]  # no temporary files left


def test_save_load_bank(tmp_path):
    bank = M2IV.stack([make(0), make(1)])
    bank.save(tmp_path / "b.safetensors")
    back = M2IV.load(tmp_path / "b.safetensors")
    assert same(bank, back) and back[1].meta["task"] == "task1"


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "v.safetensors"
    make(1).save(path)
    before = path.read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        make(2).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["v.safetensors"]
    assert same(M2IV.load(path), make(1))


def _write_raw(path, tensors, metadata):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)


def _header(v: M2IV, **changes) -> dict:
    doc = dict(v.meta, layers=list(v.layers))
    doc.update(changes)
    return {METADATA_KEY: json.dumps(doc)}


def test_load_errors(tmp_path):
    v = make()
    good = {k: t.contiguous() for k, t in v.tensors().items()}
    with pytest.raises(FileNotFoundError, match="no M2IV file"):
        M2IV.load(tmp_path / "missing.safetensors")
    with pytest.raises(VectorsFormatError, match="directory"):
        M2IV.load(tmp_path)

    cases = {}
    (tmp_path / "garbage").write_bytes(b"this is not safetensors at all")
    cases["garbage"] = "not a readable safetensors file"
    v.save(tmp_path / "full")
    (tmp_path / "truncated").write_bytes((tmp_path / "full").read_bytes()[:-40])
    cases["truncated"] = "not a readable safetensors file"
    _write_raw(tmp_path / "nometa", good, None)
    cases["nometa"] = "no 'm2iv' entry"
    _write_raw(tmp_path / "badjson", good, {METADATA_KEY: "{not json"})
    cases["badjson"] = "not valid JSON"
    _write_raw(tmp_path / "notobject", good, {METADATA_KEY: "[1, 2]"})
    cases["notobject"] = "must be a JSON object"
    _write_raw(tmp_path / "future", good, _header(v, format_version=FORMAT_VERSION + 1))
    cases["future"] = "unsupported format_version"
    _write_raw(tmp_path / "nolayers", good, {METADATA_KEY: json.dumps(v.meta)})
    cases["nolayers"] = "lacks the 'layers' list"
    _write_raw(tmp_path / "missing_t", {k: t for k, t in good.items() if k != "mlp"}, _header(v))
    cases["missing_t"] = r"missing tensor\(s\) \['mlp'\]"
    _write_raw(tmp_path / "extra_t", dict(good, junk=torch.zeros(1)), _header(v))
    cases["extra_t"] = r"unexpected tensor\(s\) \['junk'\]"
    _write_raw(tmp_path / "int_t", dict(good, mha=good["mha"].to(torch.int32)), _header(v))
    cases["int_t"] = "tensor 'mha' has dtype torch.int32"
    nan = dict(good, mlp=good["mlp"].clone())
    nan["mlp"][1, 3] = float("nan")
    _write_raw(tmp_path / "nan", nan, _header(v))
    cases["nan"] = "mlp holds NaN or inf values \\(layer 1\\)"
    _write_raw(tmp_path / "shape", dict(good, mha_gates=torch.ones(3, 5)), _header(v))
    cases["shape"] = "mha_gates must have shape"
    _write_raw(tmp_path / "meta_mismatch", good, _header(v, num_heads=8))
    cases["meta_mismatch"] = "meta\\['num_heads'\\] = 8 disagrees"
    _write_raw(tmp_path / "layers_mismatch", good, _header(v, layers=[0, 1]))
    cases["layers_mismatch"] = "lists 2 indices"
    for name, message in cases.items():
        with pytest.raises(VectorsFormatError, match=message):
            M2IV.load(tmp_path / name)


# ---------------------------------------------------------------------- model constructors

def test_zeros_and_random_like(llava):
    z = M2IV.zeros_like(llava)
    assert z.layers == (0, 1) and z.mha.shape == (2, 4, 8) and z.mlp.shape == (2, 32)
    assert z.meta["model_type"] == "llava" and z.meta["num_layers"] == 2
    assert torch.all(z.mha == 0) and torch.all(z.mha_gates == 1)
    r1, r2, r3 = (M2IV.random_like(llava, seed=s) for s in (0, 0, 1))
    assert same(r1, r2) and not same(r1, r3)
    assert r1.mha.abs().min() >= 0 and r1.mha.std() > 0 and r1.mlp.std() > 0
    assert torch.all((r1.mha_gates >= 0.5) & (r1.mha_gates <= 1.5))
    sub = M2IV.random_like(llava, layers=[1], scale=0.1, dtype=torch.bfloat16)
    assert sub.layers == (1,) and sub.dtype == torch.bfloat16
    assert abs(float(sub.mlp.float().std()) - 0.1) < 0.05
    bank = M2IV.random_like(llava, bank=3)
    assert bank.n_bank == 3 and not torch.equal(bank.mha[0], bank.mha[1])
    r1.check_model(llava)
    with pytest.raises(VectorsMismatchError, match="layer 5"):
        M2IV.zeros_like(llava, layers=[5])


def test_mllama_skips_cross_attention_layers():
    model = build("mllama")
    z = M2IV.zeros_like(model)
    assert z.layers == (0, 2)  # layer 1 is a cross-attention layer in the tiny config
    bad = M2IV(torch.zeros(3, 4, 8), torch.ones(3, 4), torch.zeros(3, 32), torch.ones(3),
               (0, 1, 2))
    with pytest.raises(VectorsMismatchError, match="layer 1: .*cross-attention"):
        bad.check_model(model)


def test_check_model_names_layer_and_shapes(llava):
    heads = M2IV(torch.zeros(2, 2, 16), torch.ones(2, 2), torch.zeros(2, 32), torch.ones(2),
                 (0, 1))
    with pytest.raises(VectorsMismatchError,
                       match=r"layer 0: .*\(2, 16\).*\(H, Dh\) = \(4, 8\)"):
        heads.check_model(llava)
    hidden = M2IV(torch.zeros(2, 4, 8), torch.ones(2, 4), torch.zeros(2, 64), torch.ones(2),
                  (0, 1))
    with pytest.raises(VectorsMismatchError, match=r"layer 0: .*\(64,\).*\(32,\)"):
        hidden.check_model(llava)
    deep = M2IV(torch.zeros(1, 4, 8), torch.ones(1, 4), torch.zeros(1, 32), torch.ones(1), (7,))
    with pytest.raises(VectorsMismatchError, match="layer 7: .*has 2 decoder layers"):
        deep.check_model(llava)
    other = M2IV(torch.zeros(1, 4, 8), torch.ones(1, 4), torch.zeros(1, 32), torch.ones(1), (0,),
                 {"num_layers": 32})
    with pytest.raises(VectorsMismatchError, match="32 decoder layers"):
        other.check_model(llava)


def test_unsupported_model_says_what_was_looked_for():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64,
                                      n_positions=32))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*attention with an o_proj"):
        M2IV.zeros_like(gpt2)
