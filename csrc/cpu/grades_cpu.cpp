// Native CPU backend of grades: per-matrix gradient statistics and a masked, fused AdamW step.
//
// Work is cut into chunks of at most kChunk elements by the caller (the chunk table, built on the
// host from the list sizes or the segment table). Chunk boundaries never depend on the number of
// threads. Each chunk is processed by exactly one OpenMP thread, in a fixed order, into kLanes
// independent float32 accumulators that the compiler keeps in vector registers; the lanes are then
// added in float64 in lane order, giving one float64 partial per chunk. Finally the partials of each
// matrix are added in float64 in chunk-table order. The result is therefore bitwise identical for
// any thread count and any scheduling.
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
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "grades_cpu.h"

namespace grades_cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// Element conversions on blocks of kLanes elements. All of them are written as straight loops over
// fixed-size arrays so that they vectorise without any fast-math flag.
// ------------------------------------------------------------------------------------------------

template <int D>
struct IO;

template <>
struct IO<kF32> {
  using T = float;
  static inline void load(const T* s, float* d) { std::memcpy(d, s, sizeof(float) * kLanes); }
  static inline void store(T* d, const float* s) { std::memcpy(d, s, sizeof(float) * kLanes); }
};

template <>
struct IO<kBF16> {
  using T = uint16_t;
  static inline void load(const T* s, float* d) {
    uint32_t u[kLanes];
    for (int i = 0; i < kLanes; ++i) u[i] = static_cast<uint32_t>(s[i]) << 16;
    std::memcpy(d, u, sizeof u);
  }
  // Round to nearest even, NaN -> canonical quiet NaN (what torch's float -> bfloat16 cast does).
  static inline void store(T* d, const float* s) {
    uint32_t u[kLanes];
    std::memcpy(u, s, sizeof u);
    for (int i = 0; i < kLanes; ++i) {
      const uint32_t x = u[i];
      const uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
      d[i] = ((x & 0x7fffffffu) > 0x7f800000u) ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(r);
    }
  }
};

template <>
struct IO<kF16> {
  using T = uint16_t;
#if defined(__F16C__)
  static inline void load(const T* s, float* d) {
    for (int i = 0; i < kLanes; i += 8)
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  static inline void store(T* d, const float* s) {
    for (int i = 0; i < kLanes; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#else
  static inline void load(const T* s, float* d) {
    for (int i = 0; i < kLanes; ++i) d[i] = static_cast<float>(c10::Half(s[i], c10::Half::from_bits()));
  }
  static inline void store(T* d, const float* s) {
    for (int i = 0; i < kLanes; ++i) d[i] = c10::Half(s[i]).x;
  }
#endif
};

// Tail of a chunk (fewer than kLanes elements): padded with zeros, which add nothing to the sums,
// are finite, and give a finite (discarded) AdamW result.
template <int D>
inline void load_tail(const typename IO<D>::T* s, int n, float* d) {
  typename IO<D>::T tmp[kLanes];
  std::memset(tmp, 0, sizeof tmp);
  std::memcpy(tmp, s, sizeof(tmp[0]) * n);
  IO<D>::load(tmp, d);
}

template <int D>
inline void store_tail(typename IO<D>::T* d, int n, const float* s) {
  typename IO<D>::T tmp[kLanes];
  IO<D>::store(tmp, s);
  std::memcpy(d, tmp, sizeof(tmp[0]) * n);
}

// ------------------------------------------------------------------------------------------------
// Statistics accumulators: kLanes float32 lanes for sum g^2 and sum |g|, int32 lanes for the count
// of non-finite values (exponent bits all ones).
// ------------------------------------------------------------------------------------------------

struct Acc {
  float sq[kLanes];
  float ab[kLanes];
  int32_t nf[kLanes];
  inline void zero() {
    for (int i = 0; i < kLanes; ++i) {
      sq[i] = 0.f;
      ab[i] = 0.f;
      nf[i] = 0;
    }
  }
  inline void add(const float* g) {
    uint32_t u[kLanes];
    std::memcpy(u, g, sizeof u);
    for (int i = 0; i < kLanes; ++i) {
      sq[i] += g[i] * g[i];
      ab[i] += std::fabs(g[i]);
      nf[i] += ((u[i] & 0x7f800000u) == 0x7f800000u) ? 1 : 0;
    }
  }
  // Lanes added in float64, in lane order: the chunk's partial.
  inline void finish(Partial& p) const {
    double s = 0.0, a = 0.0;
    int64_t n = 0;
    for (int i = 0; i < kLanes; ++i) {
      s += static_cast<double>(sq[i]);
      a += static_cast<double>(ab[i]);
      n += nf[i];
    }
    p.sumsq = s;
    p.sumabs = a;
    p.nonfinite = n;
  }
};

template <bool SCALE>
inline void unscale(float* g, float scale) {
  if (SCALE) {
    for (int i = 0; i < kLanes; ++i) g[i] = g[i] / scale;  // division, as the reference does
  }
}

// ------------------------------------------------------------------------------------------------
// Chunk kernels.
// ------------------------------------------------------------------------------------------------

template <int GD, bool SCALE>
void stats_chunk(const void* gv, int64_t len, const Hyper& h, const MatrixHyper&, void*, float*, float*,
                 Partial& out) {
  using GT = typename IO<GD>::T;
  const GT* g = static_cast<const GT*>(gv);
  Acc acc;
  acc.zero();
  float gf[kLanes];
  const int64_t full = len - len % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    IO<GD>::load(g + i, gf);
    unscale<SCALE>(gf, h.scale);
    acc.add(gf);
  }
  if (full < len) {
    load_tail<GD>(g + full, static_cast<int>(len - full), gf);
    unscale<SCALE>(gf, h.scale);
    acc.add(gf);
  }
  acc.finish(out);
}

// One AdamW block: same operation order as the reference (torch.optim.AdamW):
//   p = p * (1 - lr*wd);  m = lerp(m, g, 1-beta1);  v = beta2*v + ((1-beta2)*g)*g;
//   p = p - (step_size*m) / (sqrt(v)/sqrt(bc2) + eps)
template <bool SMALL_W>
inline void adamw_block(float* pf, const float* gf, float* mf, float* vf, const Hyper& h, const MatrixHyper& mh) {
  for (int i = 0; i < kLanes; ++i) {
    const float g = gf[i];
    const float diff = g - mf[i];
    float m;
#if defined(__FMA__)
    m = SMALL_W ? std::fma(h.lerp_w, diff, mf[i]) : std::fma(h.lerp_w - 1.f, diff, g);
#else
    m = SMALL_W ? mf[i] + h.lerp_w * diff : g - diff * (1.f - h.lerp_w);
#endif
    const float v = vf[i] * h.beta2 + (h.one_minus_beta2 * g) * g;
    const float denom = std::sqrt(v) / mh.bc2_sqrt + h.eps;
    const float p = pf[i] * h.decay;
    pf[i] = p - (mh.step_size * m) / denom;
    mf[i] = m;
    vf[i] = v;
  }
}

template <int PD, int GD, bool SCALE, bool SMALL_W>
void adamw_chunk(const void* gv, int64_t len, const Hyper& h, const MatrixHyper& mh, void* pv, float* m,
                 float* v, Partial& out) {
  using GT = typename IO<GD>::T;
  using PT = typename IO<PD>::T;
  const GT* g = static_cast<const GT*>(gv);
  PT* p = static_cast<PT*>(pv);
  Acc acc;
  acc.zero();
  float gf[kLanes], pf[kLanes], mf[kLanes], vf[kLanes];
  const int64_t full = len - len % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    IO<GD>::load(g + i, gf);
    unscale<SCALE>(gf, h.scale);
    acc.add(gf);
    IO<PD>::load(p + i, pf);
    std::memcpy(mf, m + i, sizeof mf);
    std::memcpy(vf, v + i, sizeof vf);
    adamw_block<SMALL_W>(pf, gf, mf, vf, h, mh);
    IO<PD>::store(p + i, pf);
    std::memcpy(m + i, mf, sizeof mf);
    std::memcpy(v + i, vf, sizeof vf);
  }
  if (full < len) {
    const int n = static_cast<int>(len - full);
    load_tail<GD>(g + full, n, gf);
    unscale<SCALE>(gf, h.scale);
    acc.add(gf);
    load_tail<PD>(p + full, n, pf);
    load_tail<kF32>(m + full, n, mf);
    load_tail<kF32>(v + full, n, vf);
    adamw_block<SMALL_W>(pf, gf, mf, vf, h, mh);
    store_tail<PD>(p + full, n, pf);
    store_tail<kF32>(m + full, n, mf);
    store_tail<kF32>(v + full, n, vf);
  }
  acc.finish(out);
}

template <int GD>
ChunkFn pick_stats(bool scale) {
  return scale ? &stats_chunk<GD, true> : &stats_chunk<GD, false>;
}

template <int PD, int GD>
ChunkFn pick_adamw2(bool scale, bool small_w) {
  if (scale) return small_w ? &adamw_chunk<PD, GD, true, true> : &adamw_chunk<PD, GD, true, false>;
  return small_w ? &adamw_chunk<PD, GD, false, true> : &adamw_chunk<PD, GD, false, false>;
}

template <int PD>
ChunkFn pick_adamw1(int gd, bool scale, bool small_w) {
  switch (gd) {
    case kF32: return pick_adamw2<PD, kF32>(scale, small_w);
    case kBF16: return pick_adamw2<PD, kBF16>(scale, small_w);
    default: return pick_adamw2<PD, kF16>(scale, small_w);
  }
}

}  // namespace

ChunkFn select_kernel(bool update, int pd, int gd, bool scale, bool small_w) {
  if (!update) {
    switch (gd) {
      case kF32: return pick_stats<kF32>(scale);
      case kBF16: return pick_stats<kBF16>(scale);
      default: return pick_stats<kF16>(scale);
    }
  }
  switch (pd) {
    case kF32: return pick_adamw1<kF32>(gd, scale, small_w);
    case kBF16: return pick_adamw1<kBF16>(gd, scale, small_w);
    default: return pick_adamw1<kF16>(gd, scale, small_w);
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

  auto body = [&](int64_t k) {
    const int64_t c = active[k];
    const int64_t start = rows[3 * c], len = rows[3 * c + 1], id = rows[3 * c + 2];
    const Source& s = sources[per_tensor_sources ? id : 0];
    const void* g = static_cast<const char*>(s.grad) + start * s.grad_elsize;
    void* p = s.param ? static_cast<void*>(static_cast<char*>(s.param) + start * s.param_elsize) : nullptr;
    float* m = s.exp_avg ? s.exp_avg + start : nullptr;
    float* v = s.exp_avg_sq ? s.exp_avg_sq + start : nullptr;
    s.fn(g, len, h, mh ? mh[id] : unit, p, m, v, part[c]);
  };

#ifdef _OPENMP
  if (nthreads > 1 && work >= kMinParallelWork && A > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
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
