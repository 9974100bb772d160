"""Distillation, baselines, evaluation and the train/eval CLI on tiny random-weight LVLMs.

The tiny models' weights are sharpened (language-model matrices x3, lm_head x10) so that the
k-shot teacher's next-token distribution differs clearly from the zero-shot one (with the
default 0.02 init every distribution is nearly uniform and the KL is ~1e-4). The tests train
with the mimicry KL and the synergy term only: the synthetic answers carry no meaning for a
random model, so the CE term would pull away from the teacher.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from m2iv import M2IV
from m2iv.data import TaskData
from m2iv.prompts import make_prompt_builder
from m2iv.train import Distiller, TeacherCache, TrainConfig, train_m2iv
from m2iv.train.baselines import mean_activation_vectors, train_method
from m2iv.train.evaluate import compare, exact_match, format_table, vqa_normalize
from m2iv.testing import build, build_offline_processor

FAST = dict(batch_size=8, eval_queries=24, progress=False, backend="torch", ce_weight=0.0,
            lr=0.05)


def synthetic_records(n: int = 160, seed: int = 0) -> list[dict]:
    """4 classes of noisy 8x8 prototypes; answers 'aa'..'dd'; splits pool/train/eval."""
    rng = np.random.RandomState(seed)
    protos = rng.rand(4, 8, 8)
    recs = []
    for i in range(n):
        c = i % 4
        img = np.clip(protos[c] + 0.3 * rng.randn(8, 8), 0, 1)
        split = ("pool", "train", "train", "eval")[(i // 4) % 4]
        recs.append({"image": Image.fromarray((img * 255).astype("uint8"), mode="L"),
                     "question": "which?", "answer": "abcd"[c] * 2, "split": split,
                     "id": f"s{i}"})
    return recs


def synthetic_task(n: int = 160) -> TaskData:
    return TaskData.from_items(synthetic_records(n), name="synthetic")


def sharp_model(family: str):
    model = build(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
        model.lm_head.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def task():
    return synthetic_task()


@pytest.fixture(scope="module")
def llava():
    m = sharp_model("llava")
    return m, make_prompt_builder(m, build_offline_processor(m))


# --------------------------------------------------------------------------- the main claims
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kl_halved_and_beats_mean_activation(family, task):
    model = sharp_model(family)
    b = make_prompt_builder(model, build_offline_processor(model, chat_template="default"))
    res = train_m2iv(model, task, b, TrainConfig(shots=4, steps=40, eval_every=0, **FAST))
    m = res.metrics
    assert m["eval_kl"] <= 0.5 * m["zero_kl"], m
    mav = mean_activation_vectors(model, task, b, shots=4, n_prompts=32)
    d = Distiller(model, task, b, TrainConfig(shots=4, steps=0, **FAST))
    try:
        mav_kl = d.evaluate(mav)["kl"]
        again = d.evaluate(res.vectors)["kl"]
    finally:
        d.close()
    assert m["eval_kl"] < mav_kl, (m["eval_kl"], mav_kl)
    assert again == pytest.approx(m["eval_kl"], rel=1e-5)
    # metadata: everything needed to know what the file is
    meta = res.vectors.meta
    assert meta["task"] == "synthetic" and meta["shots"] == 4 and meta["pool_size"] == 40
    assert meta["losses"]["kl_weight"] == 1.0 and meta["metrics"]["zero_kl"] == m["zero_kl"]
    assert meta["model_type"] == family
    print(f"\n{family}: held-out KL zero vectors {m['zero_kl']:.4f} -> M2IV {m['eval_kl']:.4f} "
          f"({100 * m['kl_reduction']:.0f}% less); mean-activation {mav_kl:.4f}")


def _grads(model, b, task, backend, vectors):
    d = Distiller(model, task, b, TrainConfig(shots=2, steps=1, backend=backend, batch_size=2,
                                              eval_queries=0, progress=False),
                  init=vectors)
    try:
        q = d.sample_batch(0, 0)
        d.batch_losses(q, len(q))["loss_tensor"].backward()
        return {k: p.grad.clone() for k, p in d.params.items()}
    finally:
        d.close()


@pytest.mark.parametrize("family", ["llava", "gemma3"])  # fold mode and head (sandwich) mode
def test_gradients_reach_vectors_and_gates_every_backend(family, task):
    import m2iv_kernels as mk

    model = sharp_model(family)
    b = make_prompt_builder(model, build_offline_processor(model))
    small = TaskData.from_items(synthetic_records(24), name="small")
    v = M2IV.random_like(model, seed=1).scale(0.3)
    backends = [n for n, ok in mk.available_backends().items() if ok is True]
    assert "torch" in backends and "triton" in backends
    ref = _grads(model, b, small, "torch", v)
    for name, g in ref.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    for be in backends:
        if be == "torch":
            continue
        got = _grads(model, b, small, be, v)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-3, atol=1e-5,
                                       msg=lambda m, n=name, be=be: f"{be} {n}: {m}")


def test_resume_equals_uninterrupted(llava, task, tmp_path):
    model, b = llava
    cfg = TrainConfig(shots=2, steps=6, eval_every=3, checkpoint_every=3, synergy="both",
                      **FAST)
    full = Distiller(model, task, b, cfg, checkpoint_path=str(tmp_path / "full.ckpt"))
    r_full = full.train()
    full.close()
    part = Distiller(model, task, b, cfg, steps=6, checkpoint_path=str(tmp_path / "p.ckpt"))
    for _ in range(3):  # "interrupted" after the step-3 checkpoint
        part.train_step()
    part.validate()
    part.save_checkpoint(str(tmp_path / "p.ckpt"))
    part.close()
    resumed = Distiller(model, task, b, cfg, checkpoint_path=str(tmp_path / "p.ckpt"))
    resumed.load_checkpoint(str(tmp_path / "p.ckpt"))
    assert resumed.step == 3
    r_res = resumed.train()
    resumed.close()
    for name in ("mha", "mha_gates", "mlp", "mlp_gates"):
        torch.testing.assert_close(getattr(r_res.vectors, name), getattr(r_full.vectors, name),
                                   rtol=0, atol=0)
    assert [h["kl"] for h in r_res.history] == [h["kl"] for h in r_full.history]
    assert r_res.metrics["eval_kl"] == r_full.metrics["eval_kl"]


def test_grad_accum_matches_big_batch(llava, task):
    model, b = llava
    out = []
    for bs, acc in ((8, 1), (4, 2), (2, 4)):
        d = Distiller(model, task, b, TrainConfig(shots=2, steps=2, batch_size=bs, grad_accum=acc,
                                                  eval_queries=0, progress=False,
                                                  backend="torch", lr=0.05))
        d.train_step()
        d.train_step()
        out.append(d.current_vectors(best=False))
        d.close()
    for o in out[1:]:
        torch.testing.assert_close(o.mlp, out[0].mlp, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(o.mha, out[0].mha, rtol=1e-4, atol=1e-6)


def test_teacher_cache_reused(llava, task, tmp_path):
    model, b = llava
    cfg = TrainConfig(shots=2, steps=3, eval_every=0, cache_dir=str(tmp_path / "c"),
                      synergy="both", **FAST)
    r1 = train_m2iv(model, task, b, cfg)
    first = r1.metrics["teacher_cache"]
    assert first["hits"] == 0 and first["writes"] == first["misses"] > 0
    r2 = train_m2iv(model, task, b, cfg)
    second = r2.metrics["teacher_cache"]
    assert second["misses"] == 0 and second["writes"] == 0 and second["hits"] == first["writes"]
    torch.testing.assert_close(r2.vectors.mlp, r1.vectors.mlp, rtol=0, atol=0)
    # a corrupt entry is recomputed, not fatal
    f = next(p for p in (tmp_path / "c").rglob("*.safetensors"))
    f.write_bytes(b"garbage")
    c = TeacherCache(tmp_path / "c")
    assert c.get(f.stem) is None


def test_logs_early_stopping_and_baseline_subsets(llava, task, tmp_path):
    model, b = llava
    log, png = tmp_path / "log.json", tmp_path / "loss.png"
    res = train_m2iv(model, task, b, TrainConfig(
        shots=2, steps=20, eval_every=2, patience=2, min_delta=1e9, plateau_decays=0,
        log_path=str(log), plot_path=str(png), **FAST))
    assert res.stopped_early and res.steps == 6  # best at step 2, no improvement at 4 and 6
    doc = json.loads(log.read_text())
    assert doc["final"]["stopped_early"] and len(doc["history"]) == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = TrainConfig(shots=2, steps=2, eval_every=0, **FAST)
    live = train_method("live", model, task, b, cfg).vectors
    assert live.mha.abs().sum() == 0 and (live.mha_gates == 1).all() and live.mlp.abs().sum() > 0
    assert live.meta["method"] == "live" and live.meta["losses"]["synergy_weight"] == 0.0
    mha = train_method("mha-only", model, task, b, cfg).vectors
    assert mha.mlp.abs().sum() == 0 and mha.mha.abs().sum() > 0
    mlp = train_method("mlp-only", model, task, b, cfg).vectors
    assert mlp.mha.abs().sum() == 0 and mlp.mlp.abs().sum() > 0
    fv = mean_activation_vectors(model, task, b, shots=2, n_prompts=8, branches="mha")
    assert fv.mlp.abs().sum() == 0 and fv.mha.abs().sum() > 0
    assert fv.meta["method"] == "mean-activation"


def test_config_and_data_errors(llava, task):
    model, b = llava
    with pytest.raises(ValueError, match="shots must be >= 1"):
        TrainConfig(shots=0)
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig(train_mha=False, train_mlp=False)
    with pytest.raises(ValueError, match="pool_size=999 is more than"):
        Distiller(model, task, b, TrainConfig(shots=2, pool_size=999))
    no_train = TaskData.from_items([r for r in synthetic_records(16) if r["split"] != "train"])
    with pytest.raises(ValueError, match="train"):
        Distiller(model, no_train, b, TrainConfig(shots=2))


# --------------------------------------------------------------------------- evaluation
def test_vqa_normalize_and_exact_match():
    assert vqa_normalize("  The Two dogs!  ") == "2 dogs"
    assert vqa_normalize("t-shirt") == "t shirt"
    assert vqa_normalize("1,000") == "1000"
    assert vqa_normalize("3.5") == "3.5" and vqa_normalize("yes.") == "yes"
    assert vqa_normalize("dont") == "don't"
    assert exact_match("A cat.", "cat") == 1.0 and exact_match("dog", "cat") == 0.0
    assert exact_match("CAT", "cat", normalize=str) == 0.0  # pluggable


def test_compare_table(llava, task):
    model, b = llava
    v = M2IV.zeros_like(model)
    res = compare(model, task, b, vectors={"zeros": v}, ks=(0, 2), eval_queries=8,
                  max_new_tokens=4, backend="torch", kl_shots=2, keep_predictions=True)
    names = [r["method"] for r in res["rows"]]
    assert names == ["zero-shot", "ICL 2-shot", "zeros"]
    rows = {r["method"]: r for r in res["rows"]}
    # zero vectors generate exactly what the zero-shot model does
    assert res["predictions"]["zeros"] == res["predictions"]["zero-shot"]
    assert rows["zeros"]["kl"] == pytest.approx(rows["zero-shot"]["kl"], abs=1e-6)
    assert rows["ICL 2-shot"]["prompt_tokens"] > rows["zero-shot"]["prompt_tokens"]
    table = format_table(res)
    assert "| ICL 2-shot | 2 |" in table and "KL to teacher" in table
    json.dumps(res)


# --------------------------------------------------------------------------- CLI end to end
def test_cli_train_eval_end_to_end(tmp_path, monkeypatch, capsys):
    """``m2iv data make-digits`` -> ``m2iv train`` -> ``m2iv eval`` on the built-in task."""
    from m2iv.cli import train as cli_train
    from m2iv.testbed.model import checkpoint_paths

    if not os.path.exists(checkpoint_paths("1tok")[0]):
        pytest.skip("the digits testbed checkpoint is not built yet")
    import argparse

    parser = argparse.ArgumentParser(prog="m2iv")
    sub = parser.add_subparsers(dest="command")
    cli_train.add_parsers(sub)

    def run(*argv):
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0

    data = str(tmp_path / "digits")
    run("data", "make-digits", data, "--map", "reverse", "--pool-size", "100",
        "--train-size", "200", "--eval-size", "60")
    out = str(tmp_path / "digits.safetensors")
    run("train", "--data", data, "--shots", "8", "--pool-size", "100", "--steps", "100",
        "--eval-every", "50", "--eval-queries", "60", "--ce-weight", "1.0",
        "--backend", "torch", "--out", out, "--no-progress", "--cache-dir",
        str(tmp_path / "cache"))
    v = M2IV.load(out)
    meta = v.meta
    assert meta["task"] == "digits-reverse" and meta["shots"] == 8 and meta["pool_size"] == 100
    assert meta["metrics"]["eval_kl"] < 0.6 * meta["metrics"]["zero_kl"]
    assert meta["losses"]["ce_weight"] == 1.0 and meta["training"]["steps"] == 100
    assert os.path.exists(str(tmp_path / "digits.log.json"))
    assert os.path.exists(str(tmp_path / "digits.loss.png"))
    res_path = str(tmp_path / "eval.json")
    run("eval", "--data", data, "--vectors", f"m2iv={out}", "--shots", "0,8",
        "--baselines", "mean-activation", "--backend", "torch", "--out", res_path)
    res = json.loads(open(res_path).read())
    acc = {r["method"]: r["accuracy"] for r in res["rows"]}
    assert set(acc) == {"zero-shot", "ICL 8-shot", "m2iv", "mean-activation"}
    assert acc["m2iv"] > acc["zero-shot"] + 0.3, acc
    assert not math.isnan(acc["mean-activation"])
    print("\n" + capsys.readouterr().out)


def test_cli_local_hf_model(tmp_path):
    """``m2iv train/eval --model DIR`` on a saved Hugging Face model + processor (chat
    template), the path real checkpoints take."""
    import argparse

    from m2iv.cli import train as cli_train

    model = sharp_model("llava")
    proc = build_offline_processor(model, chat_template="default")
    model.save_pretrained(tmp_path / "hf")
    proc.save_pretrained(tmp_path / "hf")
    data = tmp_path / "task"
    TaskData.from_items(synthetic_records(64), name="syn").save(data)
    parser = argparse.ArgumentParser(prog="m2iv")
    cli_train.add_parsers(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "v.safetensors")
    common = ["--model", str(tmp_path / "hf"), "--data", str(data), "--backend", "torch"]
    args = parser.parse_args(["train", *common, "--shots", "2", "--steps", "6",
                              "--batch-size", "4", "--eval-queries", "8", "--ce-weight", "0",
                              "--no-progress", "--out", out])
    assert args.func(args) == 0
    v = M2IV.load(out)
    assert v.meta["task"] == "syn" and v.meta["metrics"]["eval_kl"] < v.meta["metrics"]["zero_kl"]
    res = str(tmp_path / "res.json")
    args = parser.parse_args(["eval", *common, "--vectors", out, "--shots", "0,2",
                              "--eval-queries", "8", "--kl-shots", "2", "--out", res])
    assert args.func(args) == 0
    rows = {r["method"]: r for r in json.loads(open(res).read())["rows"]}
    assert set(rows) == {"zero-shot", "ICL 2-shot", "m2iv"}
    assert rows["m2iv"]["kl"] < rows["zero-shot"]["kl"]
