// CUDA kernels of the m2iv steering ops (see m2iv_cuda.h for the launcher API and semantics).
//
// Plain CUDA C++: no PyTorch headers, so CI can compile this file with nvcc alone.
//  - Activations move in 128-bit packs (8 x fp16/bf16 or 4 x fp32) when every row start is
//    16-byte aligned and C is a multiple of the pack; otherwise one element at a time.
//  - Each kernel reads and writes every activation element once.
//  - Row reductions (RMSNorm) use warp shuffles plus shared memory across warps.
//  - Column reductions (vector, gate and weight gradients) are deterministic: per (sequence,
//    row chunk) partial sums in fp32, then a second kernel adds them in a fixed order.
// Vectors, gates and the norm weight may be fp32, fp16 or bf16 independently of the
// activations (a runtime switch on data that stays in L1/L2).
#include "m2iv_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace m2iv_cuda {
namespace {

// ------------------------------------------------------------------------------------------
// Conversions and packed loads

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ __forceinline__ static float f(float v) { return v; }
  __device__ __forceinline__ static float t(float v) { return v; }
};
template <>
struct Cvt<__half> {
  __device__ __forceinline__ static float f(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half t(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ __forceinline__ static float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 t(float v) { return __float2bfloat16_rn(v); }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> t = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = Cvt<T>::f(t.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> t;
#pragma unroll
  for (int j = 0; j < VEC; ++j) t.v[j] = Cvt<T>::t(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = t;
}

// Store round(in) and replace `in` by the rounded values (the norm reads the rounded sum).
template <typename T, int VEC>
__device__ __forceinline__ void store_rounded(T* p, float (&in)[VEC]) {
  Pack<T, VEC> t;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    t.v[j] = Cvt<T>::t(in[j]);
    in[j] = Cvt<T>::f(t.v[j]);
  }
  *reinterpret_cast<Pack<T, VEC>*>(p) = t;
}

// VEC parameters (vector / weight entries) of type P as fp32, in loads of at most 16 bytes.
template <typename P, int VEC>
__device__ __forceinline__ void load_param_t(const P* p, bool aligned, float (&out)[VEC]) {
  constexpr int W = (16 / (int)sizeof(P)) < VEC ? (16 / (int)sizeof(P)) : VEC;
  if (aligned) {
#pragma unroll
    for (int q = 0; q < VEC / W; ++q) {
      const Pack<P, W> t = *reinterpret_cast<const Pack<P, W>*>(p + q * W);
#pragma unroll
      for (int j = 0; j < W; ++j) out[q * W + j] = Cvt<P>::f(t.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = Cvt<P>::f(p[j]);
  }
}

template <int VEC>
__device__ __forceinline__ void load_param(const void* base, int dt, int64_t off, bool aligned,
                                           float (&out)[VEC]) {
  if (dt == kFloat32) {
    load_param_t<float, VEC>(static_cast<const float*>(base) + off, aligned, out);
  } else if (dt == kFloat16) {
    load_param_t<__half, VEC>(static_cast<const __half*>(base) + off, aligned, out);
  } else {
    load_param_t<__nv_bfloat16, VEC>(static_cast<const __nv_bfloat16*>(base) + off, aligned,
                                     out);
  }
}

__device__ __forceinline__ float load_scalar(const void* base, int dt, int64_t i) {
  if (dt == kFloat32) return static_cast<const float*>(base)[i];
  if (dt == kFloat16) return __half2float(static_cast<const __half*>(base)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}

__device__ __forceinline__ float mask_at(const void* mask, int dt, int64_t r) {
  if (dt == kBool) return static_cast<const bool*>(mask)[r] ? 1.f : 0.f;
  return load_scalar(mask, dt, r);
}

__device__ __forceinline__ int64_t bank_of(const RowMeta& meta, int64_t r) {
  return meta.index ? meta.index[r / meta.rows_per_seq] : 0;
}

// Sum of `v` over the blockDim.x threads of one row (threadIdx.y); every thread of the block
// must call it. `smem` holds blockDim.y * 32 floats. The xor butterfly leaves the same value in
// every lane; warps are then added in a fixed order: deterministic.
__device__ __forceinline__ float row_sum(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (blockDim.x == 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* s = smem + threadIdx.y * 32;
  if (lane == 0) s[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += s[w];
  __syncthreads();
  return t;
}

// ------------------------------------------------------------------------------------------
// steer_fwd: one thread per (pack of VEC columns, ROWS rows)

struct SteerParams {
  const void* x;
  const void* res;
  void* out;
  int64_t sx, sr, so;
  const void* vec;
  const void* gate;
  int vdt, gdt;
  bool param_aligned;
  int64_t R, C, H, Dh;
  RowMeta meta;
};

constexpr int kSteerRows = 4;
constexpr int kSteerThreads = 128;

template <typename T, int VEC, bool HAS_RES>
__global__ void __launch_bounds__(kSteerThreads) steer_fwd_kernel(const SteerParams p) {
  const int64_t c0 = ((int64_t)blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= p.C) return;
  const int64_t r0 = (int64_t)blockIdx.x * kSteerRows;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.res);
  T* out = static_cast<T*>(p.out);

  // Issue every load before the first store (out may alias x).
  float xv[kSteerRows][VEC];
#pragma unroll
  for (int k = 0; k < kSteerRows; ++k) {
    const int64_t r = r0 + k;
    if (r < p.R) {
      load_f<T, VEC>(x + r * p.sx + c0, xv[k]);
      if (HAS_RES) {
        float rv[VEC];
        load_f<T, VEC>(res + r * p.sr + c0, rv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xv[k][j] += rv[j];
      }
    }
  }
  float s[VEC];
  int64_t cur = -1;  // bank row whose steering term is in s
#pragma unroll
  for (int k = 0; k < kSteerRows; ++k) {
    const int64_t r = r0 + k;
    if (r >= p.R) break;
    const int64_t bank = bank_of(p.meta, r);
    if (bank >= 0 && bank < p.meta.n_bank) {
      if (bank != cur) {
        cur = bank;
        load_param<VEC>(p.vec, p.vdt, bank * p.C + c0, p.param_aligned, s);
        if (p.Dh % VEC == 0) {
          const float g = load_scalar(p.gate, p.gdt, bank * p.H + c0 / p.Dh);
#pragma unroll
          for (int j = 0; j < VEC; ++j) s[j] = g * s[j];
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            s[j] = load_scalar(p.gate, p.gdt, bank * p.H + (c0 + j) / p.Dh) * s[j];
        }
      }
      if (p.meta.mask) {
        const float m = mask_at(p.meta.mask, p.meta.mask_dtype, r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xv[k][j] += s[j] * m;
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xv[k][j] += s[j];
      }
    }
    store_f<T, VEC>(out + r * p.so + c0, xv[k]);
  }
}

// ------------------------------------------------------------------------------------------
// Column sums: stage 1 writes partials [n_seq * n_chunks, C], stage 2 reduces them per bank.

constexpr int kColX = 32;  // packs across a block
constexpr int kColY = 8;   // row lanes

struct ChunkRange {
  int64_t start, end;
};

__device__ __forceinline__ ChunkRange chunk_rows(int64_t part, int64_t n_chunks, int64_t rps,
                                                 int64_t rows_per_chunk, int64_t R) {
  const int64_t seq = part / n_chunks, chunk = part % n_chunks;
  const int64_t start = seq * rps + chunk * rows_per_chunk;
  int64_t end = start + rows_per_chunk;
  if (end > (seq + 1) * rps) end = (seq + 1) * rps;
  if (end > R) end = R;
  return {start, end};
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kColX* kColY)
    colsum_kernel(const T* __restrict__ g, int64_t sg, int64_t R, int64_t C,
                  const void* __restrict__ mask, int mask_dt, int64_t rps,
                  int64_t rows_per_chunk,
                  int64_t n_chunks, float* __restrict__ part) {
  __shared__ float smem[kColY][kColX * VEC];
  const int64_t c0 = ((int64_t)blockIdx.y * kColX + threadIdx.x) * VEC;
  const bool active = c0 < C;
  const ChunkRange cr = chunk_rows(blockIdx.x, n_chunks, rps, rows_per_chunk, R);
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (active) {
#pragma unroll 4
    for (int64_t r = cr.start + threadIdx.y; r < cr.end; r += kColY) {
      float v[VEC];
      load_f<T, VEC>(g + r * sg + c0, v);
      const float m = mask ? mask_at(mask, mask_dt, r) : 1.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += v[j] * m;
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) smem[threadIdx.y][threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    float* dst = part + (int64_t)blockIdx.x * C + c0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float t = smem[0][threadIdx.x * VEC + j];
#pragma unroll
      for (int l = 1; l < kColY; ++l) t += smem[l][threadIdx.x * VEC + j];
      dst[j] = t;
    }
  }
}

// out[n, c] = sum over sequences s with bank(s) == n (in order) of sum_k part[s, k, c].
// index == nullptr: every sequence belongs to bank 0.
__global__ void reduce_banks_kernel(const float* __restrict__ part, int64_t n_seq,
                                    int64_t n_chunks, int64_t C,
                                    const int64_t* __restrict__ index, float* __restrict__ out) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t n = blockIdx.y;
  float acc = 0.f;
  for (int64_t s = 0; s < n_seq; ++s) {
    if ((index ? index[s] : 0) != n) continue;
    const float* p = part + s * n_chunks * C + c;
    for (int64_t k = 0; k < n_chunks; ++k) acc += p[k * C];
  }
  out[n * C + c] = acc;
}

// ------------------------------------------------------------------------------------------
// RMSNorm: blockDim = (TPR threads per row, RPB rows); each thread holds ITEMS packs of a row in
// registers (ITEMS == 0: loop over the row and re-read what it wrote, for very wide rows).

struct RowCfg {
  int items, tpr, rpb;
};

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Packs per thread (ITEMS), threads per row (TPR, a multiple of 32) and rows per block (RPB):
// grow ITEMS up to max_items while a row would need more than `target` threads; rows wider
// than kRowThreads * max_items packs use the looping variant (ITEMS == 0). Blocks hold at most
// kRowThreads threads (the kernels' launch bound: <= 128 registers a thread).
constexpr int kRowThreads = 512;

inline RowCfg row_cfg(int64_t C, int vec, int max_items, int target) {
  const int64_t groups = C / vec;
  int items = 1;
  while (items < max_items && (groups + items - 1) / items > target) items *= 2;
  const int64_t threads = (groups + items - 1) / items;
  if (threads > kRowThreads) return {0, kRowThreads, 1};
  const int tpr = threads <= 32 ? 32 : next_pow2(threads);
  const int rpb = (items == 1 && tpr < 256) ? 256 / tpr : 1;
  return {items, tpr, rpb};
}

struct RmsFwdParams {
  const void* x;
  const void* res;
  int64_t sx, sr;
  const void* vec;
  const void* gate;
  const void* w;
  int vdt, gdt, wdt;
  bool param_aligned;
  float eps, w_off;
  int64_t R, C;
  RowMeta meta;
  void* normed;
  void* new_res;
  float* rstd;
};

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kRowThreads) rmsnorm_fwd_kernel(const RmsFwdParams p) {
  extern __shared__ float smem[];
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = row < p.R;
  const int64_t groups = p.C / VEC;
  const T* x = static_cast<const T*>(p.x) + row * p.sx;
  const T* res = static_cast<const T*>(p.res) + row * p.sr;
  T* new_res = static_cast<T*>(p.new_res) + row * p.C;
  T* normed = static_cast<T*>(p.normed) + row * p.C;

  // acc = x + residual + (gate * vec) * mask: the reference's association.
  int64_t bank = -1;
  float gate = 0.f, m = 1.f;
  if (valid) {
    const int64_t b = bank_of(p.meta, row);
    if (b >= 0 && b < p.meta.n_bank) {
      bank = b;
      gate = load_scalar(p.gate, p.gdt, b);
      if (p.meta.mask) m = mask_at(p.meta.mask, p.meta.mask_dtype, row);
    }
  }
  auto add_row = [&](int64_t c0, float (&a)[VEC]) {
    float rv[VEC];
    load_f<T, VEC>(x + c0, a);
    load_f<T, VEC>(res + c0, rv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) a[j] += rv[j];
    if (bank >= 0) {
      float v[VEC];
      load_param<VEC>(p.vec, p.vdt, bank * p.C + c0, p.param_aligned, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) a[j] += (gate * v[j]) * m;
    }
  };
  auto write_normed = [&](int64_t c0, const float (&y)[VEC], float rstd) {
    float w[VEC], o[VEC];
    load_param<VEC>(p.w, p.wdt, c0, p.param_aligned, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = (y[j] * rstd) * (p.w_off + w[j]);
    store_f<T, VEC>(normed + c0, o);
  };

  float ss = 0.f;
  if constexpr (ITEMS > 0) {
    float y[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t g = threadIdx.x + (int64_t)i * blockDim.x;
      if (valid && g < groups) {
        add_row(g * VEC, y[i]);
        store_rounded<T, VEC>(new_res + g * VEC, y[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += y[i][j] * y[i][j];
      }
    }
    const float rstd = 1.f / sqrtf(row_sum(ss, smem) / (float)p.C + p.eps);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t g = threadIdx.x + (int64_t)i * blockDim.x;
      if (valid && g < groups) write_normed(g * VEC, y[i], rstd);
    }
    if (valid && threadIdx.x == 0) p.rstd[row] = rstd;
  } else {
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      if (!valid) break;
      float y[VEC];
      add_row(g * VEC, y);
      store_rounded<T, VEC>(new_res + g * VEC, y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += y[j] * y[j];
    }
    const float rstd = 1.f / sqrtf(row_sum(ss, smem) / (float)p.C + p.eps);
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      if (!valid) break;
      float y[VEC];
      load_f<T, VEC>(new_res + g * VEC, y);  // this thread's own writes
      write_normed(g * VEC, y, rstd);
    }
    if (valid && threadIdx.x == 0) p.rstd[row] = rstd;
  }
}

struct RmsBwdParams {
  const void* gn;
  const void* gr;
  int64_t sgn, sgr;
  const void* y;
  const float* rstd;
  const void* w;
  int wdt;
  bool w_aligned, need_dw;
  float w_off;
  int64_t R, C;
  const void* mask;
  int mask_dt;
  int64_t rps, rows_per_chunk, n_chunks;
  void* dy;
  float* part_g;
  float* part_w;
};

// One block per (sequence, row chunk). Each thread keeps the partial column sums of its
// packs in registers (ITEMS > 0) or in its own slice of the partial buffer (ITEMS == 0).
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kRowThreads) rmsnorm_bwd_kernel(const RmsBwdParams p) {
  extern __shared__ float smem[];  // [RPB * 32] row sums, then 2 * TPR * VEC lane partials
  const ChunkRange cr = chunk_rows(blockIdx.x, p.n_chunks, p.rps, p.rows_per_chunk, p.R);
  const int64_t groups = p.C / VEC;
  const T* GN = static_cast<const T*>(p.gn);
  const T* GR = static_cast<const T*>(p.gr);
  const T* Y = static_cast<const T*>(p.y);
  T* DY = static_cast<T*>(p.dy);
  float* pg = p.part_g + (int64_t)blockIdx.x * p.C;
  float* pw = p.part_w ? p.part_w + (int64_t)blockIdx.x * p.C : nullptr;

  // One row: dy (stored), and fp32 m * dy and g * y * rstd handed to `acc`.
  auto dot_row = [&](int64_t r, int64_t c0, const float (&w)[VEC], float (&gn)[VEC],
                     float (&y)[VEC]) -> float {
    load_f<T, VEC>(GN + r * p.sgn + c0, gn);
    load_f<T, VEC>(Y + r * p.C + c0, y);
    float d = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) d += (gn[j] * w[j]) * y[j];
    return d;
  };
  auto finish = [&](int64_t r, int64_t c0, const float (&w)[VEC], const float (&gn)[VEC],
                    const float (&y)[VEC], float rs, float coef, float m, float (&ag)[VEC],
                    float (&aw)[VEC]) {
    float dy[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) dy[j] = rs * (gn[j] * w[j] - y[j] * coef);
    if (p.gr) {
      float g2[VEC];
      load_f<T, VEC>(GR + r * p.sgr + c0, g2);
#pragma unroll
      for (int j = 0; j < VEC; ++j) dy[j] += g2[j];
    }
    store_f<T, VEC>(DY + r * p.C + c0, dy);
#pragma unroll
    for (int j = 0; j < VEC; ++j) ag[j] += dy[j] * m;
    if (p.need_dw) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) aw[j] += gn[j] * y[j] * rs;
    }
  };

  if constexpr (ITEMS > 0) {
    float w[ITEMS][VEC], ag[ITEMS][VEC], aw[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t g = threadIdx.x + (int64_t)i * blockDim.x;
#pragma unroll
      for (int j = 0; j < VEC; ++j) ag[i][j] = aw[i][j] = w[i][j] = 0.f;
      if (g < groups) {
        load_param<VEC>(p.w, p.wdt, g * VEC, p.w_aligned, w[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) w[i][j] += p.w_off;
      }
    }
    // Every thread runs the same number of iterations (row_sum synchronizes the block).
    for (int64_t base = cr.start; base < cr.end; base += blockDim.y) {
      const int64_t r = base + threadIdx.y;
      const bool valid = r < cr.end;
      float gn[ITEMS][VEC], y[ITEMS][VEC];
      float d = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t g = threadIdx.x + (int64_t)i * blockDim.x;
        if (valid && g < groups) d += dot_row(r, g * VEC, w[i], gn[i], y[i]);
      }
      d = row_sum(d, smem);
      if (valid) {
        const float rs = p.rstd[r];
        const float coef = rs * rs * (d / (float)p.C);
        const float m = p.mask ? mask_at(p.mask, p.mask_dt, r) : 1.f;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int64_t g = threadIdx.x + (int64_t)i * blockDim.x;
          if (g < groups) finish(r, g * VEC, w[i], gn[i], y[i], rs, coef, m, ag[i], aw[i]);
        }
      }
    }
    // Add the row lanes in order (RPB > 1 only with ITEMS == 1), then write the partials.
    float* lane_g = smem + blockDim.y * 32;
    float* lane_w = lane_g + blockDim.x * VEC;
    for (int l = 0; l < (int)blockDim.y; ++l) {
      if ((int)threadIdx.y == l) {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int64_t g = threadIdx.x + (int64_t)i * blockDim.x;
          if (g >= groups) continue;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            float tg = ag[i][j], tw = aw[i][j];
            if (l > 0) {
              tg += lane_g[threadIdx.x * VEC + j];
              tw += lane_w[threadIdx.x * VEC + j];
            }
            if (l + 1 < (int)blockDim.y) {
              lane_g[threadIdx.x * VEC + j] = tg;
              lane_w[threadIdx.x * VEC + j] = tw;
            } else {
              pg[g * VEC + j] = tg;
              if (pw) pw[g * VEC + j] = tw;
            }
          }
        }
      }
      if (blockDim.y > 1) __syncthreads();
    }
  } else {
    // Wide rows, RPB == 1: partial sums accumulate in this block's slice of part_g / part_w,
    // each column owned by one thread (no races, fixed order).
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        pg[g * VEC + j] = 0.f;
        if (pw) pw[g * VEC + j] = 0.f;
      }
    }
    for (int64_t r = cr.start; r < cr.end; ++r) {
      float d = 0.f;
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
        float w[VEC], gn[VEC], y[VEC];
        load_param<VEC>(p.w, p.wdt, g * VEC, p.w_aligned, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) w[j] += p.w_off;
        d += dot_row(r, g * VEC, w, gn, y);
      }
      d = row_sum(d, smem);
      const float rs = p.rstd[r];
      const float coef = rs * rs * (d / (float)p.C);
      const float m = p.mask ? mask_at(p.mask, p.mask_dt, r) : 1.f;
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
        float w[VEC], gn[VEC], y[VEC], ag[VEC], aw[VEC];
        load_param<VEC>(p.w, p.wdt, g * VEC, p.w_aligned, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) w[j] += p.w_off;
        load_f<T, VEC>(GN + r * p.sgn + g * VEC, gn);
        load_f<T, VEC>(Y + r * p.C + g * VEC, y);
#pragma unroll
        for (int j = 0; j < VEC; ++j) ag[j] = aw[j] = 0.f;
        finish(r, g * VEC, w, gn, y, rs, coef, m, ag, aw);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          pg[g * VEC + j] += ag[j];
          if (pw) pw[g * VEC + j] += aw[j];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T>
constexpr int wide() {
  return 16 / (int)sizeof(T);
}

// Can rows move in 16-byte packs? (C a multiple of the pack, every row start aligned.)
template <typename T>
bool packable(int64_t C, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  constexpr int V = wide<T>();
  if (C % V) return false;
  for (const auto& pr : rows)
    if (pr.first && (!aligned16(pr.first) || pr.second % V)) return false;
  return true;
}

#define M2IV_DISPATCH_ACT(act, T, ...)            \
  switch (act) {                                  \
    case kFloat32: {                              \
      using T = float;                            \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
    case kFloat16: {                              \
      using T = __half;                           \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
    default: {                                    \
      using T = __nv_bfloat16;                    \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
  }

template <typename T, int VEC>
void launch_steer(const SteerParams& p, cudaStream_t stream) {
  const int64_t groups = p.C / VEC;
  const int threads = groups >= kSteerThreads ? kSteerThreads : (int)((groups + 31) / 32 * 32);
  const dim3 grid((unsigned)((p.R + kSteerRows - 1) / kSteerRows),
                  (unsigned)((groups + threads - 1) / threads));
  if (p.res)
    steer_fwd_kernel<T, VEC, true><<<grid, threads, 0, stream>>>(p);
  else
    steer_fwd_kernel<T, VEC, false><<<grid, threads, 0, stream>>>(p);
}

template <typename T, int VEC>
void launch_colsum(const T* g, int64_t sg, int64_t R, int64_t C, const RowMeta& meta,
                   int64_t n_seq, int64_t n_chunks, float* part, cudaStream_t stream) {
  const int64_t groups = C / VEC;
  const int64_t per_chunk = (meta.rows_per_seq + n_chunks - 1) / n_chunks;
  const dim3 grid((unsigned)(n_seq * n_chunks), (unsigned)((groups + kColX - 1) / kColX));
  colsum_kernel<T, VEC><<<grid, dim3(kColX, kColY), 0, stream>>>(
      g, sg, R, C, meta.mask, meta.mask_dtype, meta.rows_per_seq, per_chunk, n_chunks, part);
}

void launch_reduce(const float* part, int64_t n_seq, int64_t n_chunks, int64_t C,
                   const int64_t* index, int64_t n_out, float* out, cudaStream_t stream) {
  const dim3 grid((unsigned)((C + 255) / 256), (unsigned)n_out);
  reduce_banks_kernel<<<grid, 256, 0, stream>>>(part, n_seq, n_chunks, C, index, out);
}

template <typename T, int VEC>
void launch_rms_fwd(const RmsFwdParams& p, cudaStream_t stream) {
  // scalar rows (VEC == 1) hold at most 4 values a thread: 8 would spill (ptxas, sm_90)
  const RowCfg cfg = row_cfg(p.C, VEC, VEC > 1 ? 8 : 4, 256);
  const dim3 block(cfg.tpr, cfg.rpb);
  const unsigned grid = (unsigned)((p.R + cfg.rpb - 1) / cfg.rpb);
  const size_t shmem = (size_t)cfg.rpb * 32 * sizeof(float);
  switch (cfg.items) {
    case 1: rmsnorm_fwd_kernel<T, VEC, 1><<<grid, block, shmem, stream>>>(p); break;
    case 2: rmsnorm_fwd_kernel<T, VEC, 2><<<grid, block, shmem, stream>>>(p); break;
    case 4: rmsnorm_fwd_kernel<T, VEC, 4><<<grid, block, shmem, stream>>>(p); break;
    case 8:
      if constexpr (VEC > 1) {
        rmsnorm_fwd_kernel<T, VEC, 8><<<grid, block, shmem, stream>>>(p);
        break;
      }
      [[fallthrough]];
    default: rmsnorm_fwd_kernel<T, VEC, 0><<<grid, block, shmem, stream>>>(p); break;
  }
}

template <typename T, int VEC>
void launch_rms_bwd(const RmsBwdParams& p, int64_t n_parts, cudaStream_t stream) {
  // at most 16 fp32 values of a row per thread: w, two partial sums, g and y stay in registers
  const RowCfg cfg = row_cfg(p.C, VEC, VEC >= 8 ? 2 : 4, 512);
  const dim3 block(cfg.tpr, cfg.rpb);
  size_t shmem = (size_t)cfg.rpb * 32 * sizeof(float);
  if (cfg.rpb > 1) shmem += 2 * (size_t)cfg.tpr * VEC * sizeof(float);
  switch (cfg.items) {
    case 1: rmsnorm_bwd_kernel<T, VEC, 1><<<(unsigned)n_parts, block, shmem, stream>>>(p); break;
    case 2: rmsnorm_bwd_kernel<T, VEC, 2><<<(unsigned)n_parts, block, shmem, stream>>>(p); break;
    case 4:
      if constexpr (VEC < 8) {
        rmsnorm_bwd_kernel<T, VEC, 4><<<(unsigned)n_parts, block, shmem, stream>>>(p);
        break;
      }
      [[fallthrough]];
    default: rmsnorm_bwd_kernel<T, VEC, 0><<<(unsigned)n_parts, block, shmem, stream>>>(p); break;
  }
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

namespace {
// Chunks per sequence so that ~4 blocks per multiprocessor run, each over >= min_rows rows
// (which keeps the partial buffer small next to the input).
int64_t chunks_for(int64_t n_seq, int64_t rows_per_seq, int64_t blocks_per_chunk, int n_sm,
                   int64_t min_rows) {
  const int64_t target = cdiv(4 * (int64_t)(n_sm > 0 ? n_sm : 1), blocks_per_chunk);
  int64_t n = cdiv(target, n_seq > 0 ? n_seq : 1);
  const int64_t by_rows = cdiv(rows_per_seq, min_rows);
  if (n > by_rows) n = by_rows;
  return n < 1 ? 1 : n;
}
}  // namespace

int64_t colsum_chunks(int64_t n_seq, int64_t rows_per_seq, int64_t C, int n_sm) {
  return chunks_for(n_seq, rows_per_seq, cdiv(C, 8 * kColX), n_sm, 32);
}

int64_t rmsnorm_bwd_chunks(int64_t n_seq, int64_t rows_per_seq, int64_t C, int n_sm) {
  (void)C;  // one block spans a whole row
  return chunks_for(n_seq, rows_per_seq, 1, n_sm, 16);
}

cudaError_t steer_fwd(DType act, const void* x, int64_t stride_x, const void* residual,
                      int64_t stride_r, void* out, int64_t stride_o, DType vec_dtype,
                      const void* vectors, DType gate_dtype, const void* gates, int64_t R,
                      int64_t C, int64_t H, int64_t Dh, RowMeta meta, cudaStream_t stream) {
  if (R <= 0 || C <= 0) return cudaSuccess;
  SteerParams p{x,    residual, out,       stride_x,          stride_r, stride_o,
                vectors, gates, vec_dtype, gate_dtype, aligned16(vectors), R, C, H, Dh, meta};
  M2IV_DISPATCH_ACT(act, T, {
    if (packable<T>(C, {{x, stride_x}, {residual, stride_r}, {out, stride_o}}))
      launch_steer<T, wide<T>()>(p, stream);
    else
      launch_steer<T, 1>(p, stream);
  });
  return cudaGetLastError();
}

cudaError_t steer_colsum(DType act, const void* grad, int64_t stride_g, int64_t R, int64_t C,
                         RowMeta meta, int64_t n_seq, int64_t n_chunks, float* partial,
                         float* out, cudaStream_t stream) {
  if (C <= 0) return cudaSuccess;
  if (R <= 0) return cudaMemsetAsync(out, 0, sizeof(float) * meta.n_bank * C, stream);
  M2IV_DISPATCH_ACT(act, T, {
    const T* g = static_cast<const T*>(grad);
    if (packable<T>(C, {{grad, stride_g}}))
      launch_colsum<T, wide<T>()>(g, stride_g, R, C, meta, n_seq, n_chunks, partial, stream);
    else
      launch_colsum<T, 1>(g, stride_g, R, C, meta, n_seq, n_chunks, partial, stream);
  });
  launch_reduce(partial, n_seq, n_chunks, C, meta.index, meta.n_bank, out, stream);
  return cudaGetLastError();
}

cudaError_t rmsnorm_fwd(DType act, const void* residual, int64_t stride_r, const void* x,
                        int64_t stride_x, DType vec_dtype, const void* vectors,
                        DType gate_dtype, const void* gates, DType w_dtype, const void* weight,
                        float eps, float weight_offset, int64_t R, int64_t C, RowMeta meta,
                        void* normed, void* new_res, float* rstd, cudaStream_t stream) {
  if (R <= 0 || C <= 0) return cudaSuccess;
  RmsFwdParams p{x,       residual, stride_x, stride_r, vectors, gates,
                 weight,  vec_dtype, gate_dtype, w_dtype,
                 aligned16(vectors) && aligned16(weight),
                 eps,     weight_offset, R, C, meta, normed, new_res, rstd};
  M2IV_DISPATCH_ACT(act, T, {
    if (packable<T>(C, {{x, stride_x}, {residual, stride_r}, {normed, C}, {new_res, C}}))
      launch_rms_fwd<T, wide<T>()>(p, stream);
    else
      launch_rms_fwd<T, 1>(p, stream);
  });
  return cudaGetLastError();
}

cudaError_t rmsnorm_bwd(DType act, const void* grad_normed, int64_t stride_gn,
                        const void* grad_residual, int64_t stride_gr, const void* new_res,
                        const float* rstd, DType w_dtype, const void* weight,
                        float weight_offset, int64_t R, int64_t C, RowMeta meta,
                        int64_t n_seq, int64_t n_chunks, float* part_g, float* part_w,
                        void* dy, float* dw, float* out_g, cudaStream_t stream) {
  if (C <= 0) return cudaSuccess;
  if (R <= 0) {
    cudaError_t e = cudaMemsetAsync(out_g, 0, sizeof(float) * meta.n_bank * C, stream);
    if (e == cudaSuccess && dw) e = cudaMemsetAsync(dw, 0, sizeof(float) * C, stream);
    return e;
  }
  RmsBwdParams p{grad_normed, grad_residual, stride_gn, stride_gr, new_res, rstd, weight,
                 w_dtype, aligned16(weight), dw != nullptr, weight_offset, R, C, meta.mask,
                 meta.mask_dtype,
                 meta.rows_per_seq, cdiv(meta.rows_per_seq, n_chunks), n_chunks, dy, part_g,
                 dw ? part_w : nullptr};
  const int64_t n_parts = n_seq * n_chunks;
  M2IV_DISPATCH_ACT(act, T, {
    if (packable<T>(C, {{grad_normed, stride_gn},
                        {grad_residual, stride_gr},
                        {new_res, C},
                        {dy, C}}))
      launch_rms_bwd<T, wide<T>()>(p, n_parts, stream);
    else
      launch_rms_bwd<T, 1>(p, n_parts, stream);
  });
  launch_reduce(part_g, n_seq, n_chunks, C, meta.index, meta.n_bank, out_g, stream);
  if (dw) launch_reduce(part_w, 1, n_parts, C, nullptr, 1, dw, stream);
  return cudaGetLastError();
}

}  // namespace m2iv_cuda
