"""Run the same greedy generations through vLLM and through ``patch_model`` on the HF model."""
from __future__ import annotations

import random

import torch

import m2iv

MAX_TOKENS = 8


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def params(vectors=None, strength=None, max_tokens=MAX_TOKENS, **kw):
    from vllm import SamplingParams

    extra = {}
    if vectors is not None or strength is not None:
        extra = {"m2iv": {k: v for k, v in (("vectors", vectors), ("strength", strength))
                          if v is not None}}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True,
                          extra_args=extra or None, **kw)


def run(llm, prompts, steering):
    """``steering[i]`` = (name or None, strength or None) for ``prompts[i]``; returns
    ``[(token_ids, logprobs, num_cached_tokens)]``."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params(*s) for s in steering], use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        lps = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]
        res.append((list(c.token_ids), lps, o.num_cached_tokens or 0))
    return res


@torch.no_grad()
def hf_greedy(model, ids, vectors=None, strength=1.0, max_tokens=MAX_TOKENS):
    """Greedy decoding with the KV cache, steered by ``patch_model`` when ``vectors`` is given;
    returns (token_ids, logprobs of the chosen tokens)."""
    def go():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=2)
        toks = out.sequences[0, len(ids):].tolist()
        lps = [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, toks)]
        return toks, lps

    if vectors is None:
        return go()
    with m2iv.steer(model, vectors, strength=strength):
        return go()


def assert_close(got, want, atol=1e-4, what=""):
    toks, lps = got[0], got[1]
    assert toks == want[0], f"{what}: tokens {toks} != {want[0]}"
    worst = max(abs(a - b) for a, b in zip(lps, want[1]))
    assert worst <= atol, f"{what}: logprobs differ by {worst:.2e} > {atol:.0e}"
