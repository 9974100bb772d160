// The m2iv_ext operators: declarations shared by the CPU kernels (m2iv_cpu.cpp), the CUDA
// binding (m2iv_cuda_bind.cpp) and the Python module (m2iv_bind.cpp).
//
// Arguments follow the launcher contract of m2iv_kernels/backends.py, with the Rows metadata
// passed as (mask [R] bool/float or None, index [B] int64 or None, rows_per_seq, n_bank).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace m2iv {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define M2IV_DECLARE_OPS(ns)                                                                   \
  namespace ns {                                                                               \
  void steer_fwd(const Tensor& x, const OptTensor& residual, const Tensor& out,               \
                 const Tensor& vectors, const Tensor& gates, const OptTensor& mask,            \
                 const OptTensor& index, int64_t rows_per_seq);                                \
  Tensor steer_colsum(const Tensor& grad, const OptTensor& mask, const OptTensor& index,      \
                      int64_t rows_per_seq, int64_t n_bank);                                   \
  std::tuple<Tensor, Tensor, Tensor> rmsnorm_fwd(                                              \
      const Tensor& residual, const Tensor& x, const Tensor& vectors, const Tensor& gates,    \
      const Tensor& weight, double eps, double weight_offset, const OptTensor& mask,          \
      const OptTensor& index, int64_t rows_per_seq);                                           \
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
void check_steer(const Tensor& x, const OptTensor& residual, const Tensor& out,
                 const Tensor& vectors, const Tensor& gates, const OptTensor& mask,
                 const OptTensor& index, int64_t rows_per_seq);
void check_rmsnorm_bwd(const Tensor& grad_normed, const OptTensor& grad_residual,
                       const Tensor& new_residual, const Tensor& rstd, const Tensor& weight,
                       const OptTensor& mask, const OptTensor& index, int64_t rows_per_seq);
void check_rows(const char* name, const Tensor& t, int64_t R, int64_t C);
void check_meta(const OptTensor& mask, const OptTensor& index, int64_t R, int64_t rows_per_seq);

}  // namespace m2iv
