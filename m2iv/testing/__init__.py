"""Helpers for testing and benchmarking m2iv without downloads, importable by anyone.

* :mod:`~m2iv.testing.models`: tiny random-weight instances of real transformers model classes,
  built offline from configs (``build("llava")``, ``text_inputs(...)``).
* :mod:`~m2iv.testing.reference`: THE independent hook reference (DESIGN.md section 1 with
  plain forward hooks), which the fused patcher must match.
* :mod:`~m2iv.testing.processors`: offline processors for those models.
* :mod:`~m2iv.testing.checkpoints`: tiny causal LMs saved to disk with a word-level
  tokenizer, for engines that load from a directory (vLLM).

Numerical assertion helpers live in the test suite (``tests/helpers.py``).
"""
from .models import FAMILIES, IMAGE_TOKEN, TEXT_ONLY, build, text_inputs
from .processors import build_offline_processor
from .reference import HookReference, add_steering_hooks, decoder_layers

__all__ = ["FAMILIES", "TEXT_ONLY", "IMAGE_TOKEN", "build", "text_inputs",
           "build_offline_processor", "HookReference", "add_steering_hooks", "decoder_layers"]
