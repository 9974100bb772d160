"""Compiled mode (vLLM's torch.compile + Inductor): the steering ops are traced into the graph at
model load and read the per-step buffers, so steering is never silently dropped."""
import pytest

from .conftest import make_llm, m2iv_config
from .helpers import assert_close, hf_greedy, run
from .test_serving import MIXED


@pytest.fixture(scope="module")
def llm_compiled(model_dirs, workdir, vectors):
    """vLLM's default compilation on this platform (the CPU turns VLLM_COMPILE into
    DYNAMO_TRACE_ONCE: one Dynamo trace of the model, compiled ahead of time by Inductor)."""
    from vllm.compilation.counter import compilation_counter
    from vllm.config import CompilationMode

    before = compilation_counter.clone()
    llm = make_llm(model_dirs["llama"], m2iv_config(workdir, "llama"), enforce_eager=False)
    assert llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    compiled = sum(getattr(compilation_counter, k) - getattr(before, k)
                   for k in ("num_graphs_seen", "num_aot_compiles", "num_aot_artifacts_loaded",
                             "num_compiled_artifacts_loaded"))
    assert compiled > 0, "the engine compiled no graph"
    return llm


def test_compiled_steering_matches_eager_and_hf(llm_compiled, llm_steer, hf_models, vectors):
    """A mixed batch through the compiled graph: steered != unsteered, and every request equals
    the eager engine's result (and patch_model's for the plain steered ones)."""
    prompts, steering = zip(*MIXED)
    compiled = run(llm_compiled, prompts, steering)
    eager = run(llm_steer, prompts, steering)
    for (p, s), c, e in zip(MIXED, compiled, eager):
        assert_close(c, e, atol=1e-4, what=f"compiled vs eager {s}")
    hf = hf_models["llama"]
    want = hf_greedy(hf, prompts[0], vectors["llama"]["a"], 1.0)
    assert_close(compiled[0], want, what="compiled vs patch_model")
    plain = run(llm_compiled, [prompts[0]], [(None, None)])[0]
    assert plain[0] != compiled[0][0], "compiled mode: the steered request was not steered"
    assert_close(plain, hf_greedy(hf, prompts[0]), what="compiled unsteered vs HF")


def test_steering_config_is_in_the_compile_cache_key(model_dirs, workdir, vectors):
    """vLLM keys its compile cache on VllmConfig.compute_hash(): the m2iv entry takes part, so
    a graph compiled with steering is never reused without it (or with other vectors)."""
    from vllm.engine.arg_utils import EngineArgs

    def key(additional):
        args = EngineArgs(model=str(model_dirs["llama"]), dtype="float32", max_model_len=256,
                          additional_config=additional)
        return args.create_engine_config().compute_hash()

    plain = key({})
    steered = key(m2iv_config(workdir, "llama"))
    other = key(m2iv_config(workdir, "llama", prefix_caching="off"))
    fewer = key({"m2iv": {"vectors": {"a": str(workdir / "llama-a.safetensors")}}})
    assert len({plain, steered, other, fewer}) == 4
