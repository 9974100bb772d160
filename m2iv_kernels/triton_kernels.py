"""Triton kernels for the steering ops, and their launchers.

Imported lazily by the dispatcher: ``TRITON_INTERPRET=1`` must be set before ``triton`` is
imported for the kernels to run on the CPU (the interpreter), so importing ``m2iv_kernels``
must not import ``triton``.

Launcher contract (shared with the C++/CUDA extension, see ``m2iv_kernels/backends.py``):
activations arrive as ``[R, C]`` row views with unit column stride, vectors as a contiguous
bank ``[N, H, Dh]`` with gates ``[N, H]`` (``H = 1`` for the residual ops), per-row metadata as
a :class:`m2iv_kernels._checks.Rows`. Every sum is accumulated in fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._checks import Rows

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FINGERPRINT = "triton:" + triton.__version__


@triton.jit
def _steer_tile(VEC, GATE, MASK, INDEX, rows, cols, rmask, cmask, rows_per_seq, C, H, Dh, NB,
                HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr):
    """fp32 ``mask * gate * vector`` for a [ROWS, BLOCK_C] tile (or [1, BLOCK_C] broadcast)."""
    if HAS_INDEX:
        bank = tl.load(INDEX + rows // rows_per_seq, mask=rmask, other=0)
        valid = rmask & (bank >= 0) & (bank < NB)  # out-of-range rows are left unsteered
        m2 = valid[:, None] & cmask[None, :]
        bank = bank.to(tl.int64)
        vec = tl.load(VEC + bank[:, None] * C + cols[None, :], mask=m2, other=0.0)
        gate = tl.load(GATE + bank[:, None] * H + (cols // Dh)[None, :], mask=m2, other=0.0)
        s = vec.to(tl.float32) * gate.to(tl.float32)
    else:
        vec = tl.load(VEC + cols, mask=cmask, other=0.0)
        gate = tl.load(GATE + cols // Dh, mask=cmask, other=0.0)
        s = (vec.to(tl.float32) * gate.to(tl.float32))[None, :]
    if HAS_MASK:
        s = s * tl.load(MASK + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    return s


@triton.jit
def _steer_fwd_kernel(X, RES, OUT, VEC, GATE, MASK, INDEX, R, C, H, Dh, NB,
                      stride_x, stride_r, stride_o, rows_per_seq,
                      HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    acc = tl.load(X + r64 * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_RES:
        acc += tl.load(RES + r64 * stride_r + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    acc += _steer_tile(VEC, GATE, MASK, INDEX, rows, cols, rmask, cmask, rows_per_seq, C, H, Dh,
                       NB, HAS_MASK, HAS_INDEX)
    tl.store(OUT + r64 * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _colsum_kernel(G, MASK, PART, R, C, stride_g, rows_per_seq, rows_per_chunk, n_chunks,
                   HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """PART[seq, chunk, c] = sum of mask[r] * G[r, c] over one chunk of one sequence's rows."""
    seq = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = seq * rows_per_seq + chunk * rows_per_chunk
    end = tl.minimum(tl.minimum(start + rows_per_chunk, (seq + 1) * rows_per_seq), R)
    acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        g = tl.load(G + rows.to(tl.int64)[:, None] * stride_g + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_MASK:
            g = g * tl.load(MASK + rows, mask=rmask, other=0.0)[:, None]
        acc += g
    out = (seq * n_chunks + chunk).to(tl.int64) * C
    tl.store(PART + out + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _rmsnorm_fwd_kernel(X, RES, NORMED, NEWRES, RSTD, VEC, GATE, MASK, INDEX, W,
                        R, C, NB, stride_x, stride_r, rows_per_seq, eps, w_offset,
                        HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    acc = tl.load(X + r64 * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    acc += tl.load(RES + r64 * stride_r + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    acc += _steer_tile(VEC, GATE, MASK, INDEX, rows, cols, rmask, cmask, rows_per_seq, C, 1, C,
                       NB, HAS_MASK, HAS_INDEX)
    new = acc.to(NEWRES.dtype.element_ty)
    tl.store(NEWRES + r64 * C + cols[None, :], new, mask=m2)
    y = new.to(tl.float32)  # the norm reads the rounded residual, as the unfused layer does
    rstd = tl.math.rsqrt(tl.sum(y * y, axis=1) / C + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
    normed = y * rstd[:, None] * w[None, :]
    tl.store(NORMED + r64 * C + cols[None, :], normed.to(NORMED.dtype.element_ty), mask=m2)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rmsnorm_bwd_kernel(GN, GR, Y, RSTD, W, MASK, DY, PART_G, PART_W,
                        R, C, stride_gn, stride_gr, rows_per_seq, rows_per_chunk, n_chunks,
                        w_offset, HAS_GR: tl.constexpr, HAS_MASK: tl.constexpr,
                        NEED_DW: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """dy = d(new_residual), plus per-chunk partial sums of mask*dy (vectors) and dw."""
    seq = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
    start = seq * rows_per_seq + chunk * rows_per_chunk
    end = tl.minimum(tl.minimum(start + rows_per_chunk, (seq + 1) * rows_per_seq), R)
    g_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    w_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        m2 = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        y = tl.load(Y + r64 * C + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        gn = tl.load(GN + r64 * stride_gn + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        wg = gn * w[None, :]
        mean_gy = tl.sum(wg * y, axis=1) / C
        dy = rstd[:, None] * (wg - y * (rstd * rstd * mean_gy)[:, None])
        if HAS_GR:
            dy += tl.load(GR + r64 * stride_gr + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(DY + r64 * C + cols[None, :], dy.to(DY.dtype.element_ty), mask=m2)
        if NEED_DW:
            w_acc += gn * y * rstd[:, None]
        if HAS_MASK:
            dy = dy * tl.load(MASK + rows, mask=rmask, other=0.0)[:, None]
        g_acc += dy
    out = (seq * n_chunks + chunk).to(tl.int64) * C
    tl.store(PART_G + out + cols, tl.sum(g_acc, axis=0), mask=cmask)
    if NEED_DW:
        tl.store(PART_W + out + cols, tl.sum(w_acc, axis=0), mask=cmask)


# --------------------------------------------------------------------------------------------
# Launch configuration

def _elementwise_tiles(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps): ~4K elements a program on a GPU; bigger under the
    interpreter, whose cost is per program, not per element."""
    budget = 1 << 16 if INTERPRET else 4096
    block_c = min(triton.next_power_of_2(n_cols), budget, 1 << 13 if INTERPRET else 1024)
    rows = max(1, min(triton.next_power_of_2(max(n_rows, 1)), budget // block_c))
    return rows, block_c, 4


def _row_tiles(n_cols: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps) for kernels that hold whole rows (the RMSNorm reduction)."""
    block_c = triton.next_power_of_2(n_cols)
    rows = max(1, (1 << 14 if INTERPRET else 2048) // block_c)
    warps = 4 if block_c <= 2048 else 8 if block_c <= 8192 else 16
    return rows, block_c, warps


def _chunks(meta: Rows, n_seq: int, rows: int, device: torch.device) -> tuple[int, int]:
    """Split each sequence's rows into chunks so the reduction fills the machine."""
    if INTERPRET or device.type != "cuda":
        target = 1
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    n_chunks = max(1, min(triton.cdiv(meta.rows_per_seq, rows), triton.cdiv(target, n_seq)))
    return n_chunks, triton.cdiv(meta.rows_per_seq, n_chunks)


def _reduce_banks(part: torch.Tensor, meta: Rows) -> torch.Tensor:
    """[n_seq, n_chunks, C] partials -> [N, C] fp32 sums per bank row."""
    per_seq = part.sum(1)
    if meta.index is None:
        return per_seq
    # rows whose bank index is out of range were left unsteered: they get no gradient
    valid = (meta.index >= 0) & (meta.index < meta.n_bank)
    out = per_seq.new_zeros(meta.n_bank, per_seq.shape[-1])
    return out.index_add_(0, meta.index.clamp(0, meta.n_bank - 1), per_seq * valid[:, None])


def _dummy(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(1)


# --------------------------------------------------------------------------------------------
# Launchers

def steer_fwd(x: torch.Tensor, residual: torch.Tensor | None, vectors: torch.Tensor,
              gates: torch.Tensor, meta: Rows, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out = [residual +] x + mask * gates * vectors`` on ``[R, C]`` rows (out may be x)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return out
    n_bank, n_heads, head_dim = vectors.shape
    rows, block_c, warps = _elementwise_tiles(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block_c))
    _steer_fwd_kernel[grid](
        x, residual if residual is not None else x, out, vectors, gates,
        meta.mask if meta.mask is not None else _dummy(gates),
        meta.index if meta.index is not None else _dummy(gates),
        n_rows, n_cols, n_heads, head_dim, n_bank,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        meta.rows_per_seq,
        HAS_RES=residual is not None, HAS_MASK=meta.mask is not None,
        HAS_INDEX=meta.index is not None, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return out


def steer_colsum(grad: torch.Tensor, meta: Rows) -> torch.Tensor:
    """``[N, C]`` fp32: per bank row, the sum over its rows of ``mask * grad``."""
    n_rows, n_cols = grad.shape
    n_seq = 1 if meta.index is None else meta.index.numel()
    if n_rows == 0:
        return grad.new_zeros(meta.n_bank, n_cols, dtype=torch.float32)
    rows, block_c, warps = _elementwise_tiles(meta.rows_per_seq, n_cols)
    n_chunks, per_chunk = _chunks(meta, n_seq, rows, grad.device)
    part = torch.empty(n_seq, n_chunks, n_cols, device=grad.device, dtype=torch.float32)
    grid = (n_seq, n_chunks, triton.cdiv(n_cols, block_c))
    _colsum_kernel[grid](
        grad, meta.mask if meta.mask is not None else _dummy(part), part,
        n_rows, n_cols, grad.stride(0), meta.rows_per_seq, per_chunk, n_chunks,
        HAS_MASK=meta.mask is not None, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return _reduce_banks(part, meta)


def rmsnorm_fwd(residual: torch.Tensor, x: torch.Tensor, vectors: torch.Tensor,
                gates: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                meta: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(normed [R, C], new_residual [R, C], rstd [R] fp32)``."""
    n_rows, n_cols = x.shape
    normed = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    new_res = torch.empty_like(normed)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows == 0:
        return normed, new_res, rstd
    rows, block_c, warps = _row_tiles(n_cols)
    rows = min(rows, triton.next_power_of_2(n_rows))
    _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x, residual, normed, new_res, rstd, vectors, gates,
        meta.mask if meta.mask is not None else _dummy(rstd),
        meta.index if meta.index is not None else _dummy(rstd),
        weight, n_rows, n_cols, vectors.shape[0], x.stride(0), residual.stride(0),
        meta.rows_per_seq, float(eps), float(weight_offset),
        HAS_MASK=meta.mask is not None, HAS_INDEX=meta.index is not None,
        ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return normed, new_res, rstd


def rmsnorm_bwd(grad_normed: torch.Tensor, grad_residual: torch.Tensor | None,
                new_residual: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                weight_offset: float, need_dw: bool, meta: Rows
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(d new_residual [R, C], d weight [C] fp32 or None, per-bank sums [N, C] fp32)``."""
    n_rows, n_cols = new_residual.shape
    n_seq = 1 if meta.index is None else meta.index.numel()
    dy = torch.empty_like(new_residual)
    if n_rows == 0:
        zeros = new_residual.new_zeros(meta.n_bank, n_cols, dtype=torch.float32)
        return dy, (zeros[0] if need_dw else None), zeros
    rows, block_c, warps = _row_tiles(n_cols)
    rows = min(rows, triton.next_power_of_2(meta.rows_per_seq))
    n_chunks, per_chunk = _chunks(meta, n_seq, rows, dy.device)
    part_g = torch.empty(n_seq, n_chunks, n_cols, device=dy.device, dtype=torch.float32)
    part_w = torch.empty_like(part_g) if need_dw else part_g
    _rmsnorm_bwd_kernel[(n_seq, n_chunks)](
        grad_normed, grad_residual if grad_residual is not None else grad_normed,
        new_residual, rstd, weight, meta.mask if meta.mask is not None else _dummy(rstd),
        dy, part_g, part_w, n_rows, n_cols, grad_normed.stride(0),
        grad_residual.stride(0) if grad_residual is not None else 0,
        meta.rows_per_seq, per_chunk, n_chunks, float(weight_offset),
        HAS_GR=grad_residual is not None, HAS_MASK=meta.mask is not None, NEED_DW=need_dw,
        ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    dw = part_w.sum((0, 1)) if need_dw else None
    return dy, dw, _reduce_banks(part_g, meta)
