"""``patch_model``: steer every forward pass (and ``generate()``) of a Hugging Face model with
M2IV vectors through the fused ops of ``m2iv_kernels``.

* :mod:`.api`: ``patch_model``, ``unpatch_model``, ``steer``;
* :mod:`.handle`: :class:`PatchHandle`, the live patch (swap vectors, strength, bank rows,
  positions without re-patching);
* :mod:`.styles`: the table of layer styles (pre-norm, sandwich norms, parallel branches), each
  one small body; :mod:`.forwards`: the one wrapper around every body, the head-space o_proj
  forward and the top-level forward;
* :mod:`.verify`: every steered layer's style is checked against the layer's own forward
  before anything is patched;
* :mod:`.state`: per-layer steering tensors (the fold through o_proj and its cache);
  :mod:`.positions`: which tokens are steered; :mod:`.rebind`: reversible per-instance
  rebinding (classes are never touched; unpatching is bit-exact).

Layers not covered by the vectors are not patched at all.
"""
from .api import patch_model, steer, unpatch_model
from .handle import PatchHandle

__all__ = ["PatchHandle", "patch_model", "unpatch_model", "steer"]
