"""Smoke runs of the benchmarks: they run, guard correctness and write their files."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import kernels
from m2iv.bench import common, icl
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


def test_interleaved_rotates_modes_and_ratios_are_per_repetition():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    s = common.interleaved(fns, torch.device("cpu"), reps=3, warmup=1)
    assert order == list("abc" "bca" "cab" "abc")  # warm-up, then rotated repetitions
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in s.values())
    # per-repetition ratios 3, 1, 5: median 3 (the ratio of the medians would be 4 / 2 = 2)
    st = common.ratio_stats([3.0, 4.0, 10.0], [1.0, 4.0, 2.0])
    assert st == {"median": 3.0, "p25": 1.0, "p75": 5.0}
    assert common.flag_noise({"median": 0.95, "p25": 0.80, "p75": 1.10}).startswith("NOISY")
    assert common.flag_noise({"median": 0.80, "p25": 0.78, "p75": 0.83}) == ""
    timed = common.interleaved({"x": lambda: 0.25}, torch.device("cpu"), reps=2, inner=2,
                               self_timed=True)
    assert timed["x"] == [0.25, 0.25]


def test_lockstep_decode_alternates_tokens_and_keeps_the_recompile_limits():
    """The modes take turns token by token, and each generate() thread sees the caller's
    Dynamo recompile limits (Dynamo's config is per thread)."""
    import torch._dynamo

    from m2iv.bench.overhead import lockstep_decode

    order, seen = [], {}

    class Fake:
        def __init__(self, name):
            self.name = name

        def generate(self, input_ids, max_new_tokens, stopping_criteria, **kwargs):
            seen[self.name] = torch._dynamo.config.recompile_limit
            for _ in range(max_new_tokens):
                order.append(self.name)
                stopping_criteria[0](input_ids, None)

    # config.patch, not monkeypatch: its undo would delattr (hide) the config entry
    with torch._dynamo.config.patch(recompile_limit=77):
        spent = lockstep_decode({"a": Fake("a"), "b": Fake("b")},
                                {"input_ids": torch.ones(1, 2)}, steps=2,
                                device=torch.device("cpu"))
    assert order == list("ababab") and set(spent) == {"a", "b"}
    assert seen == {"a": 77, "b": 77}


def test_compiled_hooks_twin_runs_its_own_graph():
    """The unsteered and hooks twins share one code object: with Dynamo's default (no guards on
    module hooks) the compiled hooks twin would run the unsteered graph; _compile turns hook
    guards on, and check_compiled catches a compiled mode that lost its steering."""
    import torch._dynamo

    import m2iv
    from m2iv.bench import overhead
    from m2iv.bench.modes import steered_twins

    preset = apply_overrides(PRESETS["cpu-tiny"], ["text.num_hidden_layers=2"])
    model = build_model(preset, torch.device("cpu"))
    vectors = m2iv.M2IV.random_like(model, seed=0)
    inputs, _ = make_inputs(preset, model, 0)
    models, remove = steered_twins(model, vectors, modes=("unsteered", "hooks"))
    eager = {m: overhead.prefill_call(mm, inputs)().logits for m, mm in models.items()}
    torch._dynamo.reset()
    undo = overhead._compile(models, backend="eager")
    try:
        overhead.prefill_call(models["unsteered"], inputs)()  # the unsteered graph first
        overhead.check_compiled(models, inputs, eager)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
            overhead.prefill_call(models["unsteered"], inputs)()
            with pytest.raises(RuntimeError, match="does not steer like eager 'hooks'"):
                overhead.check_compiled(models, inputs, eager)
    finally:
        undo()
        remove()
        torch._dynamo.reset()


def test_runs_never_write_into_committed_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = common.results_dir("x")
    a.mkdir(parents=True)
    assert a.parts[0] == "runs" and a.name.startswith("x-") and common.results_dir("x") != a
    js, _ = common.write_results("stem", [{"k": 1}], {})
    assert js.parent.parts[0] == "runs" and js.is_file()


def test_steering_cost_smoke(tmp_path):
    """benchmarks.patched: interleaved unsteered / fused / hooks, eager, files in --out."""
    from benchmarks import patched

    rows = patched.main(["--smoke", "--eager-only", "--out", str(tmp_path), "--no-plots"])
    assert [(r["phase"], r["batch"], r["exec"]) for r in rows] == \
        [("prefill", 1, "eager"), ("decode", 1, "eager")]
    for r in rows:
        assert r["unsteered_ms"] > 0 and r["fused_ms"] > 0 and r["hooks_ms"] > 0
        assert r["fused/unsteered_p25"] <= r["fused/unsteered"] <= r["fused/unsteered_p75"]
        assert r["recompiles"] is None
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".csv"}


def test_host_benchmark_smoke(tmp_path):
    from benchmarks import host

    rows = host.main(["--reps", "2", "--inner", "4", "--out", str(tmp_path)])
    ops = {r["case"]: r for r in rows if r["part"] == "op"}
    assert set(ops) == {f"{op} {v}" for op in ("steer_add_rmsnorm", "steer_add", "head_steer")
                        for v in ("plain", "mask+index")}
    assert all(r["prepared_us"] > 0 and r["public_us"] > 0 for r in ops.values())
    layer = next(r for r in rows if r["part"] == "layer")
    assert layer["fused_us"] > 0 and layer["hooks/unsteered"] > 0


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
    costs = {(c["phase"], c["batch"], c["exec"]) for c in result["costs"]}
    assert costs == {(p, b, "eager") for p in ("prefill", "decode") for b in (1, 2)}
    assert all(c["fused/unsteered"] > 0 and c["fused/hooks"] > 0 for c in result["costs"])
    names = {p.name for p in out.iterdir()}
    assert any(n.endswith(".json") for n in names) and any(n.endswith(".csv") for n in names)
    assert any(n.endswith("-latency.png") for n in names)
    assert any(n.endswith("-overhead.png") for n in names)
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
