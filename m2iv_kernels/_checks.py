"""Input validation and the canonical layout the kernels consume.

Every public op validates here first, so each backend sees the same, already-checked inputs
and every user error reads the same whatever backend runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)
MASK_DTYPES = KERNEL_DTYPES + (torch.bool,)  # masks the kernels read as they are


def _shape(t: torch.Tensor | tuple) -> str:
    return str(tuple(t.shape if isinstance(t, torch.Tensor) else t))


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}")


def _check_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move it with "
                         f".to({str(x.device)!r})")


def check_steering(x: torch.Tensor, vectors: torch.Tensor, gates: torch.Tensor,
                   mask: torch.Tensor | None, index: torch.Tensor | None, *,
                   vector_dims: int, vec_name: str = "vectors", gate_name: str = "gates") -> None:
    """Validate the arguments shared by every op.

    ``vector_dims`` is the rank of one un-banked vector: 2 for ``[H, Dh]``, 1 for ``[D]``.
    """
    _check_float("x", x)
    _check_float(vec_name, vectors)
    _check_float(gate_name, gates)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the feature dimension)")
    _check_device(vec_name, vectors, x)
    _check_device(gate_name, gates, x)

    if vectors.dim() not in (vector_dims, vector_dims + 1):
        want = "[H, Dh] or a bank [N, H, Dh]" if vector_dims == 2 else "[D] or a bank [N, D]"
        raise ValueError(f"{vec_name} must be {want}; got shape {_shape(vectors)}")
    width = vectors.shape[-2] * vectors.shape[-1] if vector_dims == 2 else vectors.shape[-1]
    if x.shape[-1] != width:
        what = "H*Dh" if vector_dims == 2 else "D"
        raise ValueError(f"x has last dimension {x.shape[-1]} but {vec_name} of shape "
                         f"{_shape(vectors)} needs {what} = {width}")
    if tuple(gates.shape) != tuple(vectors.shape[:-1]):
        raise ValueError(f"{gate_name} must have shape {_shape(vectors.shape[:-1])} to match "
                         f"{vec_name} of shape {_shape(vectors)}; got {_shape(gates)}")

    banked = vectors.dim() == vector_dims + 1
    if banked and index is None:
        raise ValueError(f"{vec_name} is a bank of {vectors.shape[0]} (shape {_shape(vectors)}); "
                         f"pass index= (int tensor of shape [{x.shape[0] if x.dim() > 1 else 'B'}]) "
                         "to pick one per sequence")
    if index is not None:
        if not banked:
            raise ValueError(f"index= selects rows of a bank, but {vec_name} has shape "
                             f"{_shape(vectors)} without a leading bank dimension N")
        if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point \
                or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got "
                            f"{getattr(index, 'dtype', type(index).__name__)}")
        _check_device("index", index, x)
        if x.dim() < 2:
            raise ValueError("index= needs x of shape [B, ..., C] (a batch dimension first); "
                             f"got x of shape {_shape(x)}")
        if index.shape != (x.shape[0],):
            raise ValueError(f"index must have shape ({x.shape[0]},) (one entry per sequence "
                             f"in x.shape[0]); got {_shape(index)}")
        # value check only where it costs no device sync and no graph break
        if index.device.type == "cpu" and index.numel() and not torch.compiler.is_compiling():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= vectors.shape[0]:
                raise ValueError(f"index values must lie in [0, {vectors.shape[0]}) for a bank "
                                 f"of {vectors.shape[0]}; got values from {lo} to {hi}")

    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype.is_complex:
            raise TypeError("mask must be a bool or numeric tensor of 0/1 per token")
        _check_device("mask", mask, x)
        lead = tuple(x.shape[:-1])
        try:
            ok = tuple(torch.broadcast_shapes(mask.shape, lead)) == lead
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {_shape(mask)} does not broadcast to the token "
                             f"dimensions x.shape[:-1] = {lead}")


def check_same(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """``t`` must match ``x`` in shape, dtype and device (residual streams)."""
    _check_float(name, t)
    _check_device(name, t, x)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {_shape(x)}; got {_shape(t)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")


def check_finite_gates(gates: torch.Tensor) -> None:
    """Gates must be finite: a NaN or inf gate makes every steered row NaN. Costs a device
    sync off the CPU, so callers check only CPU gates (where and why: ``ops._gates_ok``)."""
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(gates).all()):
        bad = gates[~torch.isfinite(gates)].flatten()[:4].tolist()
        raise ValueError(f"gates hold non-finite values ({', '.join(map(str, bad))}): every "
                         "steered row would be NaN; pass finite gates")


def internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (``expand()``, overlapping
    ``as_strided``). Conservative: a layout it cannot prove free of overlap counts as one."""
    if t.is_contiguous():
        return False
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)
    reach = 0  # the largest offset the dimensions of smaller stride reach
    for st, n in dims:
        if st <= reach:
            return True
        reach += st * (n - 1)
    return False


def _span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) \
        * t.element_size()


def check_writable(name: str, out: torch.Tensor, *inputs: torch.Tensor | None) -> None:
    """``out`` may be written in place: none of its elements share memory, and it does not
    partially overlap an input (an input that *is* ``out``, element for element, is fine: every
    element is read before it is written). The overlap with inputs needs storage addresses,
    which ``torch.compile`` cannot trace: checked in eager mode only."""
    if internal_overlap(out):
        raise ValueError(f"{name} cannot be written in place: some of its elements share memory "
                         f"(shape {_shape(out)}, strides {tuple(out.stride())}: an expand()-ed "
                         f"or overlapping as_strided view), so the result would be added several "
                         f"times; pass a tensor that owns its elements ({name}.clone()) or "
                         "inplace=False")
    if torch.compiler.is_compiling() or not out.numel():
        return
    lo, hi = _span(out)
    for t in inputs:
        if t is None or t is out or not t.numel():
            continue
        if (t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                and not (t.data_ptr() == out.data_ptr() and t.stride() == out.stride()
                         and t.shape == out.shape)):
            a, b = _span(t)
            if a < hi and lo < b:
                raise ValueError(f"{name} cannot be written in place: it partially overlaps "
                                 f"another input of the op (shape {_shape(t)}), which would be "
                                 f"read after parts of it were overwritten; pass a copy or "
                                 "inplace=False")


def has_row_view(t: torch.Tensor) -> bool:
    """Whether ``t [..., C]`` has a ``[R, C]`` view with unit column stride (leading
    dimensions that collapse into one row stride): what the kernels read in place."""
    if t.is_contiguous():
        return True
    shape, stride = t.shape, t.stride()
    if shape[-1] > 1 and stride[-1] != 1:
        return False
    nxt = None
    for n, st in zip(reversed(shape[:-1]), reversed(stride[:-1])):
        if n == 1:
            continue
        if nxt is not None and st != nxt:
            return False
        nxt = st * n
    return True


def n_bank(vectors: torch.Tensor) -> int:
    """Bank rows of kernel-layout vectors: ``[N, H, Dh]`` / ``[N, C]``, or ``[C]`` (one)."""
    return vectors.shape[0] if vectors.dim() >= 2 else 1


@dataclass(frozen=True)
class Rows:
    """The flat ``[R]`` per-row metadata a kernel needs: mask, bank index, sequence length."""

    mask: torch.Tensor | None  # [R] bool, float32, float16 or bfloat16, contiguous
    index: torch.Tensor | None  # [B] int64, contiguous
    rows_per_seq: int  # rows of one sequence; R when there is no index
    n_bank: int


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., C]`` as ``[R, C]`` with unit column stride; copies only when no view exists."""
    c, n = t.shape[-1], math.prod(t.shape[:-1])  # explicit rows: C = 0 has no -1 to infer
    try:
        r = t.view(n, c)
    except RuntimeError:
        r = t.reshape(n, c)
    return r if r.stride(-1) == 1 or c == 1 else r.contiguous()


def row_meta(x: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None,
             n_bank: int) -> Rows:
    lead = x.shape[:-1]
    n_rows = math.prod(lead)
    m = None
    if mask is not None:  # read by the kernels in its own dtype: no conversion kernel
        m = torch.broadcast_to(mask, lead).reshape(-1)
        m = (m if m.dtype in MASK_DTYPES else m.to(torch.float32)).contiguous()
    idx = None if index is None else index.to(torch.int64).contiguous()
    rows_per_seq = n_rows if index is None else n_rows // max(x.shape[0], 1)
    return Rows(m, idx, max(rows_per_seq, 1), n_bank)
