// Shared declarations of the grades CPU backend (kernels in grades_cpu.cpp, bindings in bindings.cpp).
#pragma once

#include <cstdint>

namespace grades_cpu {

// Independent accumulator lanes per chunk (float32: one AVX-512 or two AVX vector registers per statistic).
constexpr int kLanes = 16;
// Chunk size in elements. The host-side chunk table must be built with this size (exported to
// Python as CHUNK); it is a constant so that results do not depend on the thread count.
constexpr int64_t kChunk = 4096;
// Smallest run of chunks a thread takes from the shared queue (guided schedule).
constexpr int kChunksPerGrab = 8;
// Below this many elements of work the chunks run on the calling thread only.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

// dtype codes of gradients and parameters. kF64 params go with kF64 gradients and float64 moments
// and are computed in float64; the others are computed in float32 with float32 moments.
enum : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

// Statistics of one chunk.
struct Partial {
  double sumsq = 0.0;
  double sumabs = 0.0;
  int64_t nonfinite = 0;
};

// Hyperparameters shared by every matrix: float32 fields rounded as the reference rounds them (for
// float32 arithmetic), double fields for float64 arithmetic.
struct Hyper {
  float scale = 1.f;            // grad_scale (gradients are divided by it when present)
  float lerp_w = 0.f;           // 1 - beta1
  float beta2 = 0.f;
  float one_minus_beta2 = 0.f;  // 1 - beta2
  float eps = 0.f;
  float decay = 1.f;            // 1 - lr * weight_decay
  bool maximize = false;        // the update negates the (unscaled) gradient; statistics do not
  double d_scale = 1.0, d_lerp_w = 0.0, d_beta2 = 0.0, d_one_minus_beta2 = 0.0, d_eps = 0.0, d_decay = 1.0;
};

// Per-matrix bias-corrected factors (they differ when the step count is per matrix).
struct MatrixHyper {
  float step_size = 0.f;  // lr / (1 - beta1^step)
  float bc2_sqrt = 1.f;   // sqrt(1 - beta2^step)
  double d_step_size = 0.0, d_bc2_sqrt = 1.0;
};

// dtype code of a Source without a low-precision copy of its (float32 master) parameter
constexpr int kNoCopy = -1;

// The memory of one chunk. With master weights, param is the float32 master and the updated value
// is also written, rounded, to copy (the model's low-precision parameter); otherwise copy is unused.
// Moments are float32 (float64 for kF64 params); max_exp_avg_sq is nullptr unless amsgrad.
struct ChunkPtrs {
  const void* grad;
  void* param;
  void* copy;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
};

// Processes one chunk of `length` elements into its statistics partial.
using ChunkFn = void (*)(const ChunkPtrs&, int64_t length, const Hyper&, const MatrixHyper&, Partial&);

// Base pointers of one tensor (list input) or of the flat buffers, and the kernel for its dtypes.
struct Source {
  const void* grad = nullptr;
  int64_t grad_elsize = 4;
  void* param = nullptr;
  int64_t param_elsize = 4;
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;  // amsgrad only
  int64_t moment_elsize = 4;
  void* copy = nullptr;  // low-precision copy of a float32 master param, or nullptr
  int64_t copy_elsize = 2;
  ChunkFn fn = nullptr;
};

// Kernel for statistics only (update=false) or AdamW + statistics, for the given dtype codes;
// copy_dtype (kBF16/kF16, with param_dtype kF32) also writes the updated master to a copy.
// nullptr for a combination without a kernel (kF64 mixed with another dtype, a kF64 copy).
ChunkFn select_kernel(bool update, int param_dtype, int grad_dtype, bool scale, bool small_lerp_weight,
                      int copy_dtype = kNoCopy);

// Runs every chunk whose matrix is not frozen and writes per-matrix statistics.
//   rows:    [C, 3] int64 (start, length, id) -- start in elements from the source's base pointers;
//            id is the matrix id (and the source index when per_tensor_sources).
//   frozen:  [M] bool or nullptr.   matrix_hyper: [M] or nullptr (statistics only).
//   out:     [M, 3] float64 row-major, fully overwritten (sumsq, sumabs, non-finite count).
void run_chunks(const Source* sources, bool per_tensor_sources, const int64_t* rows, int64_t num_chunks,
                int64_t num_matrices, const bool* frozen, const Hyper& hyper, const MatrixHyper* matrix_hyper,
                int num_threads, double* out);

}  // namespace grades_cpu
