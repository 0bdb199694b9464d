// Native CPU backend of grades: per-matrix gradient statistics and a masked, fused AdamW step.
//
// Work is cut into chunks of at most kChunk elements by the caller (the chunk table, built on the
// host from the list sizes or the segment table). Chunk boundaries never depend on the number of
// threads. Each chunk is processed by exactly one OpenMP thread, in a fixed order, into kLanes
// independent float32 accumulators held in vector registers; the lanes are then
// added in float64 in lane order, giving one float64 partial per chunk. Finally the partials of each
// matrix are added in float64 in chunk-table order. The result is therefore bitwise identical for
// any thread count and any scheduling.
//
// Squares are accumulated in float32 (float64 for float64 gradients), so a float32 chunk holding
// finite values above ~1.8e19 reports an infinite sum of squares (with a non-finite count of 0,
// which stays exact).
//
// Frozen matrices are skipped before any memory is touched: their chunks are never scheduled.
// The AdamW path reads each gradient element once and produces its statistics in the same pass.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <c10/util/Half.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__) || defined(__F16C__) || defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "grades_cpu.h"

namespace grades_cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// Portable SIMD through GCC/Clang vector extensions: each operation acts lane by lane with ordinary
// IEEE float32 semantics, so the result does not depend on the instruction set the compiler picks.
// A vector is 16 floats where the build targets AVX-512 (one zmm register) and 8 otherwise (one ymm,
// or pairs of SSE registers); a block is kLanes = 16 elements either way, and element i of a chunk
// always accumulates into lane i % kLanes, so the sums are bitwise the same on every width.
// ------------------------------------------------------------------------------------------------

#if defined(__AVX512F__)
constexpr int kW = 16;  // elements per vector
#else
constexpr int kW = 8;
#endif
typedef float vf32 __attribute__((vector_size(4 * kW)));
typedef int32_t vi32 __attribute__((vector_size(4 * kW)));
typedef uint32_t vu32 __attribute__((vector_size(4 * kW)));
typedef uint16_t vu16 __attribute__((vector_size(2 * kW)));
constexpr int kV = kLanes / kW;  // vectors per block
static_assert(kLanes % kW == 0, "kLanes must be a multiple of the vector width");

inline vf32 splat(float x) { return vf32{} + x; }

// Software prefetch this many bytes ahead of the gradient stream in the statistics-only kernel
// (measured to help a single core keep more cache-line requests in flight; it did not help the
// AdamW kernel, which already has four streams). Prefetching past the end of a buffer is harmless.
constexpr int64_t kPrefetchBytes = 4096;
template <class T>
inline void prefetch_ahead(const T* x) {
  __builtin_prefetch(reinterpret_cast<const char*>(x) + kPrefetchBytes);
}

inline vf32 vsqrt(vf32 x) {
#if defined(__AVX512F__)
  return _mm512_sqrt_ps(x);
#elif defined(__AVX__)
  return _mm256_sqrt_ps(x);
#else
  vf32 r;
  for (int i = 0; i < kW; ++i) r[i] = std::sqrt(x[i]);
  return r;
#endif
}

// a * b + c with a single rounding (what torch's vectorised lerp uses).
inline vf32 vfma(vf32 a, vf32 b, vf32 c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  vf32 r;
  for (int i = 0; i < kW; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

inline vf32 vabs(vf32 x) { return (vf32)((vu32)x & 0x7fffffffu); }

// ------------------------------------------------------------------------------------------------
// Element conversions, one vector of kW elements at a time.
// ------------------------------------------------------------------------------------------------

template <int D>
struct IO;

template <>
struct IO<kF32> {
  using T = float;
  static inline vf32 load(const T* s) {
    vf32 r;
    std::memcpy(&r, s, sizeof r);
    return r;
  }
  static inline void store(T* d, vf32 x) { std::memcpy(d, &x, sizeof x); }
};

template <>
struct IO<kBF16> {
  using T = uint16_t;
  static inline vf32 load(const T* s) {
    vu16 h;
    std::memcpy(&h, s, sizeof h);
    return (vf32)(__builtin_convertvector(h, vu32) << 16);
  }
  // Round to nearest even, NaN -> canonical quiet NaN (what torch's float -> bfloat16 cast does).
  static inline void store(T* d, vf32 f) {
    const vu32 x = (vu32)f;
    const vu32 r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const vu32 nan = (vu32)((x & 0x7fffffffu) > 0x7f800000u);
    const vu16 h = __builtin_convertvector((r & ~nan) | (nan & 0x7fc0u), vu16);
    std::memcpy(d, &h, sizeof h);
  }
};

template <>
struct IO<kF16> {
  using T = uint16_t;
#if defined(__AVX512F__)
  static inline vf32 load(const T* s) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  }
  static inline void store(T* d, vf32 x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#elif defined(__F16C__)
  static inline vf32 load(const T* s) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  static inline void store(T* d, vf32 x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#else
  static inline vf32 load(const T* s) {
    vf32 r;
    for (int i = 0; i < kW; ++i) r[i] = static_cast<float>(c10::Half(s[i], c10::Half::from_bits()));
    return r;
  }
  static inline void store(T* d, vf32 x) {
    for (int i = 0; i < kW; ++i) d[i] = c10::Half(x[i]).x;
  }
#endif
};

// A block of kLanes elements: full, or a padded tail (zeros add nothing to the sums, are finite,
// and give a finite AdamW result that is not stored).
template <int D>
struct Block {
  using T = typename IO<D>::T;
  static inline void load(const T* s, vf32* x) {
    for (int k = 0; k < kV; ++k) x[k] = IO<D>::load(s + k * kW);
  }
  static inline void store(T* d, const vf32* x) {
    for (int k = 0; k < kV; ++k) IO<D>::store(d + k * kW, x[k]);
  }
  static inline void load_tail(const T* s, int n, vf32* x) {
    T tmp[kLanes];
    std::memset(tmp, 0, sizeof tmp);
    std::memcpy(tmp, s, sizeof(T) * n);
    load(tmp, x);
  }
  static inline void store_tail(T* d, int n, const vf32* x) {
    T tmp[kLanes];
    store(tmp, x);
    std::memcpy(d, tmp, sizeof(T) * n);
  }
};

// ------------------------------------------------------------------------------------------------
// Statistics accumulators: kLanes float32 lanes for sum g^2 and sum |g|.
//
// Non-finite values are not counted in the hot loop: a NaN or an infinity always makes its lane of
// sum |g| non-finite, so only a chunk whose |g| lanes end non-finite (rare) is scanned again to count
// exactly (see count_nonfinite). This keeps the main loop at five vector operations per vector.
// ------------------------------------------------------------------------------------------------

struct Acc {
  vf32 sq[kV];
  vf32 ab[kV];
  inline Acc() {
    for (int k = 0; k < kV; ++k) {
      sq[k] = vf32{};
      ab[k] = vf32{};
    }
  }
  inline void add(const vf32* g) {
    for (int k = 0; k < kV; ++k) {
      sq[k] += g[k] * g[k];
      ab[k] += vabs(g[k]);
    }
  }
  inline bool maybe_nonfinite() const {
    vi32 bad = vi32{};
    for (int k = 0; k < kV; ++k) bad |= (vi32)(((vu32)ab[k] & 0x7f800000u) == 0x7f800000u);
    for (int i = 0; i < kW; ++i)
      if (bad[i]) return true;
    return false;
  }
  // Lanes added in float64, in lane order: the chunk's partial.
  inline void finish(Partial& p) const {
    double s = 0.0, a = 0.0;
    for (int k = 0; k < kV; ++k) {
      for (int i = 0; i < kW; ++i) {
        s += static_cast<double>(sq[k][i]);
        a += static_cast<double>(ab[k][i]);
      }
    }
    p.sumsq = s;
    p.sumabs = a;
    p.nonfinite = 0;
  }
};

inline vi32 nonfinite_mask(vf32 x) { return (vi32)(((vu32)x & 0x7f800000u) == 0x7f800000u); }

template <bool SCALE>
inline void unscale(vf32* g, const Hyper& h) {
  if (SCALE) {
    const vf32 s = splat(h.scale);
    for (int k = 0; k < kV; ++k) g[k] = g[k] / s;  // division, as the reference does
  }
}

// The padded tail of a chunk: lanes past the n loaded ones stay zero (0 / scale is NaN for a
// GradScaler scale of 0 or NaN, and would count as non-finite gradients).
template <bool SCALE>
inline void unscale_tail(vf32* g, const Hyper& h, int n) {
  if (SCALE) {
    unscale<SCALE>(g, h);
    for (int k = 0; k < kV; ++k)
      for (int i = 0; i < kW; ++i)
        if (k * kW + i >= n) g[k][i] = 0.0f;
  }
}

// Exact number of non-finite values of one (unscaled) gradient chunk. Only called for chunks whose
// sums came out non-finite; reads the gradient chunk a second time.
template <int GD, bool SCALE>
int64_t count_nonfinite(const typename IO<GD>::T* g, int64_t len, const Hyper& h) {
  vi32 nf[kV] = {};
  vf32 gf[kV];
  const int64_t full = len - len % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    Block<GD>::load(g + i, gf);
    unscale<SCALE>(gf, h);
    for (int k = 0; k < kV; ++k) nf[k] -= nonfinite_mask(gf[k]);
  }
  if (full < len) {
    Block<GD>::load_tail(g + full, static_cast<int>(len - full), gf);
    unscale_tail<SCALE>(gf, h, static_cast<int>(len - full));
    for (int k = 0; k < kV; ++k) nf[k] -= nonfinite_mask(gf[k]);
  }
  int64_t n = 0;
  for (int k = 0; k < kV; ++k)
    for (int i = 0; i < kW; ++i) n += nf[k][i];
  return n;
}

// ------------------------------------------------------------------------------------------------
// Chunk kernels.
// ------------------------------------------------------------------------------------------------

template <int GD, bool SCALE>
void stats_chunk(const ChunkPtrs& q, int64_t len, const Hyper& h, const MatrixHyper&, Partial& out) {
  using GT = typename IO<GD>::T;
  const GT* g = static_cast<const GT*>(q.grad);
  Acc acc;
  vf32 gf[kV];
  const int64_t full = len - len % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    prefetch_ahead(g + i);
    Block<GD>::load(g + i, gf);
    unscale<SCALE>(gf, h);
    acc.add(gf);
  }
  if (full < len) {
    Block<GD>::load_tail(g + full, static_cast<int>(len - full), gf);
    unscale_tail<SCALE>(gf, h, static_cast<int>(len - full));
    acc.add(gf);
  }
  acc.finish(out);
  if (acc.maybe_nonfinite()) out.nonfinite = count_nonfinite<GD, SCALE>(g, len, h);
}

// Broadcast hyperparameters of one chunk.
struct VHyper {
  vf32 lerp_w, lerp_w1, beta2, omb2, eps, decay, step_size, bc2_sqrt;
  vu32 neg;  // sign bit flipped by maximize
  VHyper(const Hyper& h, const MatrixHyper& mh)
      : lerp_w(splat(h.lerp_w)), lerp_w1(splat(h.lerp_w - 1.f)), beta2(splat(h.beta2)),
        omb2(splat(h.one_minus_beta2)), eps(splat(h.eps)), decay(splat(h.decay)),
        step_size(splat(mh.step_size)), bc2_sqrt(splat(mh.bc2_sqrt)),
        neg(vu32{} + (h.maximize ? 0x80000000u : 0u)) {}
};

// torch.maximum: the larger value, NaN if either is NaN.
inline vf32 vmax_nan(vf32 a, vf32 b) {
  const vi32 take_a = (a > b) | (a != a);
  return (vf32)(((vi32)a & take_a) | ((vi32)b & ~take_a));
}

// One AdamW block, same operation order as the reference (torch.optim.AdamW):
//   g = -g if maximize;  p = p * (1 - lr*wd);  m = lerp(m, g, 1-beta1);  v = beta2*v + ((1-beta2)*g)*g;
//   amsgrad: vmax = maximum(vmax, v), the denominator reads vmax instead of v;
//   p = p - (step_size*m) / (sqrt(v)/sqrt(bc2) + eps)
// lerp as torch computes it: m + w*(g-m) for w < 0.5, else g + (w-1)*(g-m), with one rounding.
// vmax is nullptr without amsgrad (a branch the predictor always gets right).
template <bool SMALL_W>
inline void adamw_block(vf32* p, const vf32* graw, vf32* m, vf32* v, vf32* vmax, const VHyper& h) {
  for (int k = 0; k < kV; ++k) {
    const vf32 g = (vf32)((vu32)graw[k] ^ h.neg);
    const vf32 diff = g - m[k];
    const vf32 mk = SMALL_W ? vfma(h.lerp_w, diff, m[k]) : vfma(h.lerp_w1, diff, g);
    const vf32 vk = v[k] * h.beta2 + (h.omb2 * g) * g;
    vf32 vd = vk;
    if (vmax) vd = vmax[k] = vmax_nan(vmax[k], vk);
    const vf32 denom = vsqrt(vd) / h.bc2_sqrt + h.eps;
    p[k] = p[k] * h.decay - (h.step_size * mk) / denom;
    m[k] = mk;
    v[k] = vk;
  }
}

// CD: dtype of the low-precision copy written next to a float32 master param (kNoCopy: none).
template <int PD, int GD, bool SCALE, bool SMALL_W, int CD>
void adamw_chunk(const ChunkPtrs& q, int64_t len, const Hyper& h, const MatrixHyper& mh, Partial& out) {
  using GT = typename IO<GD>::T;
  using PT = typename IO<PD>::T;
  constexpr int CIO = CD == kNoCopy ? kF32 : CD;  // a valid IO type also when there is no copy
  using CT = typename IO<CIO>::T;
  static_assert(CD == kNoCopy || PD == kF32, "a master param is float32");
  const GT* g = static_cast<const GT*>(q.grad);
  PT* p = static_cast<PT*>(q.param);
  CT* c = static_cast<CT*>(q.copy);
  float* m = static_cast<float*>(q.exp_avg);
  float* v = static_cast<float*>(q.exp_avg_sq);
  float* x = static_cast<float*>(q.max_exp_avg_sq);
  const VHyper vh(h, mh);
  Acc acc;
  vf32 gf[kV], pf[kV], mf[kV], vf[kV], xf[kV];
  vf32* xp = x ? xf : nullptr;
  const int64_t full = len - len % kLanes;
  // four blocks per iteration: more loads in flight (measured 2-3% faster on AVX-512, one thread)
#pragma GCC unroll 4
  for (int64_t i = 0; i < full; i += kLanes) {
    Block<GD>::load(g + i, gf);
    unscale<SCALE>(gf, h);
    acc.add(gf);
    Block<PD>::load(p + i, pf);
    Block<kF32>::load(m + i, mf);
    Block<kF32>::load(v + i, vf);
    if (x) Block<kF32>::load(x + i, xf);
    adamw_block<SMALL_W>(pf, gf, mf, vf, xp, vh);
    Block<PD>::store(p + i, pf);
    if (CD != kNoCopy) Block<CIO>::store(c + i, pf);
    Block<kF32>::store(m + i, mf);
    Block<kF32>::store(v + i, vf);
    if (x) Block<kF32>::store(x + i, xf);
  }
  if (full < len) {
    const int n = static_cast<int>(len - full);
    Block<GD>::load_tail(g + full, n, gf);
    unscale_tail<SCALE>(gf, h, n);
    acc.add(gf);
    Block<PD>::load_tail(p + full, n, pf);
    Block<kF32>::load_tail(m + full, n, mf);
    Block<kF32>::load_tail(v + full, n, vf);
    if (x) Block<kF32>::load_tail(x + full, n, xf);
    adamw_block<SMALL_W>(pf, gf, mf, vf, xp, vh);
    Block<PD>::store_tail(p + full, n, pf);
    if (CD != kNoCopy) Block<CIO>::store_tail(c + full, n, pf);
    Block<kF32>::store_tail(m + full, n, mf);
    Block<kF32>::store_tail(v + full, n, vf);
    if (x) Block<kF32>::store_tail(x + full, n, xf);
  }
  acc.finish(out);
  if (acc.maybe_nonfinite()) out.nonfinite = count_nonfinite<GD, SCALE>(g, len, h);
}

// ------------------------------------------------------------------------------------------------
// float64 kernels: plain loops over kLanes independent float64 lanes (the compiler vectorises
// them); each lane is summed in element order, lanes added in lane order, as for float32.
// ------------------------------------------------------------------------------------------------

inline bool nonfinite64(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return ((b >> 52) & 0x7ffu) == 0x7ffu;
}

struct Acc64 {
  double sq[kLanes] = {};
  double ab[kLanes] = {};
  int64_t nf[kLanes] = {};
  inline void add(int j, double g) {
    sq[j] += g * g;
    ab[j] += std::fabs(g);
    nf[j] += nonfinite64(g);
  }
  inline void finish(Partial& p) const {
    p = Partial{};
    for (int j = 0; j < kLanes; ++j) {
      p.sumsq += sq[j];
      p.sumabs += ab[j];
      p.nonfinite += nf[j];
    }
  }
};

template <bool SCALE>
void stats_chunk64(const ChunkPtrs& q, int64_t len, const Hyper& h, const MatrixHyper&, Partial& out) {
  const double* g = static_cast<const double*>(q.grad);
  Acc64 acc;
  for (int64_t i = 0; i < len; i += kLanes) {
    const int n = static_cast<int>(len - i < kLanes ? len - i : kLanes);
    for (int j = 0; j < n; ++j) acc.add(j, SCALE ? g[i + j] / h.d_scale : g[i + j]);
  }
  acc.finish(out);
}

// torch.maximum for doubles: NaN if either is NaN.
inline double max_nan64(double a, double b) { return (a > b || a != a) ? a : b; }

// The float64 AdamW step of one element (same order as adamw_block, in double).
template <bool SMALL_W>
inline void adamw_elem64(double& p, double g, double& m, double& v, double* vmax, const Hyper& h,
                         const MatrixHyper& mh) {
  if (h.maximize) g = -g;
  const double diff = g - m;
  const double mk = SMALL_W ? std::fma(h.d_lerp_w, diff, m) : std::fma(h.d_lerp_w - 1.0, diff, g);
  const double vk = v * h.d_beta2 + (h.d_one_minus_beta2 * g) * g;
  double vd = vk;
  if (vmax) vd = *vmax = max_nan64(*vmax, vk);
  const double denom = std::sqrt(vd) / mh.d_bc2_sqrt + h.d_eps;
  p = p * h.d_decay - (mh.d_step_size * mk) / denom;
  m = mk;
  v = vk;
}

template <bool SCALE, bool SMALL_W>
void adamw_chunk64(const ChunkPtrs& q, int64_t len, const Hyper& h, const MatrixHyper& mh, Partial& out) {
  const double* g = static_cast<const double*>(q.grad);
  double* p = static_cast<double*>(q.param);
  double* m = static_cast<double*>(q.exp_avg);
  double* v = static_cast<double*>(q.exp_avg_sq);
  double* x = static_cast<double*>(q.max_exp_avg_sq);
  Acc64 acc;
  for (int64_t i = 0; i < len; i += kLanes) {
    const int n = static_cast<int>(len - i < kLanes ? len - i : kLanes);
    for (int j = 0; j < n; ++j) {
      const double gj = SCALE ? g[i + j] / h.d_scale : g[i + j];
      acc.add(j, gj);
      adamw_elem64<SMALL_W>(p[i + j], gj, m[i + j], v[i + j], x ? x + i + j : nullptr, h, mh);
    }
  }
  acc.finish(out);
}

template <int GD>
ChunkFn pick_stats(bool scale) {
  return scale ? &stats_chunk<GD, true> : &stats_chunk<GD, false>;
}

template <int PD, int GD, int CD>
ChunkFn pick_adamw2(bool scale, bool small_w) {
  if (scale) return small_w ? &adamw_chunk<PD, GD, true, true, CD> : &adamw_chunk<PD, GD, true, false, CD>;
  return small_w ? &adamw_chunk<PD, GD, false, true, CD> : &adamw_chunk<PD, GD, false, false, CD>;
}

template <int PD, int CD>
ChunkFn pick_adamw1(int gd, bool scale, bool small_w) {
  switch (gd) {
    case kF32: return pick_adamw2<PD, kF32, CD>(scale, small_w);
    case kBF16: return pick_adamw2<PD, kBF16, CD>(scale, small_w);
    default: return pick_adamw2<PD, kF16, CD>(scale, small_w);
  }
}

}  // namespace

ChunkFn select_kernel(bool update, int pd, int gd, bool scale, bool small_w, int cd) {
  if (!update && gd == kF64) return scale ? &stats_chunk64<true> : &stats_chunk64<false>;
  if (pd == kF64 || (update && gd == kF64)) {
    if (pd != kF64 || gd != kF64 || cd != kNoCopy) return nullptr;
    if (scale) return small_w ? &adamw_chunk64<true, true> : &adamw_chunk64<true, false>;
    return small_w ? &adamw_chunk64<false, true> : &adamw_chunk64<false, false>;
  }
  if (!update) {
    switch (gd) {
      case kF32: return pick_stats<kF32>(scale);
      case kBF16: return pick_stats<kBF16>(scale);
      default: return pick_stats<kF16>(scale);
    }
  }
  if (cd != kNoCopy) {  // float32 master + copy (the bindings guarantee pd == kF32)
    if (pd != kF32) return nullptr;
    switch (cd) {
      case kF32: return pick_adamw1<kF32, kF32>(gd, scale, small_w);
      case kBF16: return pick_adamw1<kF32, kBF16>(gd, scale, small_w);
      default: return pick_adamw1<kF32, kF16>(gd, scale, small_w);
    }
  }
  switch (pd) {
    case kF32: return pick_adamw1<kF32, kNoCopy>(gd, scale, small_w);
    case kBF16: return pick_adamw1<kBF16, kNoCopy>(gd, scale, small_w);
    default: return pick_adamw1<kF16, kNoCopy>(gd, scale, small_w);
  }
}

// Run the chunk kernels over every chunk of a non-frozen matrix, then reduce the partials per matrix.
void run_chunks(const Source* sources, bool per_tensor_sources, const int64_t* rows, int64_t num_chunks,
                int64_t num_matrices, const bool* frozen, const Hyper& h, const MatrixHyper* mh, int nthreads,
                double* out) {
  const int64_t C = num_chunks;
  std::vector<int64_t> active;
  active.reserve(static_cast<size_t>(C));
  int64_t work = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (frozen && frozen[rows[3 * c + 2]]) continue;
    active.push_back(c);
    work += rows[3 * c + 1];
  }
  std::vector<Partial> part(static_cast<size_t>(C));
  const int64_t A = static_cast<int64_t>(active.size());
  const MatrixHyper unit{};

  // Guided schedule: each thread first streams through a long contiguous run of chunks (as a
  // static split would; measured 2-4% faster than grabbing kChunksPerGrab at a time), and the runs
  // shrink to kChunksPerGrab towards the end, so a thread slowed down by other processes does not
  // hold up the others. Which thread runs a chunk never affects the result.
  auto body = [&](int64_t k) {
    const int64_t c = active[k];
    const int64_t start = rows[3 * c], len = rows[3 * c + 1], id = rows[3 * c + 2];
    const Source& s = sources[per_tensor_sources ? id : 0];
    auto at = [start](void* base, int64_t elsize) {
      return base ? static_cast<void*>(static_cast<char*>(base) + start * elsize) : nullptr;
    };
    const ChunkPtrs q{static_cast<const char*>(s.grad) + start * s.grad_elsize, at(s.param, s.param_elsize),
                      at(s.copy, s.copy_elsize), at(s.exp_avg, s.moment_elsize), at(s.exp_avg_sq, s.moment_elsize),
                      at(s.max_exp_avg_sq, s.moment_elsize)};
    s.fn(q, len, h, mh ? mh[id] : unit, part[c]);
  };

#ifdef _OPENMP
  if (nthreads > 1 && work >= kMinParallelWork && A > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(guided, kChunksPerGrab)
    for (int64_t k = 0; k < A; ++k) body(k);
  } else {
    for (int64_t k = 0; k < A; ++k) body(k);
  }
#else
  (void)nthreads;
  for (int64_t k = 0; k < A; ++k) body(k);
#endif

  // Per-matrix float64 sums of the chunk partials, in chunk-table order.
  std::vector<int64_t> counts(static_cast<size_t>(num_matrices), 0);
  for (int64_t i = 0; i < 3 * num_matrices; ++i) out[i] = 0.0;
  for (int64_t k = 0; k < A; ++k) {
    const int64_t c = active[k];
    const int64_t id = rows[3 * c + 2];
    out[3 * id + 0] += part[c].sumsq;
    out[3 * id + 1] += part[c].sumabs;
    counts[id] += part[c].nonfinite;
  }
  for (int64_t i = 0; i < num_matrices; ++i) out[3 * i + 2] = static_cast<double>(counts[i]);
}

}  // namespace grades_cpu
