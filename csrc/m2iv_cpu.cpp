// CPU kernels of the m2iv steering ops: at::parallel_for over rows, at::vec::Vectorized<float>
// arithmetic with vectorized fp16/bf16 <-> fp32 conversion (AVX512 / AVX2 / NEON / scalar,
// whichever CPU_CAPABILITY this file is compiled for; see m2iv_kernels/ext.py).
//
// Every op reads and writes each activation element once from memory: a row is small enough
// (C * 4 bytes) that the second pass of the RMSNorm ops reads it back from L1/L2.
// All sums are fp32; each output is rounded once to the activation dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <limits>
#include <memory>
#include <vector>

#include "m2iv_ext.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace m2iv {

// ------------------------------------------------------------------------------------------
// Checks (shared with the CUDA binding)

static bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

RowView rows_of(const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "m2iv_ext: ", name, " must have a feature dimension, got a scalar");
  TORCH_CHECK(kernel_dtype(t.scalar_type()), "m2iv_ext: ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  RowView v;
  const int64_t n = t.dim();
  v.C = t.size(n - 1);
  v.R = 1;
  for (int64_t d = 0; d < n - 1; ++d) v.R *= t.size(d);
  v.stride = v.C;
  TORCH_CHECK(t.stride(n - 1) == 1 || v.C <= 1 || v.R == 0, "m2iv_ext: ", name,
              " needs unit column stride");
  // the innermost leading dimension of size > 1 gives the row stride; outer ones must nest
  int64_t next = -1;
  for (int64_t d = n - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (next < 0) {
      v.stride = t.stride(d);
    } else {
      TORCH_CHECK(t.stride(d) == next, "m2iv_ext: ", name, " of shape ", t.sizes(),
                  " and strides ", t.strides(), " has no [R, C] row view");
    }
    next = t.stride(d) * t.size(d);
  }
  return v;
}

RowView rows_like(const char* name, const Tensor& t, const RowView& ref, at::ScalarType dt) {
  const RowView v = rows_of(name, t);
  TORCH_CHECK(v.R == ref.R && v.C == ref.C, "m2iv_ext: ", name, " must have ", ref.R,
              " rows of ", ref.C, ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "m2iv_ext: ", name, " dtype must be ", dt, ", got ",
              t.scalar_type());
  return v;
}

RowView dense_rows_like(const char* name, const Tensor& t, const RowView& ref,
                        at::ScalarType dt) {
  const RowView v = rows_like(name, t, ref, dt);
  TORCH_CHECK(v.R <= 1 || v.stride == v.C, "m2iv_ext: ", name,
              " must have contiguous rows (row stride ", v.C, "), got ", v.stride);
  return v;
}

std::vector<int64_t> lead_shape(const Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

RowView check_rmsnorm_bwd(const Tensor& grad_normed, const OptTensor& grad_residual,
                          const Tensor& new_residual, const Tensor& rstd, const Tensor& weight,
                          const OptTensor& mask, const OptTensor& index, int64_t rows_per_seq) {
  const RowView y = rows_of("new_residual", new_residual);
  TORCH_CHECK(new_residual.is_contiguous(), "m2iv_ext: new_residual must be contiguous");
  const auto dt = new_residual.scalar_type();
  rows_like("grad_normed", grad_normed, y, dt);
  if (grad_residual) rows_like("grad_residual", *grad_residual, y, dt);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == y.R,
              "m2iv_ext: rstd must be a contiguous float32 tensor of ", y.R, " elements");
  TORCH_CHECK(weight.numel() == y.C && weight.is_contiguous() &&
                  kernel_dtype(weight.scalar_type()),
              "m2iv_ext: weight must be a contiguous [", y.C,
              "] float32/float16/bfloat16 tensor");
  check_meta(mask, index, y.R, rows_per_seq);
  return y;
}

void check_meta(const OptTensor& mask, const OptTensor& index, int64_t R, int64_t rows_per_seq) {
  TORCH_CHECK(rows_per_seq >= 1, "m2iv_ext: rows_per_seq must be >= 1");
  if (mask) {
    const auto mt = mask->scalar_type();
    TORCH_CHECK((mt == at::kBool || kernel_dtype(mt)) && mask->is_contiguous() &&
                    mask->numel() == R,
                "m2iv_ext: mask must be a contiguous bool, float32, float16 or bfloat16 tensor "
                "of ", R, " elements");
  }
  if (index) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous() &&
                    index->dim() == 1,
                "m2iv_ext: index must be a contiguous int64 [B] tensor");
    TORCH_CHECK(R <= index->numel() * rows_per_seq, "m2iv_ext: ", R, " rows but index covers ",
                index->numel(), " sequences of ", rows_per_seq);
  }
}

BankShape check_bank(const Tensor& vectors, const Tensor& gates, int64_t C) {
  BankShape b;
  const int64_t n = vectors.dim();
  TORCH_CHECK(n >= 1 && n <= 3 && vectors.is_contiguous(),
              "m2iv_ext: vectors must be a contiguous [N, H, Dh], [N, C] or [C] tensor, got ",
              vectors.sizes());
  b.NB = n >= 2 ? vectors.size(0) : 1;
  b.H = n == 3 ? vectors.size(1) : 1;
  b.Dh = vectors.size(n - 1);
  TORCH_CHECK(b.H * b.Dh == C, "m2iv_ext: vectors of shape ", vectors.sizes(), " do not cover ",
              C, " columns");
  TORCH_CHECK(gates.is_contiguous() && gates.numel() == b.NB * b.H,
              "m2iv_ext: gates must be a contiguous tensor of N * H = ", b.NB * b.H,
              " elements, got ", gates.sizes());
  TORCH_CHECK(kernel_dtype(vectors.scalar_type()) && kernel_dtype(gates.scalar_type()),
              "m2iv_ext: vectors and gates must be float32, float16 or bfloat16");
  return b;
}

SteerLayout check_steer(const Tensor& x, const OptTensor& residual, const Tensor& out,
                        const Tensor& vectors, const Tensor& gates, const OptTensor& mask,
                        const OptTensor& index, int64_t rows_per_seq) {
  SteerLayout l;
  l.x = rows_of("x", x);
  l.out = rows_like("out", out, l.x, x.scalar_type());
  if (residual) l.res = rows_like("residual", *residual, l.x, x.scalar_type());
  l.bank = check_bank(vectors, gates, l.x.C);
  check_meta(mask, index, l.x.R, rows_per_seq);
  return l;
}

namespace cpu {
namespace {

// A per-row mask, read in its own dtype (bool, float32, float16 or bfloat16): no conversion
// kernel per call.
struct Mask {
  const void* p = nullptr;
  at::ScalarType dt = at::kFloat;
  explicit operator bool() const { return p != nullptr; }
  float operator[](int64_t r) const {
    switch (dt) {
      case at::kBool: return static_cast<const bool*>(p)[r] ? 1.f : 0.f;
      case at::kHalf: return static_cast<float>(static_cast<const at::Half*>(p)[r]);
      case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(p)[r]);
      default: return static_cast<const float*>(p)[r];
    }
  }
};

Mask mask_of(const OptTensor& m) { return m ? Mask{m->data_ptr(), m->scalar_type()} : Mask{}; }

// ------------------------------------------------------------------------------------------
// Vector helpers: a unit is 2 * Vectorized<float>::size() elements (one Vectorized<Half>)

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();
constexpr int64_t kU = 2 * kF;

inline void load_f32(const float* p, fVec& a, fVec& b) {
  a = fVec::loadu(p);
  b = fVec::loadu(p + kF);
}
inline void load_f32(const float* p, int64_t n, fVec& a, fVec& b) {
  a = fVec::loadu(p, std::min(n, kF));
  b = n > kF ? fVec::loadu(p + kF, n - kF) : fVec(0.f);
}
inline void store_f32(float* p, const fVec& a, const fVec& b) {
  a.store(p);
  b.store(p + kF);
}
inline void store_f32(float* p, int64_t n, const fVec& a, const fVec& b) {
  a.store(p, std::min(n, kF));
  if (n > kF) b.store(p + kF, n - kF);
}

template <typename T>
struct IO {  // Half, BFloat16
  using V = at::vec::Vectorized<T>;
  static_assert(V::size() == kU, "reduced-precision vectors must hold 2 float vectors");
  static inline void load(const T* p, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(V::loadu(p));
  }
  static inline void load(const T* p, int64_t n, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(V::loadu(p, n));
  }
  static inline void store(T* p, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static inline void store(T* p, int64_t n, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
  // store round(a, b) and replace a, b by the rounded values
  static inline void store_rounded(T* p, fVec& a, fVec& b) {
    const V v = at::vec::convert_from_float<T>(a, b);
    v.store(p);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
  static inline void store_rounded(T* p, int64_t n, fVec& a, fVec& b) {
    const V v = at::vec::convert_from_float<T>(a, b);
    v.store(p, n);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
};

template <>
struct IO<float> {
  static inline void load(const float* p, fVec& a, fVec& b) { load_f32(p, a, b); }
  static inline void load(const float* p, int64_t n, fVec& a, fVec& b) { load_f32(p, n, a, b); }
  static inline void store(float* p, const fVec& a, const fVec& b) { store_f32(p, a, b); }
  static inline void store(float* p, int64_t n, const fVec& a, const fVec& b) {
    store_f32(p, n, a, b);
  }
  static inline void store_rounded(float* p, fVec& a, fVec& b) { store_f32(p, a, b); }
  static inline void store_rounded(float* p, int64_t n, fVec& a, fVec& b) {
    store_f32(p, n, a, b);
  }
};

inline float hsum(const fVec& v) {
  alignas(64) float buf[kF];
  v.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < kF; ++i) s += buf[i];
  return s;
}

// Non-temporal (streaming) stores of one unit at a 64-byte aligned address: for large outputs
// they skip the read-for-ownership of the destination lines and leave the cache to the inputs
// (measured here: ~25% faster than plain stores from 8 MB of output up; slower below).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kCanStream = true;
#else
constexpr bool kCanStream = false;
#endif
constexpr int64_t kStreamMinBytes = (int64_t)8 << 20;
// steer-add + RMSNorm writes two outputs: stream only when each is twice as large
constexpr int64_t kStreamMinBytesRms = (int64_t)16 << 20;

template <typename T>
inline void stream_unit(T* p, const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + kF, b);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p),
                        __m512i(at::vec::convert_from_float<T>(a, b)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + kF, b);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p),
                        __m256i(at::vec::convert_from_float<T>(a, b)));
  }
#else
  IO<T>::store(p, a, b);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Stream the rows of `out` [R, C] (row stride `so`)? Only for large outputs whose every row
// start is 64-byte aligned.
// M2IV_EXT_STREAM=0 turns streaming stores off (read once, at the first call).
inline bool stream_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("M2IV_EXT_STREAM");
    return !(v && (v[0] == '0' || v[0] == 'n' || v[0] == 'N' || v[0] == 'f' || v[0] == 'F'));
  }();
  return on;
}

template <typename T>
inline bool use_stream(const T* out, int64_t so, int64_t R, int64_t C,
                       int64_t min_bytes = kStreamMinBytes) {
  return kCanStream && R * C * (int64_t)sizeof(T) >= min_bytes && stream_enabled() &&
         reinterpret_cast<uintptr_t>(out) % 64 == 0 && (so * (int64_t)sizeof(T)) % 64 == 0;
}

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

#define M2IV_DISPATCH3(dtype, T, ...)                                    \
  [&] {                                                                  \
    switch (dtype) {                                                     \
      case at::kFloat: {                                                 \
        using T = float;                                                 \
        return __VA_ARGS__();                                            \
      }                                                                  \
      case at::kHalf: {                                                  \
        using T = c10::Half;                                             \
        return __VA_ARGS__();                                            \
      }                                                                  \
      case at::kBFloat16: {                                              \
        using T = c10::BFloat16;                                         \
        return __VA_ARGS__();                                            \
      }                                                                  \
      default:                                                           \
        TORCH_CHECK(false, "m2iv_ext: unsupported dtype ", dtype);       \
    }                                                                    \
  }()

// ------------------------------------------------------------------------------------------
// The fp32 steering term gate[n, c / Dh] * vec[n, c] of the bank rows in use, and the row of
// it each sequence reads (nullptr: out of range, unsteered).

struct Steering {
  std::unique_ptr<float[]> table;
  std::vector<const float*> seq;
  int64_t rows_per_seq = 1;
  const float* row(int64_t r) const { return seq[r / rows_per_seq]; }
};

// dst[0, C) = float(gate) * float(vec[0, C)), vectorized (fp16/bf16 converted on the fly)
template <typename V>
void scale_row(const V* vec, float g, int64_t C, float* dst) {
  const fVec vg(g);
  int64_t c = 0;
  for (; c + kU <= C; c += kU) {
    fVec a, b;
    IO<V>::load(vec + c, a, b);
    store_f32(dst + c, a * vg, b * vg);
  }
  if (c < C) {
    fVec a, b;
    IO<V>::load(vec + c, C - c, a, b);
    store_f32(dst + c, C - c, a * vg, b * vg);
  }
}

// A gate that is NaN or inf would turn every steered row into NaN: refused (the gates are read
// here anyway, so the check costs nothing; on a GPU it would need a device sync).
inline float finite_gate(float g, int64_t n, int64_t h) {
  TORCH_CHECK(std::isfinite(g), "m2iv_ext: gate (bank row ", n, ", head ", h, ") is ", g,
              ": steering with it would make every steered row NaN; pass finite gates");
  return g;
}

Steering make_steering(const Tensor& vectors, const Tensor& gates, const BankShape& bs,
                       const OptTensor& index, int64_t rows_per_seq) {
  const int64_t NB = bs.NB, H = bs.H, Dh = bs.Dh, C = H * Dh;
  Steering st;
  st.rows_per_seq = index ? rows_per_seq : std::numeric_limits<int64_t>::max();
  std::vector<int64_t> banks;  // bank row of each table row
  if (index) {
    const int64_t* idx = index->data_ptr<int64_t>();
    const int64_t B = index->numel();
    std::vector<int64_t> slot(NB, -1);
    st.seq.assign(B, nullptr);
    std::vector<int64_t> seq_slot(B, -1);
    for (int64_t s = 0; s < B; ++s) {
      const int64_t b = idx[s];
      if (b < 0 || b >= NB) continue;
      if (slot[b] < 0) {
        slot[b] = (int64_t)banks.size();
        banks.push_back(b);
      }
      seq_slot[s] = slot[b];
    }
    st.table.reset(new float[std::max<int64_t>(1, (int64_t)banks.size() * C)]);
    for (int64_t s = 0; s < B; ++s)
      if (seq_slot[s] >= 0) st.seq[s] = st.table.get() + seq_slot[s] * C;
  } else {
    banks.push_back(0);
    st.table.reset(new float[std::max<int64_t>(1, C)]);
    st.seq.assign(1, st.table.get());
  }
  M2IV_DISPATCH3(vectors.scalar_type(), V, [&] {
    M2IV_DISPATCH3(gates.scalar_type(), G, [&] {
      const V* vp = vectors.data_ptr<V>();
      const G* gp = gates.data_ptr<G>();
      for (size_t i = 0; i < banks.size(); ++i)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t n = banks[i];
          scale_row(vp + n * C + h * Dh, finite_gate(to_f(gp[n * H + h]), n, h), Dh,
                    st.table.get() + i * C + h * Dh);
        }
    });
  });
  return st;
}

// Rows per parallel task: at least ~32K elements, so small inputs stay on one thread.
inline int64_t row_grain(int64_t C) { return std::max<int64_t>(1, (int64_t)32768 / std::max<int64_t>(C, 1)); }

// ------------------------------------------------------------------------------------------
// steer_fwd

template <typename T, bool RES, bool STEER, bool MASKED, bool NT>
void steer_row(const T* x, const T* res, T* out, const float* s, float m, int64_t C) {
  const fVec vm(m);
  int64_t c = 0;
  for (; c + kU <= C; c += kU) {
    fVec a, b;
    IO<T>::load(x + c, a, b);
    if constexpr (RES) {
      fVec ra, rb;
      IO<T>::load(res + c, ra, rb);
      a = ra + a;
      b = rb + b;
    }
    if constexpr (STEER) {
      fVec sa, sb;
      load_f32(s + c, sa, sb);
      if constexpr (MASKED) {
        sa = sa * vm;
        sb = sb * vm;
      }
      a = a + sa;
      b = b + sb;
    }
    if constexpr (NT)
      stream_unit<T>(out + c, a, b);
    else
      IO<T>::store(out + c, a, b);
  }
  if (c < C) {
    const int64_t n = C - c;
    fVec a, b;
    IO<T>::load(x + c, n, a, b);
    if constexpr (RES) {
      fVec ra, rb;
      IO<T>::load(res + c, n, ra, rb);
      a = ra + a;
      b = rb + b;
    }
    if constexpr (STEER) {
      fVec sa, sb;
      load_f32(s + c, n, sa, sb);
      if constexpr (MASKED) {
        sa = sa * vm;
        sb = sb * vm;
      }
      a = a + sa;
      b = b + sb;
    }
    IO<T>::store(out + c, n, a, b);
  }
}

template <typename T, bool RES, bool NT>
void steer_rows(const T* x, int64_t sx, const T* res, int64_t sr, T* out, int64_t so,
                const Steering& st, Mask mask, int64_t R, int64_t C) {
  const bool inplace = !RES && (const void*)x == (const void*)out && sx == so;
  at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* s = st.row(r);
      const float m = mask ? mask[r] : 1.f;
      if (mask && m == 0.f) s = nullptr;  // masked out: unsteered
      const T* xr = x + r * sx;
      const T* rr = RES ? res + r * sr : nullptr;
      T* o = out + r * so;
      if (!s) {
        if (!inplace) steer_row<T, RES, false, false, NT>(xr, rr, o, nullptr, 1.f, C);
      } else if (mask && m != 1.f) {
        steer_row<T, RES, true, true, NT>(xr, rr, o, s, m, C);
      } else {
        steer_row<T, RES, true, false, NT>(xr, rr, o, s, 1.f, C);
      }
    }
    if (NT) stream_fence();
  });
}

template <typename T, bool RES>
void steer_rows(const T* x, int64_t sx, const T* res, int64_t sr, T* out, int64_t so,
                const Steering& st, Mask mask, int64_t R, int64_t C) {
  // in place, the destination lines are already in cache: plain stores
  const bool inplace = (const void*)x == (const void*)out;
  if (!inplace && use_stream(out, so, R, C))
    steer_rows<T, RES, true>(x, sx, res, sr, out, so, st, mask, R, C);
  else
    steer_rows<T, RES, false>(x, sx, res, sr, out, so, st, mask, R, C);
}

// ------------------------------------------------------------------------------------------
// Column sums: rows are split into K contiguous chunks (fixed for a given shape and thread
// count <= 16, so results are reproducible); each chunk sums into its own fp32 [NB, C]
// partial (bank rows zeroed on first touch), then the partials are added in chunk order.

inline int64_t n_chunks(int64_t R, int64_t C, int64_t NB) {
  const int64_t rows_min = std::max<int64_t>(16, (int64_t)65536 / std::max<int64_t>(C, 1));
  int64_t k = std::min<int64_t>((R + rows_min - 1) / rows_min,
                                std::max<int64_t>(16, at::get_num_threads()));
  // keep the partial buffers below ~64 MB
  const int64_t cap = std::max<int64_t>(1, ((int64_t)16 << 20) / std::max<int64_t>(NB * C, 1));
  return std::max<int64_t>(1, std::min(k, cap));
}

struct Partials {
  int64_t K, NB, C;
  std::unique_ptr<float[]> data;  // [K, NB, C]; unused when K == 1 (sums go to `out`)
  std::vector<char> touched;      // [K, NB]
  float* out;                     // [NB, C], zero-initialized

  Partials(int64_t K_, int64_t NB_, int64_t C_, float* out_)
      : K(K_), NB(NB_), C(C_), touched(K_ * NB_, 0), out(out_) {
    if (K > 1) data.reset(new float[K * NB * C]);
  }
  // The accumulator of bank row `n` for chunk `k`.
  float* get(int64_t k, int64_t n) {
    if (K == 1) return out + n * C;
    float* p = data.get() + (k * NB + n) * C;
    if (!touched[k * NB + n]) {
      std::memset(p, 0, sizeof(float) * C);
      touched[k * NB + n] = 1;
    }
    return p;
  }
  void reduce() {
    if (K == 1) return;
    at::parallel_for(0, NB, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        float* o = out + n * C;
        for (int64_t k = 0; k < K; ++k) {
          if (!touched[k * NB + n]) continue;
          const float* p = data.get() + (k * NB + n) * C;
          at::vec::map2<float>([](fVec a, fVec b) { return a + b; }, o, o, p, C);
        }
      }
    });
  }
};

// acc[c] += m * g[c]
template <typename T, bool MASKED>
inline void acc_row(float* acc, const T* g, float m, int64_t C) {
  const fVec vm(m);
  int64_t c = 0;
  for (; c + kU <= C; c += kU) {
    fVec a, b, pa, pb;
    IO<T>::load(g + c, a, b);
    load_f32(acc + c, pa, pb);
    if constexpr (MASKED) {
      a = a * vm;
      b = b * vm;
    }
    store_f32(acc + c, pa + a, pb + b);
  }
  if (c < C) {
    const int64_t n = C - c;
    fVec a, b, pa, pb;
    IO<T>::load(g + c, n, a, b);
    load_f32(acc + c, n, pa, pb);
    if constexpr (MASKED) {
      a = a * vm;
      b = b * vm;
    }
    store_f32(acc + c, n, pa + a, pb + b);
  }
}

inline int64_t bank_of(const int64_t* idx, int64_t r, int64_t rps, int64_t NB) {
  const int64_t b = idx ? idx[r / rps] : 0;
  return (b >= 0 && b < NB) ? b : -1;
}

template <typename T>
void colsum_rows(const T* g, int64_t sg, Mask mask, const int64_t* idx, int64_t rps,
                 int64_t R, int64_t C, Partials& part) {
  const int64_t K = part.K;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = R * k / K, r1 = R * (k + 1) / K;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = bank_of(idx, r, rps, part.NB);
        const float m = mask ? mask[r] : 1.f;
        if (b < 0 || m == 0.f) continue;
        float* acc = part.get(k, b);
        if (m != 1.f)
          acc_row<T, true>(acc, g + r * sg, m, C);
        else
          acc_row<T, false>(acc, g + r * sg, 1.f, C);
      }
    }
  });
  part.reduce();
}

// ------------------------------------------------------------------------------------------
// RMSNorm forward

template <typename T, bool NT>
void rms_fwd_rows(const T* x, int64_t sx, const T* res, int64_t sr, const Steering& st,
                  Mask mask, const float* w, float eps, int64_t R, int64_t C,
                  T* normed, T* new_res, float* rstd) {
  at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
    // the rounded row in fp32 for the second pass (L1/L2-resident), so the outputs can stream
    std::unique_ptr<float[]> ybuf(new float[C]);
    float* y = ybuf.get();
    for (int64_t r = r0; r < r1; ++r) {
      const float* s = st.row(r);
      const float m = mask ? mask[r] : 1.f;
      if (mask && m == 0.f) s = nullptr;
      const fVec vm(m);
      const bool scale = mask && m != 1.f;
      const T* xr = x + r * sx;
      const T* rr = res + r * sr;
      T* nr = new_res + r * C;
      T* yr = normed + r * C;
      fVec ss0(0.f), ss1(0.f);
      auto step = [&](int64_t c, int64_t n) {
        const bool full = n == kU;
        fVec a, b, ra, rb;
        if (full) {
          IO<T>::load(xr + c, a, b);
          IO<T>::load(rr + c, ra, rb);
        } else {
          IO<T>::load(xr + c, n, a, b);
          IO<T>::load(rr + c, n, ra, rb);
        }
        a = ra + a;
        b = rb + b;
        if (s) {
          fVec sa, sb;
          if (full)
            load_f32(s + c, sa, sb);
          else
            load_f32(s + c, n, sa, sb);
          if (scale) {
            sa = sa * vm;
            sb = sb * vm;
          }
          a = a + sa;
          b = b + sb;
        }
        if (full) {
          if constexpr (NT) {
            stream_unit<T>(nr + c, a, b);
            if constexpr (!std::is_same_v<T, float>)  // the norm reads the rounded sum
              std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
          } else {
            IO<T>::store_rounded(nr + c, a, b);
          }
          store_f32(y + c, a, b);
        } else {
          IO<T>::store_rounded(nr + c, n, a, b);
          store_f32(y + c, n, a, b);
        }
        ss0 = at::vec::fmadd(a, a, ss0);
        ss1 = at::vec::fmadd(b, b, ss1);
      };
      int64_t c = 0;
      for (; c + kU <= C; c += kU) step(c, kU);
      if (c < C) step(c, C - c);
      const float rs = 1.f / std::sqrt(hsum(ss0 + ss1) / (float)C + eps);
      rstd[r] = rs;
      const fVec vr(rs);
      // second pass: normed = (y * rstd) * w
      c = 0;
      for (; c + kU <= C; c += kU) {
        fVec a, b, wa, wb;
        load_f32(y + c, a, b);
        load_f32(w + c, wa, wb);
        if constexpr (NT)
          stream_unit<T>(yr + c, (a * vr) * wa, (b * vr) * wb);
        else
          IO<T>::store(yr + c, (a * vr) * wa, (b * vr) * wb);
      }
      if (c < C) {
        const int64_t n = C - c;
        fVec a, b, wa, wb;
        load_f32(y + c, n, a, b);
        load_f32(w + c, n, wa, wb);
        IO<T>::store(yr + c, n, (a * vr) * wa, (b * vr) * wb);
      }
    }
    if (NT) stream_fence();
  });
}

// ------------------------------------------------------------------------------------------
// RMSNorm backward

template <typename T>
void rms_bwd_rows(const T* gn, int64_t sgn, const T* gr, int64_t sgr, const T* y,
                  const float* rstd, const float* w, Mask mask, const int64_t* idx,
                  int64_t rps, int64_t R, int64_t C, T* dy, Partials& pg, Partials* pw) {
  const int64_t K = pg.K;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = R * k / K, r1 = R * (k + 1) / K;
      float* accw = (pw && r1 > r0) ? pw->get(k, 0) : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = gn + r * sgn;
        const T* yr = y + r * C;
        const T* g2 = gr ? gr + r * sgr : nullptr;
        T* d = dy + r * C;
        const int64_t b = bank_of(idx, r, rps, pg.NB);
        const float m = mask ? mask[r] : 1.f;
        float* accg = (b >= 0 && m != 0.f) ? pg.get(k, b) : nullptr;
        const fVec vm(m);
        const bool scale = m != 1.f;
        const float rs = rstd[r];
        const fVec vr(rs);

        // pass 1: mean(g * w * y)
        fVec d0(0.f), d1(0.f);
        int64_t c = 0;
        for (; c + kU <= C; c += kU) {
          fVec ga, gb, ya, yb, wa, wb;
          IO<T>::load(g + c, ga, gb);
          IO<T>::load(yr + c, ya, yb);
          load_f32(w + c, wa, wb);
          d0 = at::vec::fmadd(ga * wa, ya, d0);
          d1 = at::vec::fmadd(gb * wb, yb, d1);
        }
        if (c < C) {
          const int64_t n = C - c;
          fVec ga, gb, ya, yb, wa, wb;
          IO<T>::load(g + c, n, ga, gb);
          IO<T>::load(yr + c, n, ya, yb);
          load_f32(w + c, n, wa, wb);
          d0 = at::vec::fmadd(ga * wa, ya, d0);
          d1 = at::vec::fmadd(gb * wb, yb, d1);
        }
        const float coef = rs * rs * (hsum(d0 + d1) / (float)C);
        const fVec vc(coef);

        // pass 2: dy = rstd * (g*w - y*coef) [+ grad_residual]; partial sums
        auto step = [&](int64_t c, int64_t n) {
          const bool full = n == kU;
          fVec ga, gb, ya, yb, wa, wb;
          if (full) {
            IO<T>::load(g + c, ga, gb);
            IO<T>::load(yr + c, ya, yb);
            load_f32(w + c, wa, wb);
          } else {
            IO<T>::load(g + c, n, ga, gb);
            IO<T>::load(yr + c, n, ya, yb);
            load_f32(w + c, n, wa, wb);
          }
          fVec da = vr * (ga * wa - ya * vc);
          fVec db = vr * (gb * wb - yb * vc);
          if (g2) {
            fVec ra, rb;
            if (full)
              IO<T>::load(g2 + c, ra, rb);
            else
              IO<T>::load(g2 + c, n, ra, rb);
            da = da + ra;
            db = db + rb;
          }
          if (full)
            IO<T>::store(d + c, da, db);
          else
            IO<T>::store(d + c, n, da, db);
          if (accg) {
            fVec pa, pb;
            if (full)
              load_f32(accg + c, pa, pb);
            else
              load_f32(accg + c, n, pa, pb);
            if (scale) {
              da = da * vm;
              db = db * vm;
            }
            if (full)
              store_f32(accg + c, pa + da, pb + db);
            else
              store_f32(accg + c, n, pa + da, pb + db);
          }
          if (accw) {
            fVec pa, pb;
            if (full)
              load_f32(accw + c, pa, pb);
            else
              load_f32(accw + c, n, pa, pb);
            pa = pa + (ga * ya) * vr;
            pb = pb + (gb * yb) * vr;
            if (full)
              store_f32(accw + c, pa, pb);
            else
              store_f32(accw + c, n, pa, pb);
          }
        };
        c = 0;
        for (; c + kU <= C; c += kU) step(c, kU);
        if (c < C) step(c, C - c);
      }
    }
  });
  pg.reduce();
  if (pw) pw->reduce();
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Operators

Tensor steer_fwd(const Tensor& x, const OptTensor& residual, const Tensor& vectors,
                 const Tensor& gates, const OptTensor& mask, const OptTensor& index,
                 int64_t rows_per_seq, const OptTensor& out_) {
  const Tensor out = out_ ? *out_ : at::empty(x.sizes(), x.options());
  const SteerLayout l = check_steer(x, residual, out, vectors, gates, mask, index, rows_per_seq);
  const int64_t R = l.x.R, C = l.x.C;
  if (R == 0 || C == 0) return out;
  const Steering st = make_steering(vectors, gates, l.bank, index, rows_per_seq);
  const Mask mk = mask_of(mask);
  M2IV_DISPATCH3(x.scalar_type(), T, [&] {
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    if (residual)
      steer_rows<T, true>(xp, l.x.stride, residual->data_ptr<T>(), l.res.stride, op,
                          l.out.stride, st, mk, R, C);
    else
      steer_rows<T, false>(xp, l.x.stride, nullptr, 0, op, l.out.stride, st, mk, R, C);
  });
  return out;
}

Tensor steer_colsum(const Tensor& grad, const OptTensor& mask, const OptTensor& index,
                    int64_t rows_per_seq, int64_t n_bank) {
  const RowView g = rows_of("grad", grad);
  const int64_t R = g.R, C = g.C;
  check_meta(mask, index, R, rows_per_seq);
  Tensor out = at::zeros({n_bank, C}, grad.options().dtype(at::kFloat));
  if (R == 0 || C == 0 || n_bank == 0) return out;
  Partials part(n_chunks(R, C, n_bank), n_bank, C, out.data_ptr<float>());
  M2IV_DISPATCH3(grad.scalar_type(), T, [&] {
    colsum_rows<T>(grad.data_ptr<T>(), g.stride, mask_of(mask),
                   index ? index->data_ptr<int64_t>() : nullptr, rows_per_seq, R, C, part);
  });
  return out;
}

namespace {
// offset + weight in fp32, vectorized
std::unique_ptr<float[]> weight_f32(const Tensor& weight, double offset, int64_t C) {
  TORCH_CHECK(weight.numel() == C && weight.is_contiguous() && kernel_dtype(weight.scalar_type()),
              "m2iv_ext: weight must be a contiguous [", C, "] float32/float16/bfloat16 tensor");
  std::unique_ptr<float[]> w(new float[std::max<int64_t>(C, 1)]);
  const fVec off((float)offset);
  M2IV_DISPATCH3(weight.scalar_type(), W, [&] {
    const W* p = weight.data_ptr<W>();
    float* d = w.get();
    int64_t c = 0;
    for (; c + kU <= C; c += kU) {
      fVec a, b;
      IO<W>::load(p + c, a, b);
      store_f32(d + c, a + off, b + off);
    }
    if (c < C) {
      fVec a, b;
      IO<W>::load(p + c, C - c, a, b);
      store_f32(d + c, C - c, a + off, b + off);
    }
  });
  return w;
}
}  // namespace

std::tuple<Tensor, Tensor, Tensor> rmsnorm_fwd(const Tensor& residual, const Tensor& x,
                                               const Tensor& vectors, const Tensor& gates,
                                               const Tensor& weight, double eps,
                                               double weight_offset, const OptTensor& mask,
                                               const OptTensor& index, int64_t rows_per_seq,
                                               const OptTensor& out) {
  const RowView xv = rows_of("x", x);
  const int64_t R = xv.R, C = xv.C;
  const RowView rv = rows_like("residual", residual, xv, x.scalar_type());
  const BankShape bs = check_bank(vectors, gates, C);
  TORCH_CHECK(bs.H == 1, "m2iv_ext: rmsnorm_fwd takes vectors [N, C] (H = 1)");
  check_meta(mask, index, R, rows_per_seq);
  Tensor normed = at::empty(x.sizes(), x.options());
  Tensor new_res = out ? *out : at::empty(x.sizes(), x.options());
  if (out) dense_rows_like("out", new_res, xv, x.scalar_type());
  Tensor rstd = at::empty(lead_shape(x), x.options().dtype(at::kFloat));
  if (R == 0 || C == 0) return {normed, new_res, rstd};
  const Steering st = make_steering(vectors, gates, bs, index, rows_per_seq);
  const auto w = weight_f32(weight, weight_offset, C);
  M2IV_DISPATCH3(x.scalar_type(), T, [&] {
    // both outputs are contiguous rows: stream them when large
    auto run = [&](auto nt) {
      rms_fwd_rows<T, decltype(nt)::value>(
          x.data_ptr<T>(), xv.stride, residual.data_ptr<T>(), rv.stride, st, mask_of(mask),
          w.get(), (float)eps, R, C, normed.data_ptr<T>(), new_res.data_ptr<T>(),
          rstd.data_ptr<float>());
    };
    const bool aliased = new_res.data_ptr() == residual.data_ptr();  // in place: in cache
    if (!aliased && use_stream(normed.data_ptr<T>(), C, R, C, kStreamMinBytesRms) &&
        use_stream(new_res.data_ptr<T>(), C, R, C, kStreamMinBytesRms))
      run(std::true_type{});
    else
      run(std::false_type{});
  });
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
  Tensor dy = at::empty(new_residual.sizes(), new_residual.options());
  Tensor g = at::zeros({n_bank, C}, new_residual.options().dtype(at::kFloat));
  Tensor dw = need_dw ? at::zeros({C}, g.options()) : at::empty({0}, g.options());
  if (R == 0 || C == 0) return {dy, dw, g};
  const auto w = weight_f32(weight, weight_offset, C);
  const int64_t K = n_chunks(R, C, std::max<int64_t>(n_bank, 1) + 1);
  Partials pg(K, n_bank, C, g.data_ptr<float>());
  std::unique_ptr<Partials> pw;
  if (need_dw) pw.reset(new Partials(K, 1, C, dw.data_ptr<float>()));
  const int64_t sgn = rows_of("grad_normed", grad_normed).stride;
  const int64_t sgr = grad_residual ? rows_of("grad_residual", *grad_residual).stride : 0;
  M2IV_DISPATCH3(new_residual.scalar_type(), T, [&] {
    rms_bwd_rows<T>(grad_normed.data_ptr<T>(), sgn,
                    grad_residual ? grad_residual->data_ptr<T>() : nullptr, sgr,
                    new_residual.data_ptr<T>(), rstd.data_ptr<float>(), w.get(), mask_of(mask),
                    index ? index->data_ptr<int64_t>() : nullptr, rows_per_seq, R, C,
                    dy.data_ptr<T>(), pg, pw.get());
  });
  return {dy, dw, g};
}

}  // namespace cpu
}  // namespace m2iv
