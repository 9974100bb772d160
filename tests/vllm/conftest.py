"""Fixtures of the vLLM serving tests (run by ``make test-vllm`` in ``.venv-vllm``; the main suite
never collects this directory).

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the plugin's hooks, the
engine and the test share one interpreter; engines are session-scoped (``import vllm`` and a
compiled engine cost tens of seconds on 2 cores).
"""
import os
import tempfile

os.environ.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                  VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="m2iv-vllm-cache-"))

import pytest  # noqa: E402

pytest.importorskip("vllm")

import torch  # noqa: E402

import m2iv  # noqa: E402
from m2iv.testing.checkpoints import save_tiny_model  # noqa: E402

# every engine: the CPU settings that fit this machine, prefix caching on, and a small token
# budget per step so long prompts are prefilled in chunks beside other requests' decode steps
ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 * 2**20, seed=0,
              max_num_batched_tokens=32, max_num_seqs=16, enable_prefix_caching=True,
              block_size=32)  # the CPU default block (128) is longer than the test prompts
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("m2iv-vllm")


@pytest.fixture(scope="session")
def model_dirs(workdir):
    """family -> a saved tiny random model (head_dim 64, as vLLM's CPU attention needs)."""
    return {f: save_tiny_model(workdir / f, f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def hf_models(model_dirs):
    from transformers import AutoModelForCausalLM

    return {f: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for f, d in model_dirs.items()}


@pytest.fixture(scope="session")
def vectors(workdir, hf_models):
    """family -> {name: M2IV}, saved under workdir/<family>-<name>.safetensors. ``a`` and ``b``
    are random (``b`` on a subset of layers), ``zero`` all zeros, ``bank`` a bank of 3."""
    out = {}
    for fam, hf in hf_models.items():
        vs = {"a": m2iv.M2IV.random_like(hf, seed=11),
              "b": m2iv.M2IV.random_like(hf, seed=12, layers=[1, 3]),
              "zero": m2iv.M2IV.zeros_like(hf),
              "bank": m2iv.M2IV.stack([m2iv.M2IV.random_like(hf, seed=20 + i)
                                       for i in range(3)])}
        for name, v in vs.items():
            v.save(workdir / f"{fam}-{name}.safetensors")
        out[fam] = vs
    return out


def m2iv_config(workdir, family, **extra):
    names = ("a", "b", "zero", "bank")
    cfg = {"vectors": {n: str(workdir / f"{family}-{n}.safetensors") for n in names}}
    cfg.update(extra)
    return {"m2iv": cfg}


_ENGINES = []  # every engine lives until the session ends: deleting one tears down the
# process-wide distributed state that the other in-process engines still use


def make_llm(model_dir, additional_config=None, **kw):
    from vllm import LLM

    args = dict(ENGINE, enforce_eager=True)
    args.update(kw)
    llm = LLM(model=str(model_dir), additional_config=additional_config or {}, **args)
    _ENGINES.append(llm)
    return llm


@pytest.fixture(scope="session")
def llm_plain(model_dirs):
    """Llama served by vLLM without m2iv (the plugin loaded but not configured)."""
    return make_llm(model_dirs["llama"])


@pytest.fixture(scope="session")
def llm_steer(model_dirs, workdir, vectors):
    """Llama with m2iv, prefix caching salted per steering (the default policy)."""
    return make_llm(model_dirs["llama"], m2iv_config(workdir, "llama"))


@pytest.fixture(scope="session")
def llm_off(model_dirs, workdir, vectors):
    """Llama with m2iv and prefix caching off for steered requests."""
    return make_llm(model_dirs["llama"], m2iv_config(workdir, "llama", prefix_caching="off"))
