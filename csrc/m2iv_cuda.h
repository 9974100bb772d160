// CUDA kernels of the m2iv steering ops: a thin C++ launcher API with no PyTorch types.
//
// m2iv_cuda.cu implements it and compiles with plain nvcc (no torch headers); the torch binding
// (m2iv_cuda_bind.cpp) allocates tensors, picks the stream and calls these launchers.
//
// Layout (the launcher contract of m2iv_kernels/backends.py):
//   activations  [R, C] rows with unit column stride and row stride `stride_*` (in elements);
//   vectors      contiguous bank [NB, H, Dh] (C = H * Dh), gates [NB, H];
//   rows         row r belongs to sequence r / rows_per_seq, whose bank row is index[seq]
//                (index == nullptr: bank row 0); rows whose bank row is out of [0, NB) are
//                left unsteered and excluded from the vector gradients; mask[r] (bool or
//                float, may be nullptr) scales the steering term.
// Every sum is accumulated in fp32 and rounded once to the activation dtype.
// Every launcher returns a cudaError_t (cudaSuccess == 0).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace m2iv_cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kBool = 3 };

struct RowMeta {
  const void* mask;      // [R] or nullptr, read in its own dtype:
  DType mask_dtype;      //   kBool, kFloat32, kFloat16 or kBFloat16
  const int64_t* index;  // [n_seq] or nullptr
  int64_t rows_per_seq;  // >= 1
  int64_t n_bank;        // NB
};

// Number of row chunks per sequence for the two-stage (deterministic) column reductions of
// steer_colsum and rmsnorm_bwd: their partial buffers are [n_seq, n_chunks, C] fp32.
// `n_sm` is the device's multiprocessor count.
int64_t colsum_chunks(int64_t n_seq, int64_t rows_per_seq, int64_t C, int n_sm);
int64_t rmsnorm_bwd_chunks(int64_t n_seq, int64_t rows_per_seq, int64_t C, int n_sm);

// out = [residual +] x + mask * gates[bank, c / Dh] * vectors[bank, c]; out may alias x.
cudaError_t steer_fwd(DType act, const void* x, int64_t stride_x, const void* residual,
                      int64_t stride_r, void* out, int64_t stride_o, DType vec_dtype,
                      const void* vectors, DType gate_dtype, const void* gates, int64_t R,
                      int64_t C, int64_t H, int64_t Dh, RowMeta meta, cudaStream_t stream);

// out [NB, C] fp32 = per bank row, the sum over its rows of mask * grad.
// `partial` holds n_seq * n_chunks * C floats (n_chunks from colsum_chunks).
cudaError_t steer_colsum(DType act, const void* grad, int64_t stride_g, int64_t R, int64_t C,
                         RowMeta meta, int64_t n_seq, int64_t n_chunks, float* partial,
                         float* out, cudaStream_t stream);

// new_res = round(residual + x + mask * gate * vec); y = float(new_res);
// rstd = rsqrt(mean(y^2) + eps); normed = round(y * rstd * (weight_offset + weight)).
// normed, new_res [R, C] and rstd [R] are contiguous.
cudaError_t rmsnorm_fwd(DType act, const void* residual, int64_t stride_r, const void* x,
                        int64_t stride_x, DType vec_dtype, const void* vectors,
                        DType gate_dtype, const void* gates, DType w_dtype, const void* weight,
                        float eps, float weight_offset, int64_t R, int64_t C, RowMeta meta,
                        void* normed, void* new_res, float* rstd, cudaStream_t stream);

// dy = rstd * (g*w - y * rstd^2 * mean(g*w*y)) [+ grad_residual], g = grad_normed,
// w = weight_offset + weight; dw = sum_r g * y * rstd; out_g = per-bank sum of mask * dy (fp32).
// new_res and dy are contiguous [R, C]. part_g (and part_w when dw != nullptr) hold
// n_seq * n_chunks * C floats (n_chunks from rmsnorm_bwd_chunks). dw == nullptr: no weight
// gradient.
cudaError_t rmsnorm_bwd(DType act, const void* grad_normed, int64_t stride_gn,
                        const void* grad_residual, int64_t stride_gr, const void* new_res,
                        const float* rstd, DType w_dtype, const void* weight,
                        float weight_offset, int64_t R, int64_t C, RowMeta meta,
                        int64_t n_seq, int64_t n_chunks, float* part_g, float* part_w,
                        void* dy, float* dw, float* out_g, cudaStream_t stream);

}  // namespace m2iv_cuda
