"""The Triton kernels of the steering ops (launched by ``triton_backend.py``).

Conventions shared by every kernel:
  * Activations are ``[R, C]`` rows with unit column stride. Row strides (and ``C``, ``Dh``)
    arrive divided by ``V``, the widest power of two the launcher proved divides them, and are
    multiplied back here, so Triton can prove ``V``-element alignment and issue 128-bit
    accesses even when a stride is not a multiple of 16 elements.
  * ``MASK`` (per row) is read in its own dtype (bool or float); ``INDEX`` picks a bank row per
    sequence of ``rows_per_seq`` rows; rows whose bank row lies outside ``[0, NB)`` are left
    unsteered and excluded from the vector gradients.
  * Every sum is accumulated in fp32 and rounded once to the activation dtype. Column sums
    are two-stage and fixed-order (no atomics): same inputs, same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_mask(MASK, rows, rmask, HAS_MASK: tl.constexpr):
    """fp32 per-row mask [ROWS] (1 where there is none)."""
    if HAS_MASK:
        return tl.load(MASK + rows, mask=rmask, other=0).to(tl.float32)
    return tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def _bank_rows(INDEX, rows, rmask, rows_per_seq, NB):
    """(bank row [ROWS] int64, whether the row is steered [ROWS])."""
    bank = tl.load(INDEX + rows // rows_per_seq, mask=rmask, other=0)
    return bank.to(tl.int64), rmask & (bank >= 0) & (bank < NB)


@triton.jit
def _steer_fwd_kernel(X, RES, OUT, VEC, GATE, MASK, INDEX, R, H, Dh_v, NB, n_dblk,
                      stride_x_v, stride_r_v, stride_o_v, rows_per_seq,
                      HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr,
                      ROWS: tl.constexpr, HB: tl.constexpr, BLOCK_D: tl.constexpr,
                      V: tl.constexpr):
    """``OUT = [RES +] X + mask * GATE[bank, h] * VEC[bank, h, :]`` on a tile of ROWS rows x
    HB heads x BLOCK_D head columns: the gate is loaded once per (row, head), not per column."""
    Dh = Dh_v * V
    C = H * Dh
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    heads = (tl.program_id(1) // n_dblk) * HB + tl.arange(0, HB)
    d = (tl.program_id(1) % n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    hd_mask = (heads < H)[:, None] & (d < Dh)[None, :]  # [HB, BLOCK_D]
    cols = heads[:, None] * Dh + d[None, :]  # [HB, BLOCK_D]
    m3 = rmask[:, None, None] & hd_mask[None, :, :]
    r64 = rows.to(tl.int64)[:, None, None]
    acc = tl.load(X + r64 * (stride_x_v * V) + cols[None], mask=m3, other=0.0).to(tl.float32)
    if HAS_RES:
        acc += tl.load(RES + r64 * (stride_r_v * V) + cols[None], mask=m3,
                       other=0.0).to(tl.float32)
    if HAS_INDEX:
        bank, steered = _bank_rows(INDEX, rows, rmask, rows_per_seq, NB)
        gm = steered[:, None] & (heads < H)[None, :]
        gate = tl.load(GATE + bank[:, None] * H + heads[None, :], mask=gm, other=0.0)
        gate = gate.to(tl.float32) * _row_mask(MASK, rows, rmask, HAS_MASK)[:, None]
        vec = tl.load(VEC + bank[:, None, None] * C + cols[None], mask=gm[:, :, None] & m3,
                      other=0.0)
        acc += vec.to(tl.float32) * gate[:, :, None]
    else:  # one steering term for every row: loaded once per program
        gate = tl.load(GATE + heads, mask=heads < H, other=0.0).to(tl.float32)
        s = tl.load(VEC + cols, mask=hd_mask, other=0.0).to(tl.float32) * gate[:, None]
        if HAS_MASK:
            acc += s[None, :, :] * _row_mask(MASK, rows, rmask, HAS_MASK)[:, None, None]
        else:
            acc += s[None, :, :]
    tl.store(OUT + r64 * (stride_o_v * V) + cols[None], acc.to(OUT.dtype.element_ty), mask=m3)


@triton.jit
def _colsum_kernel(G, MASK, PART, R, C_v, stride_g_v, rows_per_seq, rows_per_chunk, n_chunks,
                   HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                   V: tl.constexpr):
    """PART[seq, chunk, c] = sum of mask[r] * G[r, c] over one chunk of one sequence's rows."""
    C = C_v * V
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
        g = tl.load(G + rows.to(tl.int64)[:, None] * (stride_g_v * V) + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_MASK:
            g = g * _row_mask(MASK, rows, rmask, HAS_MASK)[:, None]
        acc += g
    out = (seq * n_chunks + chunk).to(tl.int64) * C
    tl.store(PART + out + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _reduce_parts_kernel(PART, INDEX, OUT, n_seq, n_chunks, C, HAS_INDEX: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """OUT[n, c] = sum over sequences s with INDEX[s] == n (every s without INDEX), in order,
    of sum over chunks k of PART[s, k, c]: the deterministic second stage of a column sum."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, n_seq):
        take = True
        if HAS_INDEX:
            take = tl.load(INDEX + s) == n
        if take:
            base = PART + s * n_chunks * C + cols  # partials are small: int32 offsets
            for k in range(0, n_chunks):
                acc += tl.load(base + k * C, mask=cmask, other=0.0)
    tl.store(OUT + n * C + cols, acc, mask=cmask)


@triton.jit
def _rmsnorm_fwd_kernel(X, RES, NORMED, NEWRES, RSTD, VEC, GATE, MASK, INDEX, W,
                        R, C_v, NB, stride_x_v, stride_r_v, rows_per_seq, eps, w_offset,
                        HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, V: tl.constexpr):
    C = C_v * V
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    # parameters first: their loads overlap the activations', not the reduction's barrier
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
    scale = _row_mask(MASK, rows, rmask, HAS_MASK)  # ones without a mask: [ROWS], cheap
    m2 = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    acc = tl.load(X + r64 * (stride_x_v * V) + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    acc += tl.load(RES + r64 * (stride_r_v * V) + cols[None, :], mask=m2,
                   other=0.0).to(tl.float32)
    if HAS_INDEX:
        bank, steered = _bank_rows(INDEX, rows, rmask, rows_per_seq, NB)
        gate = tl.load(GATE + bank, mask=steered, other=0.0).to(tl.float32) * scale
        vec = tl.load(VEC + bank[:, None] * C + cols[None, :], mask=steered[:, None] & m2,
                      other=0.0)
        acc += vec.to(tl.float32) * gate[:, None]
    else:
        gate = tl.load(GATE).to(tl.float32)
        vec = tl.load(VEC + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += (vec * gate)[None, :] * scale[:, None]
    new = acc.to(NEWRES.dtype.element_ty)
    tl.store(NEWRES + r64 * C + cols[None, :], new, mask=m2)
    y = new.to(tl.float32)  # the norm reads the rounded residual, as the unfused layer does
    rstd = tl.math.rsqrt(tl.sum(y * y, axis=1) / C + eps)
    normed = y * rstd[:, None] * w[None, :]
    tl.store(NORMED + r64 * C + cols[None, :], normed.to(NORMED.dtype.element_ty), mask=m2)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rmsnorm_bwd_kernel(GN, GR, Y, RSTD, W, MASK, DY, PART, R, C_v, stride_gn_v, stride_gr_v,
                        rows_per_seq, rows_per_chunk, n_chunks, n_parts, w_offset,
                        HAS_GR: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DW: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, V: tl.constexpr):
    """dy = d(new_residual), plus per-chunk partial sums of mask*dy (vectors) and, with
    NEED_DW, of gn*y*rstd (weight) in PART[0] and PART[1]."""
    C = C_v * V
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
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        y = tl.load(Y + r64 * C + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        gn = tl.load(GN + r64 * (stride_gn_v * V) + cols[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        if NEED_DW:
            w_acc += gn * y * rstd[:, None]
        wg = gn * w[None, :]
        mean_gy = tl.sum(wg * y, axis=1) / C
        dy = rstd[:, None] * (wg - y * (rstd * rstd * mean_gy)[:, None])
        if HAS_GR:
            dy += tl.load(GR + r64 * (stride_gr_v * V) + cols[None, :], mask=m2,
                          other=0.0).to(tl.float32)
        tl.store(DY + r64 * C + cols[None, :], dy.to(DY.dtype.element_ty), mask=m2)
        if HAS_MASK:
            dy = dy * _row_mask(MASK, rows, rmask, HAS_MASK)[:, None]
        g_acc += dy
    out = (seq * n_chunks + chunk).to(tl.int64) * C
    tl.store(PART + out + cols, tl.sum(g_acc, axis=0), mask=cmask)
    if NEED_DW:
        tl.store(PART + (out + n_parts * C) + cols, tl.sum(w_acc, axis=0), mask=cmask)
