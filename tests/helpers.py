"""Shared test utilities: dtype tolerances and norm-relative comparison."""
from __future__ import annotations

import torch

# elementwise (rtol, atol): bf16/fp16 allow ~2 ulp (the Triton interpreter truncates fp32->bf16)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
       torch.float64: (1e-10, 1e-10)}
# norm-relative floor for reductions (vector/gate/weight grads): ~4 ulp of a scalar sum
REL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, truth: torch.Tensor,
               dtype: torch.dtype):
    """A reduction is right when its error against the fp64 ``truth`` is at most twice the
    error of the reference computed in the same dtype (``expected``), or below a floor.
    Long sums with cancellation make a fixed tolerance meaningless in half precision."""
    err, ref_err = _rel(actual, truth), _rel(expected, truth)
    assert err <= 2 * ref_err + REL[dtype], (
        f"relative error {err:.3g} vs fp64 truth; the same-dtype reference has {ref_err:.3g}")


def assert_norm_close(actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """Norm-relative closeness ``||a - e|| / ||e|| <= tol`` (bf16 logits, gradients)."""
    err = _rel(actual, expected)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"
