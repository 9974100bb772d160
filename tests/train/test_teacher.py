"""The many-shot teacher and the data it sees: the averaged target is the mean of the k-shot
answer distributions (checked against an explicit computation), batching does not change it,
it is computed once per query, and demonstration sets / balanced demonstrations / held-out
validation queries are what the sampler claims."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from m2iv.prompts import make_prompt_builder
from m2iv.testing import build_offline_processor
from m2iv.train import Distiller, Sampler, TrainConfig, mean_answer_log_probs
from tests.train.test_train import sharp_model, synthetic_task

CFG = dict(shots=2, teacher_sets=5, steps=0, eval_every=0, progress=False, backend="torch")


@pytest.fixture(scope="module")
def llava():
    torch.set_num_threads(1)
    m = sharp_model("llava")
    return m, make_prompt_builder(m, build_offline_processor(m))


@pytest.fixture(scope="module")
def task():
    return synthetic_task()


def test_mean_answer_log_probs_is_log_of_mean_probabilities():
    z = torch.randn(7, 3, 11)
    for tau in (1.0, 2.0):
        want = torch.softmax(z / tau, -1).mean(0).log()
        torch.testing.assert_close(mean_answer_log_probs(z, tau), want, rtol=1e-5, atol=1e-6)
    # one set: the plain log-softmax
    torch.testing.assert_close(mean_answer_log_probs(z[:1]), torch.log_softmax(z[0], -1))


def test_teacher_target_equals_explicit_mean_over_demonstration_sets(llava, task):
    """The target is log(mean_j p(answer | demos_j, query)) over the query's m sets, each a
    separate k-shot forward of the unpatched model."""
    model, b = llava
    d = Distiller(model, task, b, TrainConfig(**CFG, temperature=1.5))
    try:
        queries = d.train_items[:3]
        got = d.teacher.targets(queries)
        sets = [d.sampler.teacher_demos(q, 5) for q in queries]
    finally:
        d.close()
    for qi, q in enumerate(queries):
        assert len(sets[qi]) == 5 and all(len(s) == 2 for s in sets[qi])
        assert len({tuple(it.id for it in s) for s in sets[qi]}) > 1  # different sets
        probs = []
        for demos in sets[qi]:
            enc = b.encode([q], [demos], with_answer=True)
            with torch.no_grad():
                logits = model(**enc.inputs, use_cache=False).logits[0]
            pos = enc.answer_positions[0][enc.answer_mask[0]]
            probs.append(torch.softmax(logits[pos].float() / 1.5, -1))
        want = torch.stack(probs).mean(0).log()
        n = want.shape[0]
        assert torch.equal(got["answer_ids"][qi, :n], enc.answer_ids[0, :n])
        torch.testing.assert_close(got["logp"][qi, :n], want, rtol=1e-4, atol=1e-5)


def test_teacher_batching_does_not_change_targets_and_runs_once(llava, task):
    model, b = llava
    out = {}
    for tb in (1, 7, 64):
        d = Distiller(model, task, b, TrainConfig(**CFG, teacher_batch_size=tb))
        try:
            q = d.train_items[:9]
            out[tb] = d.teacher.targets(q)
            assert d.teacher.forwards == 9 * 5
            again = d.teacher.targets(q[2:6])  # memoised: no forward
            assert d.teacher.forwards == 9 * 5
            torch.testing.assert_close(again["logp"], out[tb]["logp"][2:6], rtol=0, atol=0)
        finally:
            d.close()
    for tb in (7, 64):
        assert torch.equal(out[tb]["answer_ids"], out[1]["answer_ids"])
        torch.testing.assert_close(out[tb]["logp"], out[1]["logp"], rtol=1e-5, atol=1e-5)


def test_teacher_sets_are_fixed_per_query_and_nested(task):
    """Set j of a query is the same whatever the number of sets and across epochs."""
    s = Sampler(task, shots=3, seed=4)
    q = task.train[5]
    a, b = s.teacher_demos(q, 4), s.teacher_demos(q, 8)
    assert [[it.id for it in x] for x in a] == [[it.id for it in x] for x in b[:4]]
    for demos in b:
        assert len({it.id for it in demos}) == 3 and q.id not in {it.id for it in demos}
    other = Sampler(task, shots=3, seed=5).teacher_demos(q, 4)
    assert [[it.id for it in x] for x in other] != [[it.id for it in x] for x in a]


def test_balanced_demos_cover_every_answer_equally(task):
    s = Sampler(task, shots=8, seed=0)
    for demos in s.demos(task.eval[:10], 8, "t", balanced=True):
        counts = Counter(it.answer for it in demos)
        assert sorted(counts.values()) == [2, 2, 2, 2] and len(demos) == 8
    for demos in s.demos(task.eval[:10], 6, "t", balanced=True):  # 6 = 4 + 2 extra answers
        assert sorted(Counter(it.answer for it in demos).values()) == [1, 1, 2, 2]


def test_validation_queries_are_held_out_of_training(task):
    s = Sampler(task, shots=2, seed=1, val_queries=10)
    val, train = {it.id for it in s.val}, {it.id for it in s.train}
    assert len(val) == 10 and not val & train and len(val | train) == len(task.train)
    stream = {it.id for it in s.queries(0, 3 * len(s.train))}
    assert stream == train
    small = Sampler(task, shots=2, seed=1, val_queries=1000)  # at most a quarter held out
    assert len(small.val) == len(task.train) // 4
    assert math.isclose(len(small.train), len(task.train) * 3 / 4, abs_tol=1)
