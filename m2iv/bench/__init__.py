"""What ``m2iv bench`` needs, installed with the package: the ICL-vs-M2IV harness
(:mod:`.icl`), model presets (:mod:`.presets`), timing and result files (:mod:`.common`) and
plots (:mod:`.plots`). The repository's ``benchmarks/`` scripts (kernels, patch overhead,
fidelity) import the shared pieces from here.

Idle OpenMP threads spin by default; on a small shared machine that stalls every
multi-threaded op by milliseconds, so the benchmarks make them sleep (unless you set it).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
