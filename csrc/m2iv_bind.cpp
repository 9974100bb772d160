// The pybind11 module that m2iv_kernels/ext.py calls: one entry per launcher, routed to the CPU
// or CUDA kernels by the device of the activations. There is no TORCH_LIBRARY registration:
// the one op registry is torch.ops.m2iv_kernels (m2iv_kernels/custom_ops.py), which serves
// every backend and calls these functions.
#include <torch/extension.h>

#include "m2iv_ext.h"

#define M2IV_STR2(x) #x
#define M2IV_STR(x) M2IV_STR2(x)
#ifdef CPU_CAPABILITY
#define M2IV_CPU_CAPABILITY_NAME M2IV_STR(CPU_CAPABILITY)
#else
#define M2IV_CPU_CAPABILITY_NAME "DEFAULT"
#endif

namespace m2iv {
namespace {

#ifdef M2IV_WITH_CUDA
constexpr bool kWithCuda = true;
#define M2IV_ON_DEVICE(t, fn, ...) \
  ((t).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
constexpr bool kWithCuda = false;
inline void require_cpu(const Tensor& t) {
  TORCH_CHECK(!t.is_cuda(), "m2iv_ext was built without CUDA; it is rebuilt with CUDA where "
              "nvcc and a CUDA build of torch are present");
}
#define M2IV_ON_DEVICE(t, fn, ...) (require_cpu(t), cpu::fn(__VA_ARGS__))
#endif

Tensor steer_fwd(const Tensor& x, const OptTensor& residual, const Tensor& vectors,
                 const Tensor& gates, const OptTensor& mask, const OptTensor& index,
                 int64_t rows_per_seq, const OptTensor& out) {
  return M2IV_ON_DEVICE(x, steer_fwd, x, residual, vectors, gates, mask, index, rows_per_seq,
                        out);
}

Tensor steer_colsum(const Tensor& grad, const OptTensor& mask, const OptTensor& index,
                    int64_t rows_per_seq, int64_t n_bank) {
  return M2IV_ON_DEVICE(grad, steer_colsum, grad, mask, index, rows_per_seq, n_bank);
}

std::tuple<Tensor, Tensor, Tensor> rmsnorm_fwd(const Tensor& residual, const Tensor& x,
                                               const Tensor& vectors, const Tensor& gates,
                                               const Tensor& weight, double eps,
                                               double weight_offset, const OptTensor& mask,
                                               const OptTensor& index, int64_t rows_per_seq,
                                               const OptTensor& out) {
  return M2IV_ON_DEVICE(x, rmsnorm_fwd, residual, x, vectors, gates, weight, eps, weight_offset,
                        mask, index, rows_per_seq, out);
}

std::tuple<Tensor, Tensor, Tensor> rmsnorm_bwd(const Tensor& grad_normed,
                                               const OptTensor& grad_residual,
                                               const Tensor& new_residual, const Tensor& rstd,
                                               const Tensor& weight, double weight_offset,
                                               bool need_dw, const OptTensor& mask,
                                               const OptTensor& index, int64_t rows_per_seq,
                                               int64_t n_bank) {
  return M2IV_ON_DEVICE(new_residual, rmsnorm_bwd, grad_normed, grad_residual, new_residual,
                        rstd, weight, weight_offset, need_dw, mask, index, rows_per_seq, n_bank);
}

}  // namespace
}  // namespace m2iv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "m2iv steering kernels (C++ CPU and CUDA); see m2iv_kernels/ext.py";
  m.def("steer_fwd", &m2iv::steer_fwd,
        "out = [residual +] x + mask * gate * vector (out may be x)");
  m.def("steer_colsum", &m2iv::steer_colsum, "per bank row: sum of mask * grad");
  m.def("rmsnorm_fwd", &m2iv::rmsnorm_fwd,
        "steer-add + RMSNorm: (normed, new_residual, rstd); new_residual in out (or residual)");
  m.def("rmsnorm_bwd", &m2iv::rmsnorm_bwd, "(d new_residual, d weight, per-bank sums)");
  m.def("build_info", [] {
    pybind11::dict d;
    d["cuda"] = m2iv::kWithCuda;
    d["cpu_capability"] = M2IV_CPU_CAPABILITY_NAME;
    d["compiler"] = __VERSION__;
#ifdef _OPENMP
    d["openmp"] = (int)_OPENMP;
#else
    d["openmp"] = pybind11::none();
#endif
#ifdef M2IV_WITH_CUDA
    d["cuda_runtime"] = m2iv::cuda::runtime_version();
#endif
    return d;
  });
}
