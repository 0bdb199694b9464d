// Framework-free interface of the grades CUDA kernels.
//
// The kernels work on a *chunk table*: every input tensor (list path) or every segment of a flat
// buffer (flat path) is cut into chunks of at most a few tens of thousands of elements, and one
// thread block reduces (and, for AdamW, updates) one chunk. Two device tables describe the work:
//
//   slots  [S]  GcSlot   where the data lives: one row per tensor (list path) or one row for the
//                        four flat buffers (flat path): raw pointers and dtype codes
//   chunks [C]  GcChunk  (slot, start, length, matrix): elements [start, start+length) of the
//                        slot's arrays belong to matrix `matrix`
//
// plus a CSR index over matrices (`mat_ptr[M+1]`, `mat_chunks[C]`: the chunk ids of matrix i are
// mat_chunks[mat_ptr[i] .. mat_ptr[i+1])) used by the second, per-matrix reduction kernel.
//
// Every op is exactly two kernel launches on the given stream, whatever the number of tensors:
// phase 1 writes one float32 partial per chunk into a workspace, phase 2 adds each matrix's partials
// in float64 in a fixed order. No atomics, no host synchronisation; results are bitwise
// reproducible for the same inputs at the same addresses.
//
// This header includes only CUDA runtime headers so that the .cu files compile with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace grades_cuda {

//: dtype codes used in GcSlot::gdt / GcSlot::pdt. kF64 params go with kF64 gradients and float64
//: moments and are computed in float64; the others are computed in float32 with float32 moments.
enum GcDtype : int64_t { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

//: One row of the slot table; laid out as 8 int64 so that the host can build it as a [S, 8] tensor.
struct GcSlot {
  int64_t g;    // gradient pointer
  int64_t p;    // parameter pointer (0 for statistics only)
  int64_t m;    // exp_avg pointer, float32 or float64 (0 for statistics only)
  int64_t v;    // exp_avg_sq pointer, like m
  int64_t gdt;  // GcDtype of the gradient
  int64_t pdt;  // GcDtype of the parameter
  int64_t numel;  // number of elements (used by the host to key cached layouts)
  int64_t x;    // max_exp_avg_sq pointer (amsgrad), like m; 0 without amsgrad
};

//: One row of the chunk table; [C, 4] int64 on the host.
struct GcChunk {
  int64_t slot;
  int64_t start;   // element offset into the slot's arrays
  int64_t length;  // number of elements (> 0, fits in int32)
  int64_t matrix;  // matrix id in [0, M)
};

//: Per-chunk partial statistics written by phase 1 (24 bytes; float32 chunk sums stored exactly).
struct GcPartial {
  double sumsq;
  double sumabs;
  unsigned int nonfinite;
  unsigned int pad;
};

//: AdamW hyperparameters. Scalars that may live on the device come as pointers (nullptr = use
//: the host value).
struct GcAdamW {
  const float* lr_ptr;      // 0-dim float32 learning rate, or nullptr
  double lr;                // used when lr_ptr == nullptr
  double beta1, beta2;      // for the bias corrections (computed in double)
  float one_minus_beta1;    // lerp weight
  float beta2_f;
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float decay;              // 1 - lr*wd, precomputed in double on the host (lr_ptr == nullptr)
  double eps_d, weight_decay_d;  // for float64 params
  int maximize;             // 1: the update negates the (unscaled) gradient; statistics do not
  const float* step_ptr;    // step count: 0-dim or per-matrix float32, or nullptr
  int step_per_matrix;      // 1 if step_ptr has one entry per matrix
  double step;              // used when step_ptr == nullptr
  const float* grad_scale;  // 0-dim float32 (gradients are divided by it), or nullptr
  const float* found_inf;   // 0-dim float32 (non-zero: no updates), or nullptr
};

//: Elements per chunk the host should use: the size the kernels are tuned for. Chunk lengths are
//: `int` inside the kernels, with `int` loop indices stepping by the block size, so any length up
//: to 2^30 is handled correctly.
constexpr int64_t kChunkElems = 32768;

//: Per-matrix statistics of gradients. `out` is float64 [M, 3]; `workspace` must hold C partials.
//: `frozen` (bool [M]) may be nullptr; `grad_scale` (0-dim float32) may be nullptr.
//: Returns cudaSuccess or the first CUDA error.
cudaError_t grad_stats(const GcSlot* slots, const GcChunk* chunks, int64_t num_chunks,
                       const int64_t* mat_ptr, const int64_t* mat_chunks, int64_t num_matrices,
                       const bool* frozen, const float* grad_scale, GcPartial* workspace,
                       double* out, cudaStream_t stream);

//: Masked AdamW over every chunk whose matrix is not frozen, with the gradient statistics of the
//: same pass written to `out` (float64 [M, 3]).
cudaError_t masked_adamw(const GcSlot* slots, const GcChunk* chunks, int64_t num_chunks,
                         const int64_t* mat_ptr, const int64_t* mat_chunks, int64_t num_matrices,
                         const bool* frozen, const GcAdamW& hp, GcPartial* workspace, double* out,
                         cudaStream_t stream);

}  // namespace grades_cuda
