"""Repository benchmark scripts (run from the repository root; not installed):
``python -m benchmarks.kernels`` (ops), ``.bandwidth`` (kernel GB/s, forward and backward),
``.patched`` (patcher overhead), ``.fidelity`` (method fidelity on the digits testbed),
``.gpu_check`` (``make gpu-check``: all of it on a GPU, in one run). The ICL-vs-M2IV benchmark ships with the package:
``m2iv bench`` (:mod:`m2iv.bench`, whose timing and result helpers these scripts share).
"""
import m2iv.bench  # noqa: F401 - sets OMP_WAIT_POLICY before torch starts its threads
