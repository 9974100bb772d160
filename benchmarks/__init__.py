"""Benchmarks: ``python -m benchmarks.kernels`` (ops) and the end-to-end suites."""
