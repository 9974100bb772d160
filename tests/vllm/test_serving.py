"""m2iv steering on vLLM (eager engines): equality with ``patch_model`` on the HF model, mixed
batches, per-request strength, bit-identical unsteered requests, prefix caching, bad requests."""
import math

import pytest
import torch

import m2iv

from .conftest import make_llm, m2iv_config
from .helpers import assert_close, hf_greedy, prompt, run

SHORT = [prompt(n, seed) for n, seed in ((5, 1), (9, 2), (3, 3), (12, 4))]
LONG = [prompt(70, 5), prompt(45, 6)]  # > 32 tokens: prefilled in chunks beside decode steps


def _vectors(vectors, fam, name):
    if "/" in name:
        base, row = name.split("/")
        return vectors[fam][base][int(row)]
    return vectors[fam][name]


@pytest.mark.parametrize("name,strength", [("a", 1.0), ("a", 0.4), ("b", -1.5), ("bank/1", 1.0)])
def test_llama_matches_patch_model(llm_steer, hf_models, vectors, name, strength):
    """Steered vLLM == the same vectors through patch_model on the HF model: same tokens,
    logprobs within fp32 noise (vLLM's kernels vs transformers')."""
    hf = hf_models["llama"]
    for ids in (SHORT[1], LONG[0]):
        want = hf_greedy(hf, ids, _vectors(vectors, "llama", name), strength)
        got = run(llm_steer, [ids], [(name, strength)])[0]
        assert_close(got, want, what=f"{name}@{strength}")
        plain = hf_greedy(hf, ids)
        assert got[0] != plain[0] or max(abs(a - b) for a, b in zip(got[1], plain[1])) > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_match_patch_model(family, model_dirs, workdir, vectors, hf_models):
    llm = make_llm(model_dirs[family], m2iv_config(workdir, family))
    ids = SHORT[3]
    for name, strength in (("a", 1.0), (None, None)):
        v = _vectors(vectors, family, name) if name else None
        want = hf_greedy(hf_models[family], ids, v, strength or 1.0)
        assert_close(run(llm, [ids], [(name, strength)])[0], want, what=f"{family} {name}")


def test_library_entry_is_served(model_dirs, workdir, vectors, hf_models):
    lib = m2iv.VLibrary(workdir / "lib")
    lib.add(vectors["llama"]["a"], "formal", tags=["test"])
    cfg = {"m2iv": {"vectors": {"formal": {"library": "formal:1"}}, "library": str(workdir / "lib")}}
    llm = make_llm(model_dirs["llama"], cfg)
    want = hf_greedy(hf_models["llama"], SHORT[0], vectors["llama"]["a"], 0.7)
    assert_close(run(llm, [SHORT[0]], [("formal", 0.7)])[0], want, what="library entry")


MIXED = [  # (prompt, steering): different slots and strengths, unsteered, zero vectors, chunked
    (LONG[0], ("a", 1.0)),
    (SHORT[0], (None, None)),
    (SHORT[1], ("b", 0.5)),
    (LONG[1], (None, None)),
    (SHORT[2], ("a", 2.0)),
    (SHORT[3], ("zero", 1.0)),
    (SHORT[0], ("bank/2", 1.0)),
    (SHORT[1], ("a", 0.0)),
]


def test_mixed_batch_gives_each_request_its_solo_result(llm_steer):
    prompts, steering = zip(*MIXED)
    together = run(llm_steer, prompts, steering)
    for (p, s), got in zip(MIXED, together):
        solo = run(llm_steer, [p], [s])[0]
        assert_close(got, solo, atol=1e-5, what=f"{s} in a mixed batch vs alone")
    assert together[0][0] != together[3][0]  # sanity: the batch really holds different runs


def test_unsteered_requests_are_bit_identical_to_plain_vllm(llm_plain, llm_steer):
    """The same mixed batch on an engine without m2iv: every request that is unsteered (no
    vectors, strength 0, or the all-zero vectors) gets exactly the same tokens and logprobs."""
    prompts, steering = zip(*MIXED)
    steered = run(llm_steer, prompts, steering)
    plain = run(llm_plain, prompts, [(None, None)] * len(prompts))
    unsteered = [i for i, (_, s) in enumerate(MIXED) if s[0] in (None, "zero") or s[1] == 0.0]
    assert len(unsteered) == 4
    for i in unsteered:
        assert steered[i][:2] == plain[i][:2], f"request {i} {MIXED[i][1]} differs from plain vLLM"
    for i in set(range(len(MIXED))) - set(unsteered):
        assert steered[i][:2] != plain[i][:2], f"request {i} {MIXED[i][1]} was not steered"


def test_strength_scales_steering(llm_steer, hf_models, vectors):
    """Per-request strength is patch_model's strength: a sweep in one batch matches HF."""
    strengths = [0.25, 0.5, 1.0, 3.0]
    got = run(llm_steer, [SHORT[3]] * 4, [("a", s) for s in strengths])
    for s, g in zip(strengths, got):
        assert_close(g, hf_greedy(hf_models["llama"], SHORT[3], vectors["llama"]["a"], s),
                     what=f"strength {s}")
    assert len({tuple(g[0]) for g in got}) > 1


# --------------------------------------------------------------------------- prefix caching

PREFIX = prompt(80, 9)  # two full 32-token blocks (the last is never read from the cache)


def test_prefix_cache_salted_per_steering(llm_steer, llm_plain):
    """"salt": identical steered requests share cached blocks; blocks computed under other
    steering (or none) are never reused."""
    first = run(llm_steer, [PREFIX], [("a", 1.0)])[0]
    again = run(llm_steer, [PREFIX], [("a", 1.0)])[0]
    assert again[2] > 0, "an identical steered request should hit the prefix cache"
    assert_close(again, first, atol=1e-5, what="cached steered prefix")
    other = run(llm_steer, [PREFIX], [("a", 2.0)])[0]
    assert other[2] == 0, "a different strength reused blocks cached under strength 1"
    unsteered = run(llm_steer, [PREFIX], [(None, None)])[0]
    assert unsteered[2] == 0, "an unsteered request reused blocks computed under steering"
    assert unsteered[:2] == run(llm_plain, [PREFIX], [(None, None)])[0][:2]
    steered_after = run(llm_steer, [PREFIX], [("b", 1.0)])[0]
    assert steered_after[2] == 0, "a steered request reused blocks computed unsteered"


def test_prefix_cache_off_for_steered_requests(llm_off):
    """"off": a steered request never reads or leaves reusable blocks; unsteered ones still
    share the cache."""
    a1 = run(llm_off, [PREFIX], [("a", 1.0)])[0]
    a2 = run(llm_off, [PREFIX], [("a", 1.0)])[0]
    assert a2[2] == 0
    assert_close(a2, a1, atol=1e-5, what="uncached steered rerun")
    run(llm_off, [PREFIX], [(None, None)])
    assert run(llm_off, [PREFIX], [(None, None)])[0][2] > 0
    assert run(llm_off, [PREFIX], [("a", 1.0)])[0][2] == 0


# --------------------------------------------------------------------------- bad requests

@pytest.mark.parametrize("extra,match", [
    ({"m2iv": {"vectors": "nope"}}, "'nope' is not served here; this server has 'a'"),
    ({"m2iv": {"vectors": "a", "strength": "high"}}, "strength.*must be a number"),
    ({"m2iv": {"vectors": "a", "strength": math.nan}}, "must be finite"),
    ({"m2iv": {"vectors": "a", "strength": True}}, "must be a number"),
    ({"m2iv": {"vector": "a"}}, r"unknown key\(s\) \['vector'\]"),
    ({"m2iv": ["a"]}, "must be"),
])
def test_bad_request_fails_alone(llm_steer, extra, match):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    ids = {"prompt_token_ids": SHORT[0]}
    before = run(llm_steer, [SHORT[0]], [("a", 1.0)])[0]
    with pytest.raises(VLLMValidationError, match=match):
        llm_steer.generate([ids], SamplingParams(max_tokens=4, extra_args=extra), use_tqdm=False)
    # the engine is up and unchanged: the same request gives the same result
    assert run(llm_steer, [SHORT[0]], [("a", 1.0)])[0][:2] == before[:2]


def test_unsupported_architecture_is_refused(workdir):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = workdir / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=2, vocab_size=512)).save_pretrained(d)
    with pytest.raises(Exception, match="m2iv.vllm cannot steer GPT2LMHeadModel: supported"):
        make_llm(d, m2iv_config(workdir, "llama"), skip_tokenizer_init=True)


def test_vectors_for_another_model_are_refused(model_dirs, workdir):
    deep = m2iv.M2IV(torch.randn(2, 4, 64), torch.ones(2, 4), torch.randn(2, 256), torch.ones(2),
                     layers=[0, 9])  # the served model has 4 layers
    path = workdir / "too-deep.safetensors"
    deep.save(path)
    with pytest.raises(Exception, match="covers layer 9 but the model has 4 decoder layers"):
        make_llm(model_dirs["llama"], {"m2iv": {"vectors": {"deep": str(path)}}})
