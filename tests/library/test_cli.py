"""`m2iv library ...`: every sub-command, its --json output and its error exits."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from m2iv import M2IVWarning
from m2iv.cli import main
from m2iv.library import VLibrary, gguf_io
from m2iv.vectors import M2IV

from .test_library import D, DH, H, vec


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "lib")


def run(capsys, root, *argv):
    code = main(["library", argv[0], "--root", root, *argv[1:]])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, root, *argv):
    code, out, err = run(capsys, root, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def files(tmp_path):
    paths = {}
    for i, name in enumerate(("a", "b", "c")):
        p = tmp_path / f"{name}.safetensors"
        vec(i, task=name).save(p)
        paths[name] = str(p)
        e = np.zeros(D, np.float32)
        e[i] = 1.0
        e[3] = 0.5
        np.save(tmp_path / f"{name}.npy", e)
        paths[f"{name}.npy"] = str(tmp_path / f"{name}.npy")
    return paths


def test_add_list_show(capsys, root, files):
    d = run_json(capsys, root, "add", files["a"], "--name", "a", "--tag", "x", "--tag", "y",
                 "--metrics", '{"loss": 0.5}', "--embedding", files["a.npy"], "--shots", "8")
    assert d["ref"] == "a:1" and d["tags"] == ["x", "y"] and d["metrics"] == {"loss": 0.5}
    assert d["embedding_dim"] == D and d["shots"] == 8 and d["task"] == "a"
    code, out, _ = run(capsys, root, "add", files["b"], "--name", "b", "--tag", "x")
    assert code == 0 and out.startswith("added b:1")

    rows = run_json(capsys, root, "list")
    assert [r["ref"] for r in rows] == ["a:1", "b:1"]
    assert [r["ref"] for r in run_json(capsys, root, "list", "--tag", "y")] == ["a:1"]
    assert run_json(capsys, root, "list", "--model-type", "mistral") == []
    code, out, _ = run(capsys, root, "list")
    assert code == 0 and "a:1" in out and "b:1" in out and "ref" in out

    shown = run_json(capsys, root, "show", "a")
    assert shown["ref"] == "a:1" and os.path.isfile(shown["path"])
    assert "embedding" not in shown
    assert len(run_json(capsys, root, "show", "a:1", "--embedding")["embedding"]) == D
    code, out, _ = run(capsys, root, "show", "a:1")
    assert code == 0 and "sha256" in out


def test_search(capsys, root, files):
    for name in ("a", "b", "c"):
        run_json(capsys, root, "add", files[name], "--name", name, "--embedding",
                 files[f"{name}.npy"])
    hits = run_json(capsys, root, "search", "--like", "a", "-k", "2")
    assert hits[0]["ref"] == "a:1" and hits[0]["score"] == pytest.approx(1.0)
    assert hits[1]["score"] == pytest.approx(0.2)  # b and c tie at cos = 0.25 / 1.25
    hits = run_json(capsys, root, "search", "--embedding", files["c.npy"], "--compatible-with",
                    "a", "-k", "1")
    assert [h["ref"] for h in hits] == ["c:1"]
    code, out, err = run(capsys, root, "search", "--embedding", files["c.npy"])
    assert code == 1 and "--compatible-with" in err  # the flag, not the Python keyword
    code, out, _ = run(capsys, root, "search", "--like", "b")
    assert code == 0 and "+1.0000" in out


def test_compose_rm_verify(capsys, root, files, tmp_path):
    for name in ("a", "b"):
        run_json(capsys, root, "add", files[name], "--name", name)
    out_file = tmp_path / "mix.safetensors"
    d = run_json(capsys, root, "compose", "a=1.0", "b:1=-0.5", "-o", str(out_file),
                 "--name", "mix", "--tag", "mixed")
    assert [c["ref"] for c in d["components"]] == ["a:1", "b:1"]
    assert d["entry"]["ref"] == "mix:1" and d["entry"]["tags"] == ["mixed"]
    mix = M2IV.load(out_file)
    a, b = vec(0), vec(1)
    torch.testing.assert_close(mix.mlp_gates[:, None] * mix.mlp,
                               a.mlp_gates[:, None] * a.mlp - 0.5 * b.mlp_gates[:, None] * b.mlp)
    code, _, err = run(capsys, root, "compose", "a=1")
    assert code == 1 and "-o" in err
    code, _, err = run(capsys, root, "compose", "a=heavy", "-o", str(out_file))
    assert code == 1 and "bad weight" in err

    code, _, err = run(capsys, root, "rm", "a")
    assert code == 1 and "--all" in err and "all_versions" not in err
    assert [e["ref"] for e in run_json(capsys, root, "rm", "a:1")] == ["a:1"]
    code, out, _ = run(capsys, root, "rm", "mix", "--all")
    assert code == 0 and "removed mix:1" in out
    code, _, err = run(capsys, root, "rm", "nope:1")
    assert code == 1 and "no entry named 'nope'" in err
    code, _, err = run(capsys, str(tmp_path / "elsewhere"), "rm", "a")
    assert code == 1 and "no VLibrary at" in err and "m2iv library add" in err
    assert "pass create=True" not in err  # rm has no such flag: the command to run is named
    assert not (tmp_path / "elsewhere").exists()

    rep = run_json(capsys, root, "verify")
    assert rep["clean"] and rep["checked"] == 1
    lib = VLibrary(root)
    with open(lib.path_of("b"), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"zzz")
    code, out, _ = run(capsys, root, "verify")
    assert code == 1 and "corrupt: b:1" in out
    code, out, _ = run(capsys, root, "verify", "--repair")
    assert code == 0 and "repaired" in out
    assert run_json(capsys, root, "verify")["clean"]


def test_export_import(capsys, root, files, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, vocab_size=100))
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    run_json(capsys, root, "add", files["a"], "--name", "a")

    gg = tmp_path / "a.gguf"
    code, out, err = run(capsys, root, "export", "a", str(gg), "--model", str(model_dir),
                         "--keep-layer-zero")
    assert code == 0 and "APPROXIMATION" in err and "exported a:1" in out
    assert "Loading weights" not in err and "it/s" not in err  # no weight-loading bar
    code, out, err = run(capsys, root, "export", "a", str(tmp_path / "c.gguf"))
    assert code == 0 and "DROPPED" in err and "pass --keep-layer-zero" in err
    assert all(line.startswith("m2iv library export: warning: ")
               for line in err.strip().splitlines())
    rep = run_json(capsys, root, "export", "a", str(tmp_path / "b.gguf"))
    assert rep["mha"] == "dropped" and rep["layers"] == [1] and rep["dropped_layers"] == [0]
    cv = gguf_io.read_control_vector(tmp_path / "b.gguf")
    a = vec(0)
    assert np.array_equal(cv.directions[1], (a.mlp_gates[1] * a.mlp[1]).numpy())

    d = run_json(capsys, root, "import", str(tmp_path / "b.gguf"), "--name", "cv", "--like", "a",
                 "--tag", "gguf")
    assert d["ref"] == "cv:1" and d["layers"] == [1] and d["num_heads"] == H
    d = run_json(capsys, root, "import", str(gg), "--name", "cv", "--model", str(model_dir))
    assert d["ref"] == "cv:2" and d["layers"] == [0, 1] and d["model_type"] == "llama"
    d = run_json(capsys, root, "import", str(gg), "--name", "cv", "--num-heads", str(H),
                 "--head-dim", str(DH))
    assert d["ref"] == "cv:3"
    code, _, err = run(capsys, root, "import", str(gg), "--name", "cv")
    assert code == 1 and "--num-heads" in err
    code, out, err = run(capsys, root, "import", files["a"], "--name", "cv", "--json")
    assert code == 1 and json.loads(out)["error"] and "library add" in err

    st = tmp_path / "copy.safetensors"
    assert run_json(capsys, root, "export", "cv:1", str(st))["format"] == "m2iv-safetensors"
    assert torch.equal(M2IV.load(st).mlp[0], torch.from_numpy(cv.directions[1]))
    code, _, err = run(capsys, root, "export", "a", str(tmp_path / "x.bin"))
    assert code == 1 and ".gguf" in err


def test_wired_into_the_m2iv_command(capsys, root, files):
    from m2iv.cli import main as m2iv_main

    assert m2iv_main(["library", "add", files["a"], "--name", "a", "--root", root]) == 0
    assert m2iv_main(["library", "list", "--root", root, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("["):])[0]["ref"] == "a:1"


def test_import_of_another_architecture_warns_in_one_line(capsys, root, files, tmp_path):
    from transformers import LlamaConfig

    model_dir = tmp_path / "llama-config"
    LlamaConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                intermediate_size=64, vocab_size=100).save_pretrained(model_dir)
    gg = tmp_path / "qwen.gguf"
    gguf_io.write_control_vector(gg, {1: np.ones(D, np.float32)}, "qwen2")
    code, out, err = run(capsys, root, "import", str(gg), "--name", "cv", "--model",
                         str(model_dir))
    assert code == 0 and "imported" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2iv library import: warning: ")
    assert "made for 'qwen2'" in lines[0] and "'llama'" in lines[0]
    assert "UserWarning" not in err and "warnings.warn" not in err
    with pytest.warns(M2IVWarning, match="made for 'qwen2'"):  # the Python API: a warning
        gguf_io.load_control_vector(gg, model=VLibrary(root).entry("cv").model_spec())
