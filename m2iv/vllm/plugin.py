"""The vLLM plugin: :func:`register` (entry point ``vllm.general_plugins``) hooks two places of
the engine, both inert unless ``additional_config`` has an ``"m2iv"`` entry:

* the front end (``InputProcessor.process_inputs``, where vLLM validates every request): a
  request's ``extra_args["m2iv"]`` is checked there, so a bad one is refused alone with a clear
  ``VLLMValidationError`` (HTTP 400 from the OpenAI server) and never reaches the engine; a
  steered request's prefix-cache salt is set there (``config.cache_salt``);
* the model runner (``GPUModelRunner``, which the CPU and XPU runners extend): right after the
  runner loads the model (before warm-up, ``torch.compile`` and CUDA-graph capture) the vectors
  are loaded into a :class:`~m2iv.vllm.steering.SteeringBank` and the layers are rebound; before
  every step (``_prepare_inputs``, which builds ``query_start_loc`` from the scheduled batch) the
  per-token slot and strength maps are filled from ``input_batch.req_ids`` and the scheduled
  token counts.

Both hooks wrap vLLM methods once per process (vLLM calls ``register`` in every process) and
the runner hooks are bound per runner instance, so an engine without ``"m2iv"`` runs vLLM's code
unchanged.
"""
from __future__ import annotations

import functools
import logging
import types
from typing import Any

import numpy as np
import torch

from .config import (ServingConfig, ServingConfigError, SteeringRequestError, cache_salt,
                     parse_config, parse_request)

__all__ = ["register", "serving_config", "SteeringRuntime"]

logger = logging.getLogger("m2iv.vllm")
_WRAPPED = "__m2iv_wrapped__"


def serving_config(vllm_config: Any) -> ServingConfig | None:
    """The parsed m2iv config of an engine (cached on its ``VllmConfig``), or None."""
    cached = getattr(vllm_config, "_m2iv_config", _WRAPPED)
    if cached is not _WRAPPED:
        return cached
    cfg = parse_config(getattr(vllm_config, "additional_config", None))
    try:
        object.__setattr__(vllm_config, "_m2iv_config", cfg)
    except (AttributeError, TypeError):  # pragma: no cover - a frozen config: parse each time
        pass
    return cfg


def register() -> None:
    """Entry point of ``vllm.general_plugins``; safe to call more than once per process."""
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(InputProcessor, "process_inputs", _process_inputs)
    _wrap(GPUModelRunner, "__init__", _runner_init)


def _wrap(cls: type, name: str, make) -> None:
    original = cls.__dict__[name]
    if getattr(original, _WRAPPED, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _WRAPPED, True)
    setattr(cls, name, wrapper)


# ------------------------------------------------------------------------------- front end

def _process_inputs(original):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        cfg = serving_config(self.vllm_config)
        if cfg is None:
            return original(self, request_id, prompt, params, *args, **kwargs)
        steering = _check_request(self.vllm_config, cfg, params)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if steering.active:
            request.cache_salt = cache_salt(steering, cfg, request.cache_salt, request_id)
        return request
    return process_inputs


def _check_request(vllm_config, cfg: ServingConfig, params):
    from vllm.exceptions import VLLMValidationError

    extra = getattr(params, "extra_args", None)
    try:
        steering = parse_request(extra, cfg)
    except SteeringRequestError as err:
        raise VLLMValidationError(str(err), parameter="extra_args.m2iv") from None
    if steering.active and getattr(vllm_config, "use_v2_model_runner", False):
        raise VLLMValidationError("m2iv steering needs vLLM's V1 GPU/CPU model runner; this "
                                  "engine uses the V2 runner (unset VLLM_USE_V2_MODEL_RUNNER)",
                                  parameter="extra_args.m2iv")
    return steering


# ------------------------------------------------------------------------------- model runner

def _runner_init(original):
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        cfg = serving_config(vllm_config)
        if cfg is None or getattr(self, "_m2iv", None) is not None:
            return  # no m2iv entry, or a subclass __init__ already attached the runtime
        self._m2iv = SteeringRuntime(self, cfg)
    return __init__


class SteeringRuntime:
    """The m2iv state of one model runner: loads the bank after the model, fills the per-token
    maps before each step."""

    def __init__(self, runner, config: ServingConfig):
        self.runner, self.config = runner, config
        self.bank = None
        self._restore = None
        self._requests: dict[str, tuple[int, float]] = {}
        self._high = 0  # tokens written into the maps by the last step
        load, prepare = runner.load_model, runner._prepare_inputs

        def load_model(runner_self, *args, **kwargs):
            load(*args, **kwargs)
            self.install()

        def _prepare_inputs(runner_self, scheduler_output, num_scheduled_tokens, *args, **kw):
            out = prepare(scheduler_output, num_scheduled_tokens, *args, **kw)
            self.fill(num_scheduled_tokens)
            return out

        runner.load_model = types.MethodType(load_model, runner)
        runner._prepare_inputs = types.MethodType(_prepare_inputs, runner)

    # -- load time

    def _load_vectors(self):
        from ..library import VLibrary
        from ..vectors import M2IV

        out, files = [], {}
        lib = None
        for src in self.config.sources:
            try:
                if src.file is not None:
                    v = files.get(src.file) or files.setdefault(src.file, M2IV.load(src.file))
                    if src.bank_row is not None:
                        v = v[src.bank_row]
                else:
                    lib = lib or VLibrary(self.config.library, create=False)
                    v = lib.get(src.library_ref)
            except (OSError, ValueError, KeyError) as err:
                raise ServingConfigError(f"m2iv vectors {src.name!r}: {err}") from None
            out.append((src.name, v))
        return out

    def install(self) -> None:
        from vllm.distributed import (get_tensor_model_parallel_rank,
                                      get_tensor_model_parallel_world_size)

        from .steering import SteeringBank, find_layout

        model = self.runner.get_model()
        layout = find_layout(model, get_tensor_model_parallel_rank(),
                             get_tensor_model_parallel_world_size())
        max_tokens = int(self.runner.max_num_tokens) + 64  # room for padded (graph) batches
        bank = SteeringBank(self._load_vectors(), layout, max_tokens, self.runner.device,
                            self.config.backend)
        model.add_module("m2iv_steering", bank)  # its buffers travel with the model
        self._restore = bank.install(layout)
        self.bank = bank
        self._slot_cpu = torch.zeros(max_tokens, dtype=torch.int64,
                                     pin_memory=bank.slot.is_cuda)
        self._strength_cpu = torch.zeros(max_tokens, dtype=torch.float32,
                                         pin_memory=bank.slot.is_cuda)
        logger.info("m2iv: steering %d decoder layers with %d vector sets (%s); prefix caching "
                    "for steered requests: %s", len(bank.layers), len(self.config.sources),
                    ", ".join(self.config.names[:8]), self.config.prefix_caching)

    # -- every step

    def _steering_of(self, req_id: str) -> tuple[int, float]:
        got = self._requests.get(req_id)
        if got is None:
            params = self.runner.requests[req_id].sampling_params
            try:
                s = parse_request(getattr(params, "extra_args", None), self.config)
            except SteeringRequestError as err:  # the front end refuses these before
                raise RuntimeError(f"m2iv: request {req_id} reached the engine with invalid "
                                   f"steering ({err}); the API process must load the m2iv "
                                   "plugin (pip install m2iv[vllm])") from None
            got = self._requests[req_id] = (s.slot, s.strength)
        return got

    def fill(self, num_scheduled_tokens: np.ndarray) -> None:
        """Write the per-token slot / strength of the batch just prepared (request order of
        ``input_batch.req_ids``, as ``query_start_loc``)."""
        if self.bank is None:
            return
        batch = self.runner.input_batch
        n = batch.num_reqs
        req_ids = batch.req_ids[:n]
        if len(self._requests) > 4 * max(n, 64):  # forget finished requests
            live = set(req_ids)
            self._requests = {k: v for k, v in self._requests.items() if k in live}
        slots = np.empty(n, dtype=np.int64)
        strengths = np.empty(n, dtype=np.float32)
        for i, rid in enumerate(req_ids):
            slots[i], strengths[i] = self._steering_of(rid)
        counts = np.asarray(num_scheduled_tokens[:n])
        t = int(counts.sum())
        slot_np, strength_np = self._slot_cpu.numpy(), self._strength_cpu.numpy()
        slot_np[:t] = np.repeat(slots, counts)
        strength_np[:t] = np.repeat(strengths, counts)
        high = max(t, self._high)
        slot_np[t:high] = 0
        strength_np[t:high] = 0.0
        self._high = t
        bank = self.bank
        bank.slot[:high].copy_(self._slot_cpu[:high], non_blocking=True)
        bank.strength[:high].copy_(self._strength_cpu[:high], non_blocking=True)
        bank.any_steered = bool(strengths.any())
