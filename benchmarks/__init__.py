"""Benchmarks: ``python -m benchmarks.kernels`` (ops), ``.patched`` (patcher overhead) and
``.icl`` (M2IV vs k-shot ICL, also ``m2iv bench``).

Idle OpenMP threads spin by default; on a small shared machine that stalls every
multi-threaded op by milliseconds, so the benchmarks make them sleep (unless you set it).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
