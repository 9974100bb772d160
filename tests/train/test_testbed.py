"""The ICL testbed: data-sampler invariants, prompt layout, the shipped checkpoint's ICL curve."""
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from m2iv.testbed import (BOS_ID, IMAGE_ID, LABEL_OFFSET, TestbedTask, build_model,  # noqa: E402
                          evaluate_icl, family_maps, get_data, heldout_maps, label_logits,
                          load_testbed)
from m2iv.testbed.data import (Curriculum, EpisodeSampler, label_positions,  # noqa: E402
                               map_key, sample_balanced_classes)
from m2iv.testbed.model import CHECKPOINT_DIR, checkpoint_paths  # noqa: E402


# ---------------------------------------------------------------------------------- data
def test_splits_are_disjoint_stratified_and_fixed():
    d = get_data()
    s = d.split_indices
    assert {k: len(v) for k, v in s.items()} == {"train": 1079, "demo": 359, "test": 359}
    allix = torch.cat(list(s.values()))
    assert len(allix.unique()) == len(d.images) == 1797
    for name, ix in s.items():
        counts = torch.bincount(d.digits[ix], minlength=10)
        assert counts.min() >= (30 if name != "train" else 100), (name, counts)
    assert d.images.shape == (1797, 1, 8, 8)
    tr = d.images[s["train"]]
    assert tr.mean().abs() < 1e-3  # standardised on the train split


def test_heldout_maps_are_fixed_permutations_outside_the_family():
    held = heldout_maps()
    assert len(held) == 8 and len({map_key(m) for m in held}) == 8
    fam = {map_key(m) for m in family_maps().values()}
    for m in held:
        assert sorted(m.tolist()) == list(range(10))
        assert map_key(m) not in fam
    assert [m.tolist() for m in held] == [m.tolist() for m in heldout_maps()]  # deterministic


@pytest.mark.parametrize("P", [1, 4])
def test_training_episode_layout(P):
    sampler = EpisodeSampler(P, Curriculum(), seed=3)
    for step in (0, 1000, 2500):
        b = sampler.sample(step, 8)
        ids, tgt = b["input_ids"], b["targets"]
        n = b["digits"].shape[1]
        assert n == 17
        assert ids.shape == (8, 1 + n * (P + 1))
        assert (ids[:, 0] == BOS_ID).all()
        pairs = ids[:, 1:].reshape(8, n, P + 1)
        assert (pairs[:, :, :P] == IMAGE_ID).all()
        assert torch.equal(pairs[:, :, P] - LABEL_OFFSET, b["labels"])
        assert torch.equal(b["labels"], torch.gather(b["maps"], 1, b["digits"]))
        assert b["pixel_values"].shape == (8 * n, 1, 8, 8)
        # a loss on every label from the second pair on, predicted from the last image token
        pos = label_positions(n, P)
        assert (ids[:, pos + 1] >= LABEL_OFFSET).all()
        assert (tgt[:, pos[0]] == -100).all()
        assert torch.equal(tgt[:, pos[1:]], ids[:, pos[1:] + 1])
        assert int((tgt != -100).sum()) == 8 * (n - 1)
    short = EpisodeSampler(P, Curriculum(short_until=1000), seed=3).sample(0, 2)
    assert short["digits"].shape[1] == 9


def test_training_never_sees_heldout_images_or_maps():
    d = get_data()
    train = set(d.split_indices["train"].tolist())
    sampler = EpisodeSampler(1, Curriculum(), seed=0)
    heldout = {map_key(m) for m in heldout_maps()}
    fam = {map_key(m) for m in family_maps().values()}
    n_family = n_eps = 0
    for step in range(0, 3000, 150):
        b = sampler.sample(step, 32)
        assert set(b["image_indices"].reshape(-1).tolist()) <= train
        for m, f in zip(b["maps"], b["is_family"]):
            assert map_key(m) not in heldout
            assert (map_key(m) in fam) == bool(f) or not f
            n_family += int(f)
            n_eps += 1
    assert 0.15 < n_family / n_eps < 0.35  # FAMILY_FRACTION = 0.25
    # the rejection itself: force the next random permutation to be a held-out map
    s = EpisodeSampler(1, Curriculum(family_fraction=0.0), seed=5)
    state = s.g.get_state()
    torch.rand((), generator=s.g)
    nxt = torch.randperm(10, generator=s.g)
    s.g.set_state(state)
    s.heldout.add(map_key(nxt))
    m, is_family = s.sample_map()
    assert not is_family and map_key(m) != map_key(nxt) and s.rejected == 1


def test_bursty_and_prototype_schedule():
    c = Curriculum()
    assert c.p_bursty(0) == 1.0 and abs(c.p_bursty(3000) - 0.3) < 1e-9
    assert c.p_proto(399) == 1.0 and c.p_proto(1600) == 0.0 and 0 < c.p_proto(1000) < 1
    assert c.p_shift(c.unfreeze_step) == 0.0  # shifts start later than unfreezing
    s = EpisodeSampler(1, c, seed=0)
    b = s.sample(0, 16)  # all bursty, all prototypes
    assert max(len(r.unique()) for r in b["digits"]) <= 3
    d = get_data()
    assert torch.equal(b["pixel_values"], d.prototypes[b["digits"].reshape(-1)])


def test_balanced_classes():
    g = torch.Generator().manual_seed(0)
    for k in (1, 4, 9, 10, 16, 20):
        cls = sample_balanced_classes(k, g)
        cnt = torch.bincount(cls, minlength=10)
        assert len(cls) == k and cnt.max() - cnt.min() <= 1


# ------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("variant", ["1tok", "4tok"])
def test_prompt_api_layout_and_forward(variant):
    task = TestbedTask(variant)
    P = task.tokens_per_image
    d = get_data()
    teacher, student = task.sample_prompts("heldout3", k=16, batch_size=5, seed=1, balanced=True)
    assert torch.equal(teacher.query_indices, student.query_indices)
    assert teacher.input_ids.shape == (5, 1 + 16 * (P + 1) + P) and teacher.k == 16
    assert student.input_ids.shape == (5, 1 + P) and student.k == 0
    assert teacher.pixel_values.shape == (5 * 17, 1, 8, 8)
    assert student.pixel_values.shape == (5, 1, 8, 8)
    assert torch.equal(student.pixel_values, d.images[student.query_indices])
    m = task.label_map("heldout3")
    assert torch.equal(teacher.answer_labels, m[d.digits[teacher.query_indices]])
    assert torch.equal(teacher.answer_tokens, teacher.answer_labels + LABEL_OFFSET)
    assert (teacher.answer_positions == teacher.input_ids.shape[1] - 1).all()
    for row in teacher.demo_indices:  # balanced 16-shot covers every class
        assert len(d.digits[row].unique()) == 10
    assert set(teacher.demo_indices.reshape(-1).tolist()) <= set(task.split("demo").tolist())
    assert set(teacher.query_indices.tolist()) <= set(task.split("test").tolist())
    model = build_model(variant)
    with torch.no_grad():
        assert label_logits(model, teacher).shape == (5, 10)
        assert label_logits(model, student).shape == (5, 10)


def test_pool_and_same_split_exclusion():
    task = TestbedTask("1tok")
    pool = task.demo_pool(128, seed=0)
    assert len(pool.unique()) == 128
    assert torch.bincount(get_data().digits[pool], minlength=10).min() >= 12
    d = task.sample_demos(50, 16, pool=pool, seed=2)
    assert set(d.reshape(-1).tolist()) <= set(pool.tolist())
    assert all(len(r.unique()) == 16 for r in d)
    q = task.sample_queries(40, split="demo", seed=0)
    for balanced in (False, True):
        d = task.sample_demos(40, 16, split="demo", exclude=q, balanced=balanced, seed=1)
        assert not (d == q[:, None]).any()


# ----------------------------------------------------------------- the shipped checkpoint
@pytest.fixture(scope="module")
def testbed():
    if not os.path.exists(checkpoint_paths("1tok")[0]):
        pytest.skip("no shipped 1tok checkpoint")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_testbed("1tok")


def test_shipped_checkpoint_is_small_safetensors(testbed):
    from transformers import LlavaForConditionalGeneration

    model, task = testbed
    assert type(model) is LlavaForConditionalGeneration
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    files = os.listdir(CHECKPOINT_DIR)
    assert all(f.endswith((".safetensors", ".json", ".md")) for f in files), files
    total = sum(os.path.getsize(os.path.join(CHECKPOINT_DIR, f)) for f in files)
    assert total < 10 * 2 ** 20
    tc = model.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads,
            tc.intermediate_size, tc.vocab_size) == (128, 4, 4, 512, 16)
    extra = model.testbed_config.extra
    if "data" in extra:
        assert extra["data"] == {k: list(v) for k, v in task.data.fingerprint().items()}


def test_shipped_checkpoint_icl_curve_heldout_maps(testbed):
    """(a) novel mapping: held-out maps, held-out images; 0-shot at chance, rising with k."""
    model, task = testbed
    ks = (0, 4, 16)
    accs = {k: [] for k in ks}
    for name in ("heldout0", "heldout5"):
        r = evaluate_icl(model, task, name, ks=ks, seed=7)
        for k in ks:
            accs[k].append(r[k])
    mean = {k: sum(v) / len(v) for k, v in accs.items()}
    assert mean[0] < 0.25, mean
    assert mean[4] > mean[0] + 0.15, mean
    assert mean[16] > 0.6 and mean[16] > mean[4] + 0.15, mean
    bal = evaluate_icl(model, task, "heldout0", ks=(16,), balanced=True, seed=7)
    assert bal[16] > 0.85, bal


def test_shipped_checkpoint_task_identification(testbed):
    """(b) the family maps: a few demonstrations identify the map beyond class coverage."""
    model, task = testbed
    r = evaluate_icl(model, task, "reverse", ks=(0, 4, 16), seed=7)
    held = evaluate_icl(model, task, "heldout0", ks=(4,), seed=7)
    assert r[0] < 0.5, r
    assert r[16] > 0.8, r
    assert r[4] > held[4] + 0.1, (r, held)


def test_shipped_4tok_checkpoint_if_present():
    """The optional 4-image-token variant, when shipped: loads strictly and does ICL."""
    if not os.path.exists(checkpoint_paths("4tok")[0]):
        pytest.skip("no shipped 4tok checkpoint")
    model, task = load_testbed("4tok")
    assert task.tokens_per_image == 4
    r = evaluate_icl(model, task, "heldout2", ks=(0, 16), seed=7)
    assert r[0] < 0.25 and r[16] > 0.6, r
