// Registration of the m2iv_ext operators (TORCH_LIBRARY: the dispatcher, torch.compile and
// torch.ops.m2iv_ext see them, with Meta kernels for shape propagation) and the pybind11
// module that m2iv_kernels/ext.py calls directly (cheaper than a dispatcher round trip, which
// matters at decode shapes).
#include <torch/extension.h>
#include <torch/library.h>

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

void steer_fwd(const Tensor& x, const OptTensor& residual, const Tensor& out,
               const Tensor& vectors, const Tensor& gates, const OptTensor& mask,
               const OptTensor& index, int64_t rows_per_seq) {
  M2IV_ON_DEVICE(x, steer_fwd, x, residual, out, vectors, gates, mask, index, rows_per_seq);
}

Tensor steer_colsum(const Tensor& grad, const OptTensor& mask, const OptTensor& index,
                    int64_t rows_per_seq, int64_t n_bank) {
  return M2IV_ON_DEVICE(grad, steer_colsum, grad, mask, index, rows_per_seq, n_bank);
}

std::tuple<Tensor, Tensor, Tensor> rmsnorm_fwd(const Tensor& residual, const Tensor& x,
                                               const Tensor& vectors, const Tensor& gates,
                                               const Tensor& weight, double eps,
                                               double weight_offset, const OptTensor& mask,
                                               const OptTensor& index, int64_t rows_per_seq) {
  return M2IV_ON_DEVICE(x, rmsnorm_fwd, residual, x, vectors, gates, weight, eps, weight_offset,
                        mask, index, rows_per_seq);
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

// ---- Meta kernels: shapes and dtypes only

void steer_fwd_meta(const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                    const OptTensor&, const OptTensor&, int64_t) {}

Tensor steer_colsum_meta(const Tensor& grad, const OptTensor&, const OptTensor&, int64_t,
                         int64_t n_bank) {
  return at::empty({n_bank, grad.size(1)}, grad.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor, Tensor> rmsnorm_fwd_meta(const Tensor&, const Tensor& x,
                                                    const Tensor&, const Tensor&, const Tensor&,
                                                    double, double, const OptTensor&,
                                                    const OptTensor&, int64_t) {
  return {at::empty(x.sizes(), x.options()), at::empty(x.sizes(), x.options()),
          at::empty({x.size(0)}, x.options().dtype(at::kFloat))};
}

std::tuple<Tensor, Tensor, Tensor> rmsnorm_bwd_meta(const Tensor&, const OptTensor&,
                                                    const Tensor& y, const Tensor&,
                                                    const Tensor&, double, bool need_dw,
                                                    const OptTensor&, const OptTensor&, int64_t,
                                                    int64_t n_bank) {
  const auto f = y.options().dtype(at::kFloat);
  return {at::empty(y.sizes(), y.options()), at::empty({need_dw ? y.size(1) : 0}, f),
          at::empty({n_bank, y.size(1)}, f)};
}

}  // namespace
}  // namespace m2iv

TORCH_LIBRARY(m2iv_ext, m) {
  m.def(
      "steer_fwd(Tensor x, Tensor? residual, Tensor(a!) out, Tensor vectors, Tensor gates, "
      "Tensor? mask, Tensor? index, int rows_per_seq) -> ()");
  m.def(
      "steer_colsum(Tensor grad, Tensor? mask, Tensor? index, int rows_per_seq, int n_bank) "
      "-> Tensor");
  m.def(
      "rmsnorm_fwd(Tensor residual, Tensor x, Tensor vectors, Tensor gates, Tensor weight, "
      "float eps, float weight_offset, Tensor? mask, Tensor? index, int rows_per_seq) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "rmsnorm_bwd(Tensor grad_normed, Tensor? grad_residual, Tensor new_residual, Tensor rstd, "
      "Tensor weight, float weight_offset, bool need_dw, Tensor? mask, Tensor? index, "
      "int rows_per_seq, int n_bank) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(m2iv_ext, CPU, m) {
  m.impl("steer_fwd", &m2iv::cpu::steer_fwd);
  m.impl("steer_colsum", &m2iv::cpu::steer_colsum);
  m.impl("rmsnorm_fwd", &m2iv::cpu::rmsnorm_fwd);
  m.impl("rmsnorm_bwd", &m2iv::cpu::rmsnorm_bwd);
}

#ifdef M2IV_WITH_CUDA
TORCH_LIBRARY_IMPL(m2iv_ext, CUDA, m) {
  m.impl("steer_fwd", &m2iv::cuda::steer_fwd);
  m.impl("steer_colsum", &m2iv::cuda::steer_colsum);
  m.impl("rmsnorm_fwd", &m2iv::cuda::rmsnorm_fwd);
  m.impl("rmsnorm_bwd", &m2iv::cuda::rmsnorm_bwd);
}
#endif

TORCH_LIBRARY_IMPL(m2iv_ext, Meta, m) {
  m.impl("steer_fwd", &m2iv::steer_fwd_meta);
  m.impl("steer_colsum", &m2iv::steer_colsum_meta);
  m.impl("rmsnorm_fwd", &m2iv::rmsnorm_fwd_meta);
  m.impl("rmsnorm_bwd", &m2iv::rmsnorm_bwd_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "m2iv steering kernels (C++ CPU and CUDA); see m2iv_kernels/ext.py";
  m.def("steer_fwd", &m2iv::steer_fwd, "out = [residual +] x + mask * gate * vector");
  m.def("steer_colsum", &m2iv::steer_colsum, "per bank row: sum of mask * grad");
  m.def("rmsnorm_fwd", &m2iv::rmsnorm_fwd, "steer-add + RMSNorm: (normed, new_residual, rstd)");
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
