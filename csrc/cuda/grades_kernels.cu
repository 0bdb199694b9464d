// grades CUDA kernels: chunked multi-tensor gradient statistics and masked AdamW.
//
// Phase 1 (one thread block per chunk): read the chunk's gradient once (16-byte vector loads where
// every array involved is suitably aligned, scalar loads for the misaligned head and the tail),
// accumulate float32 (float64 for float64 gradients) sum of squares, sum of absolute values and an integer count of
// non-finite values per thread, then reduce them across the block in a fixed order (warp shuffles,
// shared memory; no atomics) into one partial per chunk. The AdamW kernel updates param, exp_avg
// and exp_avg_sq of the same elements in the same pass. Chunks of frozen matrices read nothing and
// write a zero partial.
//
// Phase 2 (one warp per matrix): add the matrix's chunk partials in float64 (lane-strided over the
// matrix's chunk list, then a fixed shuffle tree) and write the [M, 3] float64 statistics.
//
// The AdamW arithmetic follows torch.optim.AdamW in float32 (float64 for float64 params, whose
// statistics are also summed in float64) with IEEE-rounded operations written as explicit
// intrinsics, so compiler flags such as --use_fast_math cannot change it. maximize negates the
// gradient after the statistics; amsgrad keeps max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
// (NaN propagates, as torch.maximum) and takes the denominator from it.
#include "grades_cuda.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace grades_cuda {
namespace {

constexpr int kBlock = 256;            // threads per block in both phases
constexpr int kWarps = kBlock / 32;
constexpr int kVec = 8;                // elements per vectorised step (16 B of a 16-bit type)
constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------- element load / store helpers

template <typename T>
struct Io;

template <>
struct Io<float> {
  using C = float;  // compute type
  static __device__ __forceinline__ float load1(const float* p) { return *p; }
  static __device__ __forceinline__ void store1(float* p, float x) { *p = x; }
  static __device__ __forceinline__ void load8(const float* p, float (&x)[kVec]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  }
  static __device__ __forceinline__ void store8(float* p, const float (&x)[kVec]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
};

template <>
struct Io<__nv_bfloat16> {
  using C = float;
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store1(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&x)[kVec]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // a bfloat16 is the top half of a float32: widen exactly with shifts
      x[2 * k] = __uint_as_float(w[k] << 16);
      x[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&x)[kVec]) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const unsigned short lo = __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * k]));
      const unsigned short hi = __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * k + 1]));
      w[k] = static_cast<unsigned>(lo) | (static_cast<unsigned>(hi) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Io<__half> {
  using C = float;
  static __device__ __forceinline__ float load1(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store1(__half* p, float x) { *p = __float2half_rn(x); }
  static __device__ __forceinline__ void load8(const __half* p, float (&x)[kVec]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] & 0xffffu)));
      x[2 * k + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] >> 16)));
    }
  }
  static __device__ __forceinline__ void store8(__half* p, const float (&x)[kVec]) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const unsigned short lo = __half_as_ushort(__float2half_rn(x[2 * k]));
      const unsigned short hi = __half_as_ushort(__float2half_rn(x[2 * k + 1]));
      w[k] = static_cast<unsigned>(lo) | (static_cast<unsigned>(hi) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Io<double> {
  using C = double;
  static __device__ __forceinline__ double load1(const double* p) { return *p; }
  static __device__ __forceinline__ void store1(double* p, double x) { *p = x; }
  static __device__ __forceinline__ void load8(const double* p, double (&x)[kVec]) {
#pragma unroll
    for (int k = 0; k < kVec / 2; ++k) {
      const double2 a = reinterpret_cast<const double2*>(p)[k];
      x[2 * k] = a.x;
      x[2 * k + 1] = a.y;
    }
  }
  static __device__ __forceinline__ void store8(double* p, const double (&x)[kVec]) {
#pragma unroll
    for (int k = 0; k < kVec / 2; ++k) reinterpret_cast<double2*>(p)[k] = make_double2(x[2 * k], x[2 * k + 1]);
  }
};

// IEEE-rounded arithmetic in the compute type (overloads, so the formulas below are written once).
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// torch.maximum: the larger value, NaN if either is NaN
template <typename C>
__device__ __forceinline__ C max_nan(C a, C b) {
  return (a > b || a != a) ? a : b;
}

// ---------------------------------------------------------------- statistics accumulator

// Sums in the compute type C: float32 for float32/bfloat16/float16 gradients, float64 for float64.
template <typename C>
struct Acc {
  C sq = 0;
  C ab = 0;
  unsigned nf = 0u;
  __device__ __forceinline__ void add(C g) {
    sq = fma_rn(g, g, sq);
    ab = add_rn(ab, fabs(g));
    nf += isfinite(g) ? 0u : 1u;
  }
};

template <typename C>
__device__ __forceinline__ C unscale(C x, bool has_scale, float scale) {
  return has_scale ? div_rn(x, static_cast<C>(scale)) : x;
}

// ---------------------------------------------------------------- per-element operations

template <typename G>
struct StatsOp {
  using C = typename Io<G>::C;
  const G* __restrict__ g;
  bool has_scale;
  float scale;
  Acc<C> acc;
  __device__ __forceinline__ void one(int i) { acc.add(unscale(Io<G>::load1(g + i), has_scale, scale)); }
  __device__ __forceinline__ void vec(int i) {
    C x[kVec];
    Io<G>::load8(g + i, x);
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc.add(unscale(x[k], has_scale, scale));
  }
};

template <typename C>
struct AdamCoef {
  C decay;      // 1 - lr * weight_decay
  C step_size;  // lr / (1 - beta1^t)
  C bc2_sqrt;   // sqrt(1 - beta2^t)
  C omb1;       // 1 - beta1 (lerp weight)
  C beta2;
  C omb2;       // 1 - beta2
  C eps;
  bool maximize;
};

// torch's lerp: the formula switches at weight 0.5 for accuracy
template <typename C>
__device__ __forceinline__ C lerp_c(C a, C b, C w) {
  return fabs(w) < C(0.5) ? add_rn(a, mul_rn(w, sub_rn(b, a))) : sub_rn(b, mul_rn(sub_rn(b, a), sub_rn(C(1), w)));
}

// One element; x (amsgrad's maximum) is nullptr without amsgrad.
template <typename C>
__device__ __forceinline__ void adamw_elem(const AdamCoef<C>& c, C g, C& p, C& m, C& v, C* x) {
  if (c.maximize) g = -g;
  p = mul_rn(p, c.decay);
  m = lerp_c(m, g, c.omb1);
  v = add_rn(mul_rn(v, c.beta2), mul_rn(mul_rn(c.omb2, g), g));
  C vd = v;
  if (x != nullptr) vd = *x = max_nan(*x, v);
  const C denom = add_rn(div_rn(sqrt_rn(vd), c.bc2_sqrt), c.eps);
  p = sub_rn(p, div_rn(mul_rn(c.step_size, m), denom));
}

// Moments (and amsgrad's maximum, x, nullptr without it) are of the compute type C.
template <typename G, typename P>
struct AdamOp {
  using C = typename Io<P>::C;
  const G* __restrict__ g;
  P* __restrict__ p;
  C* __restrict__ m;
  C* __restrict__ v;
  C* __restrict__ x;
  bool has_scale;
  float scale;
  AdamCoef<C> c;
  Acc<C> acc;
  __device__ __forceinline__ void one(int i) {
    const C gg = unscale(static_cast<C>(Io<G>::load1(g + i)), has_scale, scale);
    acc.add(gg);
    C pp = Io<P>::load1(p + i), mm = m[i], vv = v[i];
    adamw_elem(c, gg, pp, mm, vv, x != nullptr ? x + i : nullptr);
    Io<P>::store1(p + i, pp);
    m[i] = mm;
    v[i] = vv;
  }
  __device__ __forceinline__ void vec(int i) {
    C gg[kVec], pp[kVec], mm[kVec], vv[kVec], xx[kVec];
    Io<G>::load8(g + i, gg);
    Io<P>::load8(p + i, pp);
    Io<C>::load8(m + i, mm);
    Io<C>::load8(v + i, vv);
    if (x != nullptr) Io<C>::load8(x + i, xx);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      gg[k] = unscale(gg[k], has_scale, scale);
      acc.add(gg[k]);
      adamw_elem(c, gg[k], pp[k], mm[k], vv[k], x != nullptr ? xx + k : nullptr);
    }
    Io<P>::store8(p + i, pp);
    Io<C>::store8(m + i, mm);
    Io<C>::store8(v + i, vv);
    if (x != nullptr) Io<C>::store8(x + i, xx);
  }
};

// ---------------------------------------------------------------- chunk driver

// Number of leading elements to skip so that `addr` becomes 16-byte aligned (elements of `es` bytes).
__device__ __forceinline__ int head_elems(uintptr_t addr, int es) {
  return static_cast<int>(((16u - (addr & 15u)) & 15u) / static_cast<unsigned>(es));
}

__device__ __forceinline__ bool aligned_after(const void* ptr, int head, int es) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  return (a % static_cast<uintptr_t>(es)) == 0 && ((a + static_cast<uintptr_t>(head) * es) & 15u) == 0;
}

// Visit elements [0, n) of a chunk: a scalar head up to the first 16-byte boundary of the gradient,
// 8-element vector steps, a scalar tail. When the arrays cannot all be aligned at the same element
// (vec_ok false) everything is scalar. The assignment of elements to threads and the order in which
// each thread visits them depend only on (n, head, vec_ok), which makes the reduction reproducible.
template <class Op>
__device__ __forceinline__ void run_chunk(Op& op, int n, int head, bool vec_ok) {
  const int tid = threadIdx.x;
  if (!vec_ok) {
    for (int i = tid; i < n; i += kBlock) op.one(i);
    return;
  }
  if (head > n) head = n;
  if (tid < head) op.one(tid);
  const int nvec = (n - head) / kVec;
  for (int k = tid; k < nvec; k += kBlock) op.vec(head + k * kVec);
  for (int i = head + nvec * kVec + tid; i < n; i += kBlock) op.one(i);
}

template <typename G>
__device__ Acc<typename Io<G>::C> stats_chunk(const GcSlot& s, int64_t start, int n, bool has_scale, float scale) {
  StatsOp<G> op{reinterpret_cast<const G*>(s.g) + start, has_scale, scale, Acc<typename Io<G>::C>{}};
  const int es = static_cast<int>(sizeof(G));
  const int head = head_elems(reinterpret_cast<uintptr_t>(op.g), es);
  const bool ok = aligned_after(op.g, head, es);
  run_chunk(op, n, head, ok);
  return op.acc;
}

template <typename G, typename P>
__device__ Acc<typename Io<P>::C> adamw_chunk(const GcSlot& s, int64_t start, int n, bool has_scale, float scale,
                                             const AdamCoef<typename Io<P>::C>& c) {
  using C = typename Io<P>::C;
  C* x = s.x != 0 ? reinterpret_cast<C*>(s.x) + start : nullptr;
  AdamOp<G, P> op{reinterpret_cast<const G*>(s.g) + start, reinterpret_cast<P*>(s.p) + start,
                  reinterpret_cast<C*>(s.m) + start, reinterpret_cast<C*>(s.v) + start, x,
                  has_scale, scale, c, Acc<C>{}};
  const int es = static_cast<int>(sizeof(G));
  const int cs = static_cast<int>(sizeof(C));
  const int head = head_elems(reinterpret_cast<uintptr_t>(op.g), es);
  const bool ok = aligned_after(op.g, head, es) && aligned_after(op.p, head, static_cast<int>(sizeof(P))) &&
                  aligned_after(op.m, head, cs) && aligned_after(op.v, head, cs) &&
                  (x == nullptr || aligned_after(x, head, cs));
  run_chunk(op, n, head, ok);
  return op.acc;
}

// Fixed-order block reduction of every thread's accumulator; thread 0 writes the chunk partial.
template <typename C>
__device__ __forceinline__ void write_partial(Acc<C> a, GcPartial* dst) {
  __shared__ C s_sq[kWarps];
  __shared__ C s_ab[kWarps];
  __shared__ unsigned s_nf[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a.sq = add_rn(a.sq, __shfl_down_sync(kFull, a.sq, off));
    a.ab = add_rn(a.ab, __shfl_down_sync(kFull, a.ab, off));
    a.nf += __shfl_down_sync(kFull, a.nf, off);
  }
  if (lane == 0) {
    s_sq[warp] = a.sq;
    s_ab[warp] = a.ab;
    s_nf[warp] = a.nf;
  }
  __syncthreads();
  if (warp == 0) {
    C sq = lane < kWarps ? s_sq[lane] : C(0);
    C ab = lane < kWarps ? s_ab[lane] : C(0);
    unsigned nf = lane < kWarps ? s_nf[lane] : 0u;
#pragma unroll
    for (int off = kWarps / 2; off > 0; off >>= 1) {
      sq = add_rn(sq, __shfl_down_sync(kFull, sq, off));
      ab = add_rn(ab, __shfl_down_sync(kFull, ab, off));
      nf += __shfl_down_sync(kFull, nf, off);
    }
    if (lane == 0) *dst = GcPartial{static_cast<double>(sq), static_cast<double>(ab), nf, 0u};
  }
}

// Statistics of one chunk into its partial (the dtype is uniform across the block).
__device__ void stats_any(const GcSlot& s, int64_t start, int n, bool has_scale, float scale, GcPartial* dst) {
  switch (s.gdt) {
    case kBF16: return write_partial(stats_chunk<__nv_bfloat16>(s, start, n, has_scale, scale), dst);
    case kF16: return write_partial(stats_chunk<__half>(s, start, n, has_scale, scale), dst);
    case kF64: return write_partial(stats_chunk<double>(s, start, n, has_scale, scale), dst);
    default: return write_partial(stats_chunk<float>(s, start, n, has_scale, scale), dst);
  }
}

template <typename G>
__device__ Acc<float> adamw_by_param(const GcSlot& s, int64_t start, int n, bool has_scale, float scale,
                                     const AdamCoef<float>& c) {
  switch (s.pdt) {
    case kBF16: return adamw_chunk<G, __nv_bfloat16>(s, start, n, has_scale, scale, c);
    case kF16: return adamw_chunk<G, __half>(s, start, n, has_scale, scale, c);
    default: return adamw_chunk<G, float>(s, start, n, has_scale, scale, c);
  }
}

// AdamW + statistics of one chunk into its partial; float64 params have float64 gradients.
__device__ void adamw_any(const GcSlot& s, int64_t start, int n, bool has_scale, float scale,
                          const AdamCoef<float>& c, const AdamCoef<double>& c64, GcPartial* dst) {
  switch (s.pdt == kF64 ? kF64 : s.gdt) {
    case kF64: return write_partial(adamw_chunk<double, double>(s, start, n, has_scale, scale, c64), dst);
    case kBF16: return write_partial(adamw_by_param<__nv_bfloat16>(s, start, n, has_scale, scale, c), dst);
    case kF16: return write_partial(adamw_by_param<__half>(s, start, n, has_scale, scale, c), dst);
    default: return write_partial(adamw_by_param<float>(s, start, n, has_scale, scale, c), dst);
  }
}

// ---------------------------------------------------------------- kernels

__global__ void __launch_bounds__(kBlock)
stats_kernel(const GcSlot* __restrict__ slots, const GcChunk* __restrict__ chunks,
             const bool* __restrict__ frozen, const float* __restrict__ grad_scale,
             GcPartial* __restrict__ ws) {
  const int64_t c = blockIdx.x;
  const GcChunk ch = chunks[c];
  if (frozen != nullptr && frozen[ch.matrix]) {  // uniform across the block: nothing is read
    if (threadIdx.x == 0) ws[c] = GcPartial{0.0, 0.0, 0u, 0u};
    return;
  }
  const GcSlot s = slots[ch.slot];
  const bool has_scale = grad_scale != nullptr;
  const float scale = has_scale ? *grad_scale : 1.f;
  stats_any(s, ch.start, static_cast<int>(ch.length), has_scale, scale, ws + c);
}

__global__ void __launch_bounds__(kBlock)
adamw_kernel(const GcSlot* __restrict__ slots, const GcChunk* __restrict__ chunks,
             const bool* __restrict__ frozen, const GcAdamW hp, GcPartial* __restrict__ ws) {
  const int64_t c = blockIdx.x;
  const GcChunk ch = chunks[c];
  if (frozen != nullptr && frozen[ch.matrix]) {
    if (threadIdx.x == 0) ws[c] = GcPartial{0.0, 0.0, 0u, 0u};
    return;
  }
  __shared__ AdamCoef<float> s_coef;
  __shared__ AdamCoef<double> s_coef64;
  __shared__ int s_active;
  if (threadIdx.x == 0) {
    s_active = (hp.found_inf == nullptr || *hp.found_inf == 0.f) ? 1 : 0;
    const double step = hp.step_ptr != nullptr
                            ? static_cast<double>(hp.step_ptr[hp.step_per_matrix ? ch.matrix : 0])
                            : hp.step;
    double lr;
    float decay;
    double decay64;
    if (hp.lr_ptr != nullptr) {
      const float lrf = *hp.lr_ptr;
      lr = static_cast<double>(lrf);
      decay = __fsub_rn(1.f, __fmul_rn(lrf, hp.weight_decay));
      decay64 = static_cast<double>(decay);  // a tensor lr's factor as float32 computes it
    } else {
      lr = hp.lr;
      decay = hp.decay;
      decay64 = 1.0 - hp.lr * hp.weight_decay_d;
    }
    const double bc1 = 1.0 - pow(hp.beta1, step);
    const double bc2_sqrt = sqrt(1.0 - pow(hp.beta2, step));
    const bool maximize = hp.maximize != 0;
    s_coef = AdamCoef<float>{decay, static_cast<float>(lr / bc1), static_cast<float>(bc2_sqrt), hp.one_minus_beta1,
                             hp.beta2_f, hp.one_minus_beta2, hp.eps, maximize};
    s_coef64 = AdamCoef<double>{decay64, lr / bc1, bc2_sqrt, 1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, hp.eps_d,
                                maximize};
  }
  __syncthreads();
  const GcSlot s = slots[ch.slot];
  const bool has_scale = hp.grad_scale != nullptr;
  const float scale = has_scale ? *hp.grad_scale : 1.f;
  const int n = static_cast<int>(ch.length);
  // found_inf: statistics only, param and moments are neither read nor written
  if (s_active) {
    adamw_any(s, ch.start, n, has_scale, scale, s_coef, s_coef64, ws + c);
  } else {
    stats_any(s, ch.start, n, has_scale, scale, ws + c);
  }
}

__global__ void __launch_bounds__(kBlock)
finish_kernel(const GcPartial* __restrict__ ws, const int64_t* __restrict__ mat_ptr,
              const int64_t* __restrict__ mat_chunks, int64_t num_matrices,
              const bool* __restrict__ frozen, double* __restrict__ out) {
  const int64_t mtx = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (mtx >= num_matrices) return;  // uniform across the warp
  double sq = 0.0, ab = 0.0;
  unsigned long long nf = 0ull;
  if (frozen == nullptr || !frozen[mtx]) {
    const int64_t end = mat_ptr[mtx + 1];
    for (int64_t j = mat_ptr[mtx] + lane; j < end; j += 32) {
      const GcPartial p = ws[mat_chunks[j]];
      sq += p.sumsq;
      ab += p.sumabs;
      nf += p.nonfinite;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    sq += __shfl_down_sync(kFull, sq, off);
    ab += __shfl_down_sync(kFull, ab, off);
    nf += __shfl_down_sync(kFull, nf, off);
  }
  if (lane == 0) {
    out[3 * mtx + 0] = sq;
    out[3 * mtx + 1] = ab;
    out[3 * mtx + 2] = static_cast<double>(nf);
  }
}

cudaError_t launch_finish(const GcPartial* ws, const int64_t* mat_ptr, const int64_t* mat_chunks,
                          int64_t num_matrices, const bool* frozen, double* out, cudaStream_t stream) {
  if (num_matrices <= 0) return cudaSuccess;
  const int64_t blocks = (num_matrices + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  finish_kernel<<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(ws, mat_ptr, mat_chunks, num_matrices,
                                                                     frozen, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t grad_stats(const GcSlot* slots, const GcChunk* chunks, int64_t num_chunks, const int64_t* mat_ptr,
                       const int64_t* mat_chunks, int64_t num_matrices, const bool* frozen,
                       const float* grad_scale, GcPartial* workspace, double* out, cudaStream_t stream) {
  if (num_chunks < 0 || num_chunks > 0x7fffffffLL || num_matrices < 0) return cudaErrorInvalidValue;
  if (num_chunks > 0) {
    stats_kernel<<<static_cast<unsigned>(num_chunks), kBlock, 0, stream>>>(slots, chunks, frozen, grad_scale,
                                                                          workspace);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return launch_finish(workspace, mat_ptr, mat_chunks, num_matrices, frozen, out, stream);
}

cudaError_t masked_adamw(const GcSlot* slots, const GcChunk* chunks, int64_t num_chunks, const int64_t* mat_ptr,
                         const int64_t* mat_chunks, int64_t num_matrices, const bool* frozen, const GcAdamW& hp,
                         GcPartial* workspace, double* out, cudaStream_t stream) {
  if (num_chunks < 0 || num_chunks > 0x7fffffffLL || num_matrices < 0) return cudaErrorInvalidValue;
  if (num_chunks > 0) {
    adamw_kernel<<<static_cast<unsigned>(num_chunks), kBlock, 0, stream>>>(slots, chunks, frozen, hp, workspace);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return launch_finish(workspace, mat_ptr, mat_chunks, num_matrices, frozen, out, stream);
}

}  // namespace grades_cuda
