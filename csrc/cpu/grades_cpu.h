// Shared declarations of the grades CPU backend (kernels in grades_cpu.cpp, bindings in bindings.cpp).
#pragma once

#include <cstdint>

namespace grades_cpu {

// Independent float32 accumulator lanes per chunk (one or two vector registers per statistic).
constexpr int kLanes = 16;
// Chunk size in elements. The host-side chunk table must be built with this size (exported to
// Python as CHUNK); it is a constant so that results do not depend on the thread count.
constexpr int64_t kChunk = 4096;
// Chunks a thread takes at a time from the shared queue.
constexpr int kChunksPerGrab = 8;
// Below this many elements of work the chunks run on the calling thread only.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

// dtype codes of gradients and parameters
enum : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Statistics of one chunk.
struct Partial {
  double sumsq = 0.0;
  double sumabs = 0.0;
  int64_t nonfinite = 0;
};

// Hyperparameters shared by every matrix, already rounded to float32 as the reference rounds them.
struct Hyper {
  float scale = 1.f;            // grad_scale (gradients are divided by it when present)
  float lerp_w = 0.f;           // 1 - beta1
  float beta2 = 0.f;
  float one_minus_beta2 = 0.f;  // 1 - beta2
  float eps = 0.f;
  float decay = 1.f;            // 1 - lr * weight_decay
};

// Per-matrix bias-corrected factors (they differ when the step count is per matrix).
struct MatrixHyper {
  float step_size = 0.f;  // lr / (1 - beta1^step)
  float bc2_sqrt = 1.f;   // sqrt(1 - beta2^step)
};

// dtype code of a Source without a low-precision copy of its (float32 master) parameter
constexpr int kNoCopy = -1;

// Processes one chunk: (grad, length, hyper, matrix hyper, param, param copy, exp_avg, exp_avg_sq,
// partial out). With master weights, param is the float32 master and the updated value is also
// written, rounded, to the copy (the model's low-precision parameter); otherwise copy is unused.
using ChunkFn = void (*)(const void*, int64_t, const Hyper&, const MatrixHyper&, void*, void*, float*, float*,
                         Partial&);

// Base pointers of one tensor (list input) or of the flat buffers, and the kernel for its dtypes.
struct Source {
  const void* grad = nullptr;
  int64_t grad_elsize = 4;
  void* param = nullptr;
  int64_t param_elsize = 4;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  void* copy = nullptr;  // low-precision copy of a float32 master param, or nullptr
  int64_t copy_elsize = 2;
  ChunkFn fn = nullptr;
};

// Kernel for statistics only (update=false) or AdamW + statistics, for the given dtype codes;
// copy_dtype (kBF16/kF16, with param_dtype kF32) also writes the updated master to a copy.
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
