"""Smoke runs of the benchmarks: they run, guard correctness and write their files."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import kernels
from m2iv.bench import icl
from m2iv.bench.presets import PRESETS, apply_overrides, build_model, make_inputs
from m2iv.testing import add_steering_hooks, decoder_layers


def test_kernel_benchmark_rows():
    rows = kernels.run_ops(torch.device("cpu"), [(1, 256, 4)], [torch.float32], budget_s=0.01)
    ops = {r["op"] for r in rows}
    assert ops == {"head_steer", "steer_add", "steer_add_rmsnorm"}
    assert all(r["fused_ms"] > 0 and r["speedup_vs_unfused"] > 0 for r in rows)
    assert any(r["backend"] == "triton (interpreter)" for r in rows)
    reg = kernels.run_registration_overhead(torch.device("cpu"))
    assert [r["mechanism"] for r in reg][0] == "direct call"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return icl.main(["--smoke", "--out", str(out), "--set", "text.num_hidden_layers=2"]), out


def test_icl_benchmark_smoke(smoke):
    result, out = smoke
    rows = {r["mode"]: r for r in result["rows"]}
    assert {"a) unsteered", "b) M2IV fused", "c) M2IV hooks"} <= set(rows)
    assert rows["b) M2IV fused"]["status"] == "ok"
    assert rows["d) ICL 1-shot"]["prompt_tokens"] > rows["a) unsteered"]["prompt_tokens"]
    assert rows["d) ICL 1-shot"]["kv_cache_MB"] > rows["b) M2IV fused"]["kv_cache_MB"]
    assert rows["d) ICL 1-shot"]["peak_mem_MB"] > rows["b) M2IV fused"]["peak_mem_MB"] > 0
    assert rows["d) ICL 64-shot"]["status"].startswith("exceeds context")
    assert rows["d) ICL 1-shot"]["m2iv_prefill_speedup"] > 0
    assert [t["K"] for t in result["tasks"]] == [1, 4]
    names = {p.name for p in out.iterdir()}
    assert any(n.endswith(".json") for n in names) and any(n.endswith(".csv") for n in names)
    assert any(n.endswith("-latency.png") for n in names)
    data = json.loads(next(p for p in out.iterdir() if p.suffix == ".json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["rows"]


def test_plots_skipped_in_one_line_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert icl.plots_if_possible([], [], icl.PRESETS["cpu-tiny"], {}, tmp_path / "x") == []
    out = capsys.readouterr().out
    assert out.startswith("note: matplotlib, needed for the plots, is not installed") and \
        "m2iv[train]" in out and out.count("\n") == 1


def test_correctness_guard_catches_a_wrong_path(monkeypatch):
    import m2iv

    preset = apply_overrides(PRESETS["cpu-tiny"], ["text.num_hidden_layers=2"])
    model = build_model(preset, torch.device("cpu"))
    vectors = m2iv.M2IV.random_like(model, seed=0)
    inputs, _ = make_inputs(preset, model, 0)
    icl.check_fused_equals_hooks(model, vectors, inputs, "torch")
    monkeypatch.setattr(icl, "add_steering_hooks",
                        lambda m, v, i=None: add_steering_hooks(m, v.scale(1.5), i))
    with pytest.raises(RuntimeError, match="correctness guard failed"):
        icl.check_fused_equals_hooks(model, vectors, inputs, "torch")


def test_hooks_find_only_language_layers():
    preset = apply_overrides(PRESETS["cpu-tiny"], ["text.num_hidden_layers=3"])
    model = build_model(preset, torch.device("cpu"))
    assert sorted(decoder_layers(model)) == [0, 1, 2]
