// Thin torch binding of the framework-free grades CUDA kernels.
//
// Python builds the chunk table and the per-matrix chunk index once per layout and keeps them on the
// device (one int64 "plan" tensor: [C, 4] chunk rows, then mat_ptr [M + 1], then mat_chunks [C]).
// This file turns tensor lists into slot tables (raw pointers + dtype codes, on the host) and launches
// the kernels on torch's current CUDA stream. Nothing here reads device memory or synchronises.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "grades_cuda.cuh"

namespace {

using grades_cuda::GcAdamW;
using grades_cuda::GcChunk;
using grades_cuda::GcPartial;
using grades_cuda::GcSlot;

int64_t dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return grades_cuda::kF32;
    case at::kBFloat16: return grades_cuda::kBF16;
    case at::kHalf: return grades_cuda::kF16;
    case at::kDouble: return grades_cuda::kF64;
    default: TORCH_CHECK(false, "grades cuda: ", what, " has unsupported dtype ", t.scalar_type());
  }
  return -1;
}

int64_t ptr_of(const at::Tensor& t) {
  return t.numel() ? static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr())) : 0;
}

// Host slot table [S, 8] int64 (see GcSlot): one row per gradient; params/moments may be empty lists
// (statistics only) or lists of the same length; max_exp_avg_sqs (amsgrad) empty or of that length.
at::Tensor slot_table(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                      const std::vector<at::Tensor>& max_exp_avg_sqs) {
  const size_t n = grads.size();
  const bool update = !params.empty();
  TORCH_CHECK(!update || (params.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n),
              "grades cuda: params, grads, exp_avgs and exp_avg_sqs must have the same length");
  TORCH_CHECK(max_exp_avg_sqs.empty() || (update && max_exp_avg_sqs.size() == n),
              "grades cuda: max_exp_avg_sqs must be empty or have one tensor per param");
  at::Tensor host = at::empty({static_cast<int64_t>(n), 8}, at::TensorOptions().dtype(at::kLong));
  int64_t* row = host.data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i, row += 8) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.is_cuda() && g.is_contiguous(), "grades cuda: grads[", i, "] must be a contiguous CUDA tensor");
    row[0] = ptr_of(g);
    row[4] = dtype_code(g, "grad");
    row[6] = g.numel();
    row[7] = 0;
    if (update) {
      const at::Tensor &p = params[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
      TORCH_CHECK(p.is_cuda() && m.is_cuda() && v.is_cuda() && p.is_contiguous() && m.is_contiguous() &&
                      v.is_contiguous(),
                  "grades cuda: params/exp_avgs/exp_avg_sqs[", i, "] must be contiguous CUDA tensors");
      TORCH_CHECK(p.numel() == g.numel() && m.numel() == g.numel() && v.numel() == g.numel(),
                  "grades cuda: tensors of matrix ", i, " differ in size");
      const bool f64 = p.scalar_type() == at::kDouble;
      const auto want = f64 ? at::kDouble : at::kFloat;
      TORCH_CHECK(m.scalar_type() == want && v.scalar_type() == want,
                  "grades cuda: exp_avg and exp_avg_sq must be ", want, " for ", p.scalar_type(), " params");
      TORCH_CHECK(f64 == (g.scalar_type() == at::kDouble), "grades cuda: float64 params need float64 gradients");
      row[1] = ptr_of(p);
      row[2] = ptr_of(m);
      row[3] = ptr_of(v);
      row[5] = dtype_code(p, "param");
      if (!max_exp_avg_sqs.empty()) {
        const at::Tensor& x = max_exp_avg_sqs[i];
        TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.numel() == g.numel() && x.scalar_type() == want,
                    "grades cuda: max_exp_avg_sqs[", i, "] must be a contiguous ", want,
                    " CUDA tensor like exp_avg_sq");
        row[7] = ptr_of(x);
      }
    } else {
      row[1] = row[2] = row[3] = 0;
      row[5] = grades_cuda::kF32;
    }
  }
  return host;
}

struct Plan {
  const GcSlot* slots;
  const GcChunk* chunks;
  const int64_t* mat_ptr;
  const int64_t* mat_chunks;
  int64_t num_chunks;
  int64_t num_matrices;
};

Plan check_plan(const at::Tensor& slots, const at::Tensor& plan, int64_t num_chunks, int64_t num_matrices,
                const at::Tensor& out) {
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kDouble && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == num_matrices && out.size(1) == 3,
              "grades cuda: out must be a contiguous float64 CUDA tensor [M, 3]");
  TORCH_CHECK(slots.device() == out.device() && slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                  slots.dim() == 2 && slots.size(1) == 8,
              "grades cuda: slot table must be an int64 [S, 8] tensor on the output's device");
  TORCH_CHECK(plan.device() == out.device() && plan.scalar_type() == at::kLong && plan.is_contiguous() &&
                  plan.numel() == num_chunks * 4 + num_matrices + 1 + num_chunks,
              "grades cuda: plan must be an int64 tensor of C*4 + M+1 + C entries on the output's device");
  const int64_t* base = plan.data_ptr<int64_t>();
  return Plan{reinterpret_cast<const GcSlot*>(slots.data_ptr<int64_t>()), reinterpret_cast<const GcChunk*>(base),
              base + num_chunks * 4, base + num_chunks * 4 + num_matrices + 1, num_chunks, num_matrices};
}

const bool* frozen_ptr(const std::optional<at::Tensor>& frozen, const at::Tensor& out) {
  if (!frozen.has_value()) return nullptr;
  const at::Tensor& f = *frozen;
  TORCH_CHECK(f.device() == out.device() && f.scalar_type() == at::kBool && f.is_contiguous() &&
                  f.numel() == out.size(0),
              "grades cuda: frozen must be a contiguous bool tensor [M] on the output's device");
  return f.data_ptr<bool>();
}

const float* scalar_ptr(const std::optional<at::Tensor>& t, const at::Tensor& out, const char* what,
                        int64_t allowed_numel = 1) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == out.device() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->numel() == allowed_numel,
              "grades cuda: ", what, " must be a contiguous float32 tensor with ", allowed_numel,
              " element(s) on the output's device");
  return t->data_ptr<float>();
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "grades cuda: ", op, " failed: ", cudaGetErrorString(err));
}

at::Tensor workspace(int64_t num_chunks, const at::Tensor& out) {
  static_assert(sizeof(GcPartial) == 24, "GcPartial must be 24 bytes");
  static_assert(sizeof(GcSlot) == 8 * sizeof(int64_t), "GcSlot must be 8 int64");
  return at::empty({std::max<int64_t>(num_chunks, 1), 3}, out.options().dtype(at::kDouble));
}

void grad_stats(const at::Tensor& slots, const at::Tensor& plan, int64_t num_chunks, int64_t num_matrices,
                const std::optional<at::Tensor>& frozen, const std::optional<at::Tensor>& grad_scale,
                at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const Plan pl = check_plan(slots, plan, num_chunks, num_matrices, out);
  at::Tensor ws = workspace(num_chunks, out);
  check(grades_cuda::grad_stats(pl.slots, pl.chunks, pl.num_chunks, pl.mat_ptr, pl.mat_chunks, pl.num_matrices,
                                frozen_ptr(frozen, out), scalar_ptr(grad_scale, out, "grad_scale"),
                                reinterpret_cast<GcPartial*>(ws.data_ptr<double>()), out.data_ptr<double>(),
                                c10::cuda::getCurrentCUDAStream().stream()),
        "grad_stats");
}

void masked_adamw(const at::Tensor& slots, const at::Tensor& plan, int64_t num_chunks, int64_t num_matrices,
                  const std::optional<at::Tensor>& frozen, at::Tensor& out, const std::optional<at::Tensor>& lr_t,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  const std::optional<at::Tensor>& step_t, double step, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, bool maximize) {
  const c10::cuda::CUDAGuard guard(out.device());
  const Plan pl = check_plan(slots, plan, num_chunks, num_matrices, out);
  GcAdamW hp{};
  hp.lr_ptr = scalar_ptr(lr_t, out, "lr");
  hp.lr = lr;
  hp.beta1 = beta1;
  hp.beta2 = beta2;
  hp.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  hp.beta2_f = static_cast<float>(beta2);
  hp.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hp.eps = static_cast<float>(eps);
  hp.weight_decay = static_cast<float>(weight_decay);
  hp.decay = static_cast<float>(1.0 - lr * weight_decay);
  hp.eps_d = eps;
  hp.weight_decay_d = weight_decay;
  hp.maximize = maximize ? 1 : 0;
  hp.step_ptr = nullptr;
  hp.step_per_matrix = 0;
  hp.step = step;
  if (step_t.has_value()) {
    const bool per_matrix = step_t->dim() == 1;
    hp.step_ptr = scalar_ptr(step_t, out, "step", per_matrix ? num_matrices : 1);
    hp.step_per_matrix = per_matrix ? 1 : 0;
  }
  hp.grad_scale = scalar_ptr(grad_scale, out, "grad_scale");
  hp.found_inf = scalar_ptr(found_inf, out, "found_inf");
  at::Tensor ws = workspace(num_chunks, out);
  check(grades_cuda::masked_adamw(pl.slots, pl.chunks, pl.num_chunks, pl.mat_ptr, pl.mat_chunks, pl.num_matrices,
                                  frozen_ptr(frozen, out), hp, reinterpret_cast<GcPartial*>(ws.data_ptr<double>()),
                                  out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream()),
        "masked_adamw");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grades CUDA kernels: chunked multi-tensor gradient statistics and masked AdamW";
  m.attr("CHUNK") = py::int_(grades_cuda::kChunkElems);
  m.def("slot_table", &slot_table, "host int64 [S, 8] table of pointers, dtype codes and sizes", py::arg("grads"),
        py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs") = std::vector<at::Tensor>{});
  m.def("grad_stats", &grad_stats, "per-matrix gradient statistics (2 kernel launches)", py::arg("slots"),
        py::arg("plan"), py::arg("num_chunks"), py::arg("num_matrices"), py::arg("frozen"), py::arg("grad_scale"),
        py::arg("out"));
  m.def("masked_adamw", &masked_adamw, "masked AdamW with fused statistics (2 kernel launches)", py::arg("slots"),
        py::arg("plan"), py::arg("num_chunks"), py::arg("num_matrices"), py::arg("frozen"), py::arg("out"),
        py::arg("lr_t"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("step_t"), py::arg("step"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("maximize") = false);
}
