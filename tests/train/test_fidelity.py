"""Method fidelity on the digits testbed (issue 9): distilled vectors beat zero-shot on a
held-out label map, and the benchmark's aggregation / table / plot code works."""
import argparse
import json
import os

import pytest

torch = pytest.importorskip("torch")

from benchmarks import fidelity  # noqa: E402


def _ckpt_or_skip():
    from m2iv.testbed.model import checkpoint_paths
    if not os.path.exists(checkpoint_paths("1tok")[0]):
        pytest.skip("the digits testbed checkpoint is not built yet")


def test_distilled_vectors_beat_zero_shot_on_heldout_map(tmp_path):
    """CI-sized: 16-shot M2IV on heldout0 (~100 eval queries) beats zero-shot by > 25 points."""
    _ckpt_or_skip()
    torch.set_num_threads(1)
    from m2iv import cli_train
    parser = argparse.ArgumentParser(prog="m2iv")
    cli_train.add_parsers(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0

    data = str(tmp_path / "digits")
    run("data", "make-digits", data, "--map", "heldout0", "--eval-size", "100")
    out = str(tmp_path / "v.safetensors")
    run("train", "--data", data, "--model", "testbed-1tok", "--shots", "16", "--steps", "300",
        "--lr", "0.1", "--eval-every", "0", "--backend", "torch", "--threads", "1",
        "--no-progress", "--out", out)
    res_path = str(tmp_path / "eval.json")
    run("eval", "--data", data, "--model", "testbed-1tok", "--vectors", f"m2iv={out}",
        "--shots", "0", "--backend", "torch", "--threads", "1", "--out", res_path)
    acc = fidelity._vector_accs(json.loads(open(res_path).read()))
    assert acc["m2iv"] > acc["zero-shot"] + 25, acc


def test_aggregate_table_and_plot_on_fake_result(tmp_path):
    fake = {"config": {"seeds": [0, 1]},
            "maps": {"heldout0": {"icl-random": {"0": [10, 12], "16": [85, 87]},
                                  "icl-balanced": {"0": [10, 12], "16": [94, 95]},
                                  "m2iv-16shot": [80.0, 84.0], "_wall_s": [1.0]},
                     "succ": {"icl-random": {"0": [27, 27], "16": [95, 96]},
                              "m2iv-16shot": [90.0]}}}
    rows = fidelity.aggregate(fake)
    r = {(x["map"], x["row"], x["k"]): x for x in rows}
    assert r[("heldout0", "m2iv-16shot", None)]["mean"] == pytest.approx(82.0)
    assert r[("heldout0", "m2iv-16shot", None)]["std"] == pytest.approx(2 ** 1.5)
    assert r[("succ", "m2iv-16shot", None)]["std"] == 0.0
    assert r[("heldout0", "icl-balanced", 16)]["mean"] == pytest.approx(94.5)
    assert r[("succ", "icl-random", 0)]["setting"] == "b"
    assert not any(x["row"].startswith("_") for x in rows)
    assert "82.0 ± 2.8" in fidelity.format_table(rows)
    files = fidelity.write(fake, tmp_path, date="test")
    assert os.path.getsize(files["png"]) > 1000
    assert json.load(open(files["json"]))["rows"]
    assert open(files["csv"]).readline().startswith("map,setting,row,k")


def test_vector_accs_parses_eval_json():
    j = {"rows": [{"method": "zero-shot", "accuracy": 0.1}, {"method": "m2iv", "accuracy": 0.83}]}
    assert fidelity._vector_accs(j) == {"zero-shot": pytest.approx(10.0), "m2iv": pytest.approx(83.0)}
