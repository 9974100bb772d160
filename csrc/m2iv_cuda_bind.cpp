// Torch binding of the CUDA kernels: checks, output and workspace allocation (the caching
// allocator), the current stream and device guard, then the plain launcher API of m2iv_cuda.h.
// Only c10/cuda headers (no ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers),
// so this file also compiles against a bare CUDA toolkit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>

#include "m2iv_cuda.h"
#include "m2iv_ext.h"

namespace m2iv {
namespace cuda {

int runtime_version() { return CUDART_VERSION; }

namespace {

m2iv_cuda::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return m2iv_cuda::kFloat32;
    case at::kHalf: return m2iv_cuda::kFloat16;
    case at::kBFloat16: return m2iv_cuda::kBFloat16;
    case at::kBool: return m2iv_cuda::kBool;
    default: TORCH_CHECK(false, "m2iv_ext: unsupported dtype ", t.scalar_type());
  }
}

void on_device(const Tensor& ref, std::initializer_list<const Tensor*> ts) {
  TORCH_CHECK(ref.is_cuda(), "m2iv_ext: expected CUDA tensors");
  for (const Tensor* t : ts)
    TORCH_CHECK(!t || t->device() == ref.device(), "m2iv_ext: every tensor must be on ",
                ref.device(), ", got one on ", t->device());
}

const Tensor* opt(const OptTensor& t) { return t ? &*t : nullptr; }

m2iv_cuda::RowMeta meta_of(const OptTensor& mask, const OptTensor& index, int64_t rows_per_seq,
                           int64_t n_bank) {
  return {mask ? mask->data_ptr() : nullptr, mask ? dtype_of(*mask) : m2iv_cuda::kFloat32,
          index ? index->data_ptr<int64_t>() : nullptr, rows_per_seq, n_bank};
}

int sm_count(const Tensor& t) {
  static std::array<std::atomic<int>, 64> cache{};  // per device index; 0 = not read yet
  const int dev = t.get_device();
  if (dev >= 0 && dev < (int)cache.size() && cache[dev].load() > 0) return cache[dev].load();
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 132;
  }
  if (dev >= 0 && dev < (int)cache.size()) cache[dev].store(n);
  return n;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "m2iv_ext: CUDA ", what, " failed: ", cudaGetErrorString(e));
}

}  // namespace

Tensor steer_fwd(const Tensor& x, const OptTensor& residual, const Tensor& vectors,
                 const Tensor& gates, const OptTensor& mask, const OptTensor& index,
                 int64_t rows_per_seq, const OptTensor& out_) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor out = out_ ? *out_ : at::empty(x.sizes(), x.options());
  const SteerLayout l = check_steer(x, residual, out, vectors, gates, mask, index, rows_per_seq);
  on_device(x, {opt(residual), &out, &vectors, &gates, opt(mask), opt(index)});
  check(m2iv_cuda::steer_fwd(dtype_of(x), x.data_ptr(), l.x.stride,
                             residual ? residual->data_ptr() : nullptr, l.res.stride,
                             out.data_ptr(), l.out.stride, dtype_of(vectors), vectors.data_ptr(),
                             dtype_of(gates), gates.data_ptr(), l.x.R, l.x.C, l.bank.H,
                             l.bank.Dh, meta_of(mask, index, rows_per_seq, l.bank.NB),
                             stream()),
        "steer_fwd");
  return out;
}

Tensor steer_colsum(const Tensor& grad, const OptTensor& mask, const OptTensor& index,
                    int64_t rows_per_seq, int64_t n_bank) {
  const RowView g = rows_of("grad", grad);
  const int64_t R = g.R, C = g.C;
  check_meta(mask, index, R, rows_per_seq);
  on_device(grad, {opt(mask), opt(index)});
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto f32 = grad.options().dtype(at::kFloat);
  Tensor out = at::empty({n_bank, C}, f32);
  if (C == 0 || n_bank == 0) return out;
  const int64_t n_seq = index ? index->numel() : 1;
  const int64_t n_chunks = m2iv_cuda::colsum_chunks(n_seq, rows_per_seq, C, sm_count(grad));
  Tensor part = at::empty({R > 0 ? n_seq * n_chunks : 0, C}, f32);
  check(m2iv_cuda::steer_colsum(dtype_of(grad), grad.data_ptr(), g.stride, R, C,
                                meta_of(mask, index, rows_per_seq, n_bank), n_seq, n_chunks,
                                part.data_ptr<float>(), out.data_ptr<float>(),
                                stream()),
        "steer_colsum");
  return out;
}

std::tuple<Tensor, Tensor, Tensor> rmsnorm_fwd(const Tensor& residual, const Tensor& x,
                                               const Tensor& vectors, const Tensor& gates,
                                               const Tensor& weight, double eps,
                                               double weight_offset, const OptTensor& mask,
                                               const OptTensor& index, int64_t rows_per_seq,
                                               const OptTensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor new_res = out ? *out : at::empty(x.sizes(), x.options());
  const SteerLayout l = check_steer(x, residual, new_res, vectors, gates, mask, index,
                                    rows_per_seq);
  if (out) dense_rows_like("out", new_res, l.x, x.scalar_type());
  const int64_t R = l.x.R, C = l.x.C;
  TORCH_CHECK(l.bank.H == 1, "m2iv_ext: rmsnorm_fwd takes vectors [N, C] (H = 1)");
  TORCH_CHECK(weight.numel() == C && weight.is_contiguous(),
              "m2iv_ext: weight must be a contiguous [", C, "] tensor");
  on_device(x, {&residual, &new_res, &vectors, &gates, &weight, opt(mask), opt(index)});
  Tensor normed = at::empty(x.sizes(), x.options());
  Tensor rstd = at::empty(lead_shape(x), x.options().dtype(at::kFloat));
  if (R == 0 || C == 0) return {normed, new_res, rstd};
  check(m2iv_cuda::rmsnorm_fwd(dtype_of(x), residual.data_ptr(), l.res.stride,
                               x.data_ptr(), l.x.stride, dtype_of(vectors), vectors.data_ptr(),
                               dtype_of(gates), gates.data_ptr(), dtype_of(weight),
                               weight.data_ptr(), (float)eps, (float)weight_offset, R, C,
                               meta_of(mask, index, rows_per_seq, l.bank.NB),
                               normed.data_ptr(), new_res.data_ptr(), rstd.data_ptr<float>(),
                               stream()),
        "rmsnorm_fwd");
  return {normed, new_res, rstd};
}

std::tuple<Tensor, Tensor, Tensor> rmsnorm_bwd(const Tensor& grad_normed,
                                               const OptTensor& grad_residual,
                                               const Tensor& new_residual, const Tensor& rstd,
                                               const Tensor& weight, double weight_offset,
                                               bool need_dw, const OptTensor& mask,
                                               const OptTensor& index, int64_t rows_per_seq,
                                               int64_t n_bank) {
  const RowView y = check_rmsnorm_bwd(grad_normed, grad_residual, new_residual, rstd, weight,
                                      mask, index, rows_per_seq);
  const int64_t R = y.R, C = y.C;
  on_device(new_residual,
            {&grad_normed, opt(grad_residual), &rstd, &weight, opt(mask), opt(index)});
  const c10::cuda::CUDAGuard guard(new_residual.device());
  const auto f32 = new_residual.options().dtype(at::kFloat);
  Tensor dy = at::empty(new_residual.sizes(), new_residual.options());
  Tensor g = at::empty({n_bank, C}, f32);
  Tensor dw = at::empty({need_dw ? C : 0}, f32);
  if (C == 0) return {dy, dw, g};
  const int64_t n_seq = index ? index->numel() : 1;
  const int64_t n_chunks =
      m2iv_cuda::rmsnorm_bwd_chunks(n_seq, rows_per_seq, C, sm_count(new_residual));
  const int64_t n_parts = R > 0 ? n_seq * n_chunks : 0;
  Tensor part_g = at::empty({n_parts, C}, f32);
  Tensor part_w = at::empty({need_dw ? n_parts : 0, C}, f32);
  const int64_t sgn = rows_of("grad_normed", grad_normed).stride;
  const int64_t sgr = grad_residual ? rows_of("grad_residual", *grad_residual).stride : 0;
  check(m2iv_cuda::rmsnorm_bwd(
            dtype_of(new_residual), grad_normed.data_ptr(), sgn,
            grad_residual ? grad_residual->data_ptr() : nullptr, sgr, new_residual.data_ptr(),
            rstd.data_ptr<float>(), dtype_of(weight), weight.data_ptr(), (float)weight_offset,
            R, C, meta_of(mask, index, rows_per_seq, n_bank), n_seq, n_chunks,
            part_g.data_ptr<float>(), need_dw ? part_w.data_ptr<float>() : nullptr,
            dy.data_ptr(), need_dw ? dw.data_ptr<float>() : nullptr, g.data_ptr<float>(),
            stream()),
        "rmsnorm_bwd");
  return {dy, dw, g};
}

}  // namespace cuda
}  // namespace m2iv
