"""The Triton backend: launch configurations and the launchers of the contract in
``backends.py``.

Imported lazily by the dispatcher: ``TRITON_INTERPRET=1`` must be set before ``triton`` is
imported for the kernels to run on the CPU (the interpreter), so importing ``m2iv_kernels``
must not import ``triton``.

Each launcher builds its kernel launches as :class:`Launch` records (kernel, grid, arguments,
constexprs) from pure configuration functions of the shapes and a :class:`Target`, then runs
them. ``compile_report.py`` builds the same records from meta tensors for a CUDA target and
compiles them ahead of time, so what it reports is what the launchers run.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import triton

from . import triton_kernels as K
from ._checks import Rows, as_rows

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FINGERPRINT = "triton:" + triton.__version__


@dataclass(frozen=True)
class Target:
    """What the launch configuration depends on besides the shapes."""

    interpret: bool  # the CPU interpreter: its cost is per program, not per element
    n_sm: int  # streaming multiprocessors (1 under the interpreter)


@functools.cache
def target_of(device: torch.device) -> Target:
    if device.type == "cuda" and not INTERPRET:
        return Target(False, torch.cuda.get_device_properties(device).multi_processor_count)
    return Target(True, 1)


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs)``.

    ``wide`` names the pointer arguments whose accesses should be 128-bit (the activations
    and the contiguous vectors); ``compile_report.py`` checks them.
    """

    kernel: object
    grid: tuple[int, ...]
    args: dict
    constexprs: dict
    wide: tuple[str, ...] = field(default=())

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args.values(), **self.constexprs)


def _run(launches: list[Launch]) -> None:
    for launch in launches:
        launch()


# --------------------------------------------------------------------------------------------
# Launch configuration (pure functions of the shapes and the target)

def steer_tiles(n_rows: int, n_heads: int, head_dim: int, has_index: bool, t: Target
                ) -> tuple[int, int, int, int]:
    """(ROWS, HB heads, BLOCK_D head columns, num_warps) of ``steer_fwd``: <= 1024 columns
    and ~4K elements a program on a GPU (2K with a bank index, whose per-row vector rows
    cost registers); much bigger under the interpreter, whose cost is per program."""
    cap = 1 << 13 if t.interpret else 1024
    block_d = min(triton.next_power_of_2(head_dim), cap)
    hb = max(1, min(triton.next_power_of_2(n_heads), cap // block_d))
    budget = 1 << 16 if t.interpret else 2048 if has_index else 4096
    rows = max(1, min(triton.next_power_of_2(max(n_rows, 1)), budget // (hb * block_d)))
    return rows, hb, block_d, 4


def colsum_tiles(rows_per_seq: int, n_cols: int, t: Target) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps) of the column-sum pass: ~4K elements an iteration, in
    256-column strips (16 B a thread per row, one 512 B segment a warp for bf16), wider when
    a sequence has fewer than 16 rows."""
    budget = 1 << 16 if t.interpret else 4096
    rows_p2 = triton.next_power_of_2(max(rows_per_seq, 1))
    strip = 1 << 13 if t.interpret else max(256, budget // rows_p2)  # few rows: wider strips
    block_c = min(triton.next_power_of_2(n_cols), strip)
    return max(1, min(rows_p2, budget // block_c)), block_c, 4


def row_tiles(n_cols: int, t: Target, backward: bool = False) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps) for kernels that hold whole rows (the RMSNorm reduction).
    The backward keeps five row-sized fp32 values per element (weight, two accumulators,
    y, grad), so it spreads a row over more warps: 16 elements a thread from D = 4096 up."""
    block_c = triton.next_power_of_2(n_cols)
    rows = max(1, (1 << 14 if t.interpret else 2048) // block_c)
    if backward:
        warps = min(32, max(4, block_c // 512))
    else:
        warps = 4 if block_c <= 2048 else 8 if block_c <= 8192 else 16
    return rows, block_c, warps


def chunks(rows_per_seq: int, n_seq: int, programs_per_chunk: int, min_rows: int,
           resident: int, t: Target) -> tuple[int, int]:
    """(chunks per sequence, rows per chunk) for a two-stage column sum: enough programs for
    ``resident`` per SM, but chunks of at least ``min_rows`` rows, so the fp32 partials
    (one [C] row per chunk) stay a few percent of the traffic."""
    if t.interpret:
        return 1, rows_per_seq
    want = triton.cdiv(resident * t.n_sm, n_seq * programs_per_chunk)
    n_chunks = max(1, min(want, triton.cdiv(rows_per_seq, min_rows)))
    return n_chunks, triton.cdiv(rows_per_seq, n_chunks)


def vec_width(element_size: int, *counts: int) -> int:
    """The widest power of two, up to 16 bytes of elements, dividing every count (row strides,
    row widths): kernels multiply it back so Triton can prove aligned vector accesses."""
    v = 16 // element_size
    while v > 1 and any(c % v for c in counts):
        v //= 2
    return v


def _strides(*ts) -> list[int]:
    """Row strides in elements (0 for an absent tensor or a single row: never multiplied)."""
    return [t.stride(0) if t is not None and t.shape[0] > 1 else 0 for t in ts]


def _n_seq(meta: Rows) -> int:
    return 1 if meta.index is None else meta.index.shape[0]


def _reduce_launch(part, index, out, n_seq: int, n_chunks: int, t: Target) -> Launch:
    """The fixed-order second stage: ``out [N, C]`` from ``part [n_seq, n_chunks, C]``."""
    n_out, n_cols = out.shape
    block_c = min(triton.next_power_of_2(n_cols), 1 << 13 if t.interpret else 512)
    args = dict(PART=part, INDEX=index, OUT=out, n_seq=n_seq, n_chunks=n_chunks, C=n_cols)
    return Launch(K._reduce_parts_kernel, (n_out, triton.cdiv(n_cols, block_c)), args,
                  dict(HAS_INDEX=index is not None, BLOCK_C=block_c, num_warps=4),
                  wide=("PART", "OUT"))


# --------------------------------------------------------------------------------------------
# Launch plans: (launches, outputs) from the inputs and the target; outputs are allocated here

def steer_fwd_plan(x, residual, vectors, gates, meta: Rows, out, t: Target):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return [], out
    n_bank, n_heads, head_dim = vectors.shape
    strides = _strides(x, residual, out)
    v = vec_width(x.element_size(), head_dim, *strides)
    rows, hb, block_d, warps = steer_tiles(n_rows, n_heads, head_dim, meta.index is not None, t)
    n_dblk = triton.cdiv(head_dim, block_d)
    args = dict(X=x, RES=residual, OUT=out, VEC=vectors, GATE=gates, MASK=meta.mask,
                INDEX=meta.index, R=n_rows, H=n_heads, Dh_v=head_dim // v, NB=n_bank,
                n_dblk=n_dblk, stride_x_v=strides[0] // v, stride_r_v=strides[1] // v,
                stride_o_v=strides[2] // v, rows_per_seq=meta.rows_per_seq)
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_heads, hb) * n_dblk)
    return [Launch(K._steer_fwd_kernel, grid, args,
                   dict(HAS_RES=residual is not None, HAS_MASK=meta.mask is not None,
                        HAS_INDEX=meta.index is not None, ROWS=rows, HB=hb, BLOCK_D=block_d,
                        V=v, num_warps=warps),
                   wide=("X", "RES", "OUT", "VEC"))], out


def steer_colsum_plan(grad, meta: Rows, t: Target):
    n_rows, n_cols = grad.shape
    n_seq = _n_seq(meta)
    out = grad.new_zeros(meta.n_bank, n_cols, dtype=torch.float32) if n_rows == 0 else \
        grad.new_empty(meta.n_bank, n_cols, dtype=torch.float32)
    if n_rows == 0 or n_cols == 0:
        return [], out
    rows, block_c, warps = colsum_tiles(meta.rows_per_seq, n_cols, t)
    n_chunks, per_chunk = chunks(meta.rows_per_seq, n_seq, triton.cdiv(n_cols, block_c),
                                 8 * rows, 4, t)
    part = grad.new_empty(n_seq, n_chunks, n_cols, dtype=torch.float32)
    (stride,) = _strides(grad)
    v = vec_width(grad.element_size(), n_cols, stride)
    args = dict(G=grad, MASK=meta.mask, PART=part, R=n_rows, C_v=n_cols // v,
                stride_g_v=stride // v, rows_per_seq=meta.rows_per_seq,
                rows_per_chunk=per_chunk, n_chunks=n_chunks)
    first = Launch(K._colsum_kernel, (n_seq, n_chunks, triton.cdiv(n_cols, block_c)), args,
                   dict(HAS_MASK=meta.mask is not None, ROWS=rows, BLOCK_C=block_c, V=v,
                        num_warps=warps), wide=("G",))
    return [first, _reduce_launch(part, meta.index, out, n_seq, n_chunks, t)], out


def rmsnorm_fwd_plan(residual, x, vectors, gates, weight, eps, weight_offset, meta: Rows,
                     t: Target, out=None):
    """``out``: where the new residual goes (contiguous rows; may be ``residual``)."""
    n_rows, n_cols = x.shape
    normed = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    new_res = torch.empty_like(normed) if out is None else out
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    outputs = normed, new_res, rstd
    if n_rows == 0 or n_cols == 0:
        return [], outputs
    rows, block_c, warps = row_tiles(n_cols, t)
    rows = min(rows, triton.next_power_of_2(n_rows))
    strides = _strides(x, residual)
    v = vec_width(x.element_size(), n_cols, *strides)
    args = dict(X=x, RES=residual, NORMED=normed, NEWRES=new_res, RSTD=rstd, VEC=vectors,
                GATE=gates, MASK=meta.mask, INDEX=meta.index, W=weight, R=n_rows,
                C_v=n_cols // v, NB=vectors.shape[0], stride_x_v=strides[0] // v,
                stride_r_v=strides[1] // v, rows_per_seq=meta.rows_per_seq, eps=float(eps),
                w_offset=float(weight_offset))
    return [Launch(K._rmsnorm_fwd_kernel, (triton.cdiv(n_rows, rows),), args,
                   dict(HAS_MASK=meta.mask is not None, HAS_INDEX=meta.index is not None,
                        ROWS=rows, BLOCK_C=block_c, V=v, num_warps=warps),
                   wide=("X", "RES", "NORMED", "NEWRES", "VEC", "W"))], outputs


def rmsnorm_bwd_plan(grad_normed, grad_residual, new_residual, rstd, weight, weight_offset,
                     need_dw, meta: Rows, t: Target):
    """Outputs ``(dy, per-bank sums [N, C], d weight [C] or None)``."""
    n_rows, n_cols = new_residual.shape
    n_seq = _n_seq(meta)
    dy = torch.empty_like(new_residual)
    f32 = dict(dtype=torch.float32, device=dy.device)
    if n_rows == 0:
        zeros = torch.zeros(meta.n_bank, n_cols, **f32)
        return [], (dy, zeros, zeros[0] if need_dw else None)
    rows, block_c, warps = row_tiles(n_cols, t, backward=True)
    rows = min(rows, triton.next_power_of_2(meta.rows_per_seq))
    resident = max(1, 16 // warps)  # ~16 warps an SM: ~128 registers a thread
    n_chunks, per_chunk = chunks(meta.rows_per_seq, n_seq, 1, 16, resident, t)
    n_parts = n_seq * n_chunks
    part = torch.empty(2 if need_dw else 1, n_seq, n_chunks, n_cols, **f32)  # vectors, weight
    g_sum = torch.empty(meta.n_bank, n_cols, **f32)
    dw = torch.empty(1, n_cols, **f32) if need_dw else None
    strides = _strides(grad_normed, grad_residual)
    v = vec_width(dy.element_size(), n_cols, *strides)
    args = dict(GN=grad_normed, GR=grad_residual, Y=new_residual, RSTD=rstd, W=weight,
                MASK=meta.mask, DY=dy, PART=part, R=n_rows, C_v=n_cols // v,
                stride_gn_v=strides[0] // v, stride_gr_v=strides[1] // v,
                rows_per_seq=meta.rows_per_seq, rows_per_chunk=per_chunk, n_chunks=n_chunks,
                n_parts=n_parts, w_offset=float(weight_offset))
    launches = [Launch(K._rmsnorm_bwd_kernel, (n_seq, n_chunks), args,
                       dict(HAS_GR=grad_residual is not None, HAS_MASK=meta.mask is not None,
                            NEED_DW=need_dw, ROWS=rows, BLOCK_C=block_c, V=v, num_warps=warps),
                       wide=("GN", "GR", "Y", "DY", "W")),
                _reduce_launch(part[0], meta.index, g_sum, n_seq, n_chunks, t)]
    if need_dw:
        launches.append(_reduce_launch(part[1], None, dw, 1, n_parts, t))
    return launches, (dy, g_sum, dw[0] if need_dw else None)


# --------------------------------------------------------------------------------------------
# Launchers: activations in their own shape ([..., C] with a row view), outputs in that shape;
# the plans above work on the [R, C] row views and [N, H, Dh] banks.

def _bank(vectors: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if vectors.dim() == 3:
        return vectors, gates
    n = gates.numel()  # one gate per bank row (C = 0 leaves -1 nothing to infer)
    return vectors.view(n, 1, vectors.shape[-1]), gates.reshape(n, 1)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else as_rows(t)


def steer_fwd(x: torch.Tensor, residual: torch.Tensor | None, vectors: torch.Tensor,
              gates: torch.Tensor, meta: Rows, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out = [residual +] x + mask * gates * vectors`` (out may be x or residual)."""
    launches, y = steer_fwd_plan(as_rows(x), _rows(residual), *_bank(vectors, gates), meta,
                                 _rows(out), target_of(x.device))
    _run(launches)
    return y.view(x.shape) if out is None else out


def steer_colsum(grad: torch.Tensor, meta: Rows) -> torch.Tensor:
    """``[N, C]`` fp32: per bank row, the sum over its rows of ``mask * grad``."""
    launches, out = steer_colsum_plan(as_rows(grad), meta, target_of(grad.device))
    _run(launches)
    return out


def rmsnorm_fwd(residual: torch.Tensor, x: torch.Tensor, vectors: torch.Tensor,
                gates: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                meta: Rows, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(normed, new_residual, rstd)``; ``new_residual`` written into ``out`` when given."""
    launches, (normed, new_res, rstd) = rmsnorm_fwd_plan(
        as_rows(residual), as_rows(x), *_bank(vectors, gates), weight, eps, weight_offset, meta,
        target_of(x.device), _rows(out))
    _run(launches)
    return (normed.view(x.shape), new_res.view(x.shape) if out is None else out,
            rstd.view(x.shape[:-1]))


def rmsnorm_bwd(grad_normed: torch.Tensor, grad_residual: torch.Tensor | None,
                new_residual: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                weight_offset: float, need_dw: bool, meta: Rows
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(d new_residual, d weight [C] fp32 or None, per-bank sums [N, C] fp32)``."""
    launches, (dy, g_sum, dw) = rmsnorm_bwd_plan(
        as_rows(grad_normed), _rows(grad_residual), as_rows(new_residual), rstd.reshape(-1),
        weight, weight_offset, need_dw, meta, target_of(new_residual.device))
    _run(launches)
    return dy.view(new_residual.shape), dw, g_sum
