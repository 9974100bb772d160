"""The plateau rule: it decays the learning rate, then stops, keeps the best evaluated vectors,
and the reason lands in the log and the vectors' metadata."""
from __future__ import annotations

import json

import pytest
import torch

from m2iv import M2IV
from m2iv.prompts import make_prompt_builder
from m2iv.testing import build_offline_processor
from m2iv.train import TrainConfig, train_m2iv
from m2iv.train.stopping import PlateauRule, lr_factor
from tests.train.test_train import sharp_model, synthetic_task


def test_plateau_rule_decays_then_stops_and_keeps_the_best():
    rule = PlateauRule(patience=2, min_delta=0.01, decays=1, decay=0.5)
    p = {"v": torch.zeros(3)}
    seq = [(1.0, "improved"), (0.8, "improved"), (0.795, "wait"),  # < 1 % better: no
           (0.9, "decay"), (0.7, "improved"), (0.71, "wait"), (0.75, "stop")]
    for step, (kl, want) in enumerate(seq, 1):
        p["v"].fill_(step)
        assert rule.update(step, kl, 1 - kl, p) == want, (step, kl)
    assert rule.stopped and rule.lr_mult == 0.5 and rule.decays_done == 1
    assert rule.best["step"] == 5 and rule.best["kl"] == 0.7
    assert torch.equal(rule.best["vectors"]["v"], torch.full((3,), 5.0))  # a copy, not a view
    # state round trip
    again = PlateauRule(2, 0.01, 1, 0.5)
    again.load_state_dict(rule.state_dict(), "cpu")
    assert again.best["step"] == 5 and again.stopped and again.lr_mult == 0.5
    # patience None never stops
    never = PlateauRule(None, 0.01, 0, 0.5)
    assert all(never.update(i, 1.0, 0.0, p) in ("improved", "wait") for i in range(20))


def test_lr_factor_warmup_plateau_and_cosine():
    kw = dict(warmup=4, total=20, decay_mult=0.3)
    assert [lr_factor(s, schedule="plateau", **kw) for s in (0, 3, 4, 19)] == [0.25, 1.0, 0.3,
                                                                               0.3]
    cos = [lr_factor(s, schedule="cosine", **kw) for s in (4, 12, 20)]
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(0.5) and cos[2] < 1e-9


def test_training_stops_on_plateau_keeps_best_and_says_why(tmp_path):
    """A rising learning rate makes the held-out KL get worse after a few evaluations: the run
    must stop, return the best evaluated vectors, and record why in metadata and log."""
    torch.set_num_threads(1)
    model = sharp_model("llava")
    b = make_prompt_builder(model, build_offline_processor(model))
    task = synthetic_task()
    log = tmp_path / "log.json"
    res = train_m2iv(model, task, b, TrainConfig(
        shots=2, teacher_sets=2, steps=200, batch_size=8, lr=3.0, warmup=0, eval_every=2,
        val_queries=16, patience=2, plateau_decays=1, plateau_decay=0.5, eval_queries=16,
        ce_weight=0.0, backend="torch", progress=False, log_path=str(log)))
    assert res.stop_reason == "plateau" and res.steps < 200
    stop = res.vectors.meta["training"]["stop"]
    assert stop["reason"] == "plateau" and stop["step"] == res.steps
    assert stop["lr_decays"] == 1 and stop["val_queries"] == 16
    evals = [r for r in res.history if "val_kl" in r]
    best = [r for r in evals if r["plateau"] == "improved"][-1]  # the last real improvement
    assert best["val_kl"] <= min(r["val_kl"] for r in evals) / (1 - 0.01)
    assert stop["kept_step"] == best["step"] and stop["best_val_kl"] == best["val_kl"]
    assert [r["plateau"] for r in evals].count("decay") == 1 and evals[-1]["plateau"] == "stop"
    # the returned vectors are the kept ones: re-evaluating them gives the kept held-out KL
    from m2iv.train import Distiller

    d = Distiller(model, task, b, TrainConfig(shots=2, teacher_sets=2, steps=0, eval_every=2,
                                              val_queries=16, backend="torch",
                                              progress=False))
    try:
        assert d.evaluate(res.vectors, items=d.val_items)["kl"] == pytest.approx(
            best["val_kl"], rel=1e-5)
    finally:
        d.close()
    doc = json.loads(log.read_text())
    assert doc["stop"]["reason"] == "plateau" and doc["final"]["stop_reason"] == "plateau"
    assert res.metrics["best_step"] == best["step"]
    path = tmp_path / "v.safetensors"
    res.vectors.save(path)
    assert M2IV.load(path).meta["training"]["stop"]["reason"] == "plateau"
