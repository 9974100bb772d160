"""m2iv.vllm: M2IV steering for models served by vLLM, as a plugin of the real engine.

Install ``pip install "m2iv[vllm]"``; the ``vllm.general_plugins`` entry point ``m2iv`` makes
vLLM call :func:`register` in every process. It does nothing unless an engine is configured::

    from vllm import LLM, SamplingParams
    llm = LLM("my-llama", additional_config={"m2iv": {"vectors": {"formal": "formal.safetensors"}}})
    llm.generate(prompts, SamplingParams(extra_args={"m2iv": {"vectors": "formal",
                                                              "strength": 0.8}}))

Configuration and request keys: :mod:`m2iv.vllm.config`; how steering runs inside the model:
:mod:`m2iv.vllm.steering`; the engine hooks: :mod:`m2iv.vllm.plugin`.
"""
from .config import (ServingConfig, ServingConfigError, Steering, SteeringRequestError,
                     parse_config, parse_request)
from .plugin import register
from .steering import SUPPORTED_ARCHITECTURES

__all__ = ["register", "ServingConfig", "Steering", "ServingConfigError", "SteeringRequestError",
           "parse_config", "parse_request", "SUPPORTED_ARCHITECTURES"]
