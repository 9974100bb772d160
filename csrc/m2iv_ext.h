// The m2iv_ext operators: declarations shared by the CPU kernels (m2iv_cpu.cpp), the CUDA
// binding (m2iv_cuda_bind.cpp) and the Python module (m2iv_bind.cpp).
//
// Arguments follow the launcher contract of m2iv_kernels/backends.py, with the Rows metadata
// passed as (mask [R] bool/float or None, index [B] int64 or None, rows_per_seq, n_bank).
// Activations are [..., C] tensors whose leading dimensions collapse into R rows of one row
// stride with unit column stride; outputs have the activations' shape (rstd: their leading
// shape). Vectors are a bank [N, H, Dh], or [N, C] / [C] (H = 1, N = 1), with gates of N * H
// elements.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace m2iv {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define M2IV_DECLARE_OPS(ns)                                                                   \
  namespace ns {                                                                               \
  Tensor steer_fwd(const Tensor& x, const OptTensor& residual, const Tensor& vectors,        \
                   const Tensor& gates, const OptTensor& mask, const OptTensor& index,         \
                   int64_t rows_per_seq, const OptTensor& out);                                \
  Tensor steer_colsum(const Tensor& grad, const OptTensor& mask, const OptTensor& index,      \
                      int64_t rows_per_seq, int64_t n_bank);                                   \
  std::tuple<Tensor, Tensor, Tensor> rmsnorm_fwd(                                              \
      const Tensor& residual, const Tensor& x, const Tensor& vectors, const Tensor& gates,    \
      const Tensor& weight, double eps, double weight_offset, const OptTensor& mask,          \
      const OptTensor& index, int64_t rows_per_seq, const OptTensor& out);                    \
  std::tuple<Tensor, Tensor, Tensor> rmsnorm_bwd(                                              \
      const Tensor& grad_normed, const OptTensor& grad_residual, const Tensor& new_residual,  \
      const Tensor& rstd, const Tensor& weight, double weight_offset, bool need_dw,           \
      const OptTensor& mask, const OptTensor& index, int64_t rows_per_seq, int64_t n_bank);   \
  }

M2IV_DECLARE_OPS(cpu)
M2IV_DECLARE_OPS(cuda)

namespace cuda {
int runtime_version();  // CUDART_VERSION the CUDA part was compiled with
}

// Shape/dtype checks shared by every device (m2iv_cpu.cpp); cheap, run on each call.

// The rows of an activation: R rows (the product of the leading sizes) of C elements, `stride`
// elements apart (any value when R <= 1).
struct RowView {
  int64_t R = 0, C = 0, stride = 0;
};
// A float32/float16/bfloat16 tensor [..., C] with unit column stride whose leading dimensions
// collapse into one row stride; refused otherwise.
RowView rows_of(const char* name, const Tensor& t);
// `t` has the rows of `ref` (same R and C) and dtype `dt`.
RowView rows_like(const char* name, const Tensor& t, const RowView& ref, at::ScalarType dt);
// An output of `ref`'s rows whose rows are contiguous (stride C).
RowView dense_rows_like(const char* name, const Tensor& t, const RowView& ref,
                        at::ScalarType dt);

// The bank layout of vectors [N, H, Dh] (or [N, C] / [C]) with gates of N * H elements.
struct BankShape {
  int64_t NB = 1, H = 1, Dh = 0;
};
BankShape check_bank(const Tensor& vectors, const Tensor& gates, int64_t C);

struct SteerLayout {
  RowView x, res, out;  // res.stride = 0 without a residual
  BankShape bank;
};
SteerLayout check_steer(const Tensor& x, const OptTensor& residual, const Tensor& out,
                        const Tensor& vectors, const Tensor& gates, const OptTensor& mask,
                        const OptTensor& index, int64_t rows_per_seq);
RowView check_rmsnorm_bwd(const Tensor& grad_normed, const OptTensor& grad_residual,
                          const Tensor& new_residual, const Tensor& rstd, const Tensor& weight,
                          const OptTensor& mask, const OptTensor& index, int64_t rows_per_seq);
void check_meta(const OptTensor& mask, const OptTensor& index, int64_t R, int64_t rows_per_seq);
// The leading shape of x (the shape of rstd).
std::vector<int64_t> lead_shape(const Tensor& x);

}  // namespace m2iv
