// Python bindings of the grades CPU backend: argument checks, dtype dispatch and hyperparameter
// rounding. The kernels themselves live in grades_cpu.cpp.
//
// Every entry point takes a host chunk table: an int64 CPU tensor [C, 3] of (start, length, id)
// rows, with chunks of at most CHUNK elements. For list inputs, start is relative to tensor `id`
// (which is also the matrix id); for flat buffers, start is relative to the buffer and id is the
// matrix id. The Python side has already validated user inputs; the checks here only guard the
// extension against being called directly with inconsistent arguments.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "grades_cpu.h"

namespace grades_cpu {
namespace {

int dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    case at::kDouble: return kF64;
    default:
      TORCH_CHECK(false, what, " has unsupported dtype ", t.scalar_type(), " (float32/bfloat16/float16/float64)");
  }
  return kF32;
}

void check_dense_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided && t.is_contiguous(), what, " must be dense and contiguous");
}

// Checks the chunk table and the output; returns the number of matrices.
int64_t check_table_and_out(const at::Tensor& chunks, const at::Tensor& out,
                            const c10::optional<at::Tensor>& frozen) {
  check_dense_cpu(chunks, "chunk table");
  TORCH_CHECK(chunks.scalar_type() == at::kLong && chunks.dim() == 2 && chunks.size(1) == 3,
              "chunk table must be an int64 tensor [C, 3], got ", chunks.scalar_type(), " ", chunks.sizes());
  check_dense_cpu(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.dim() == 2 && out.size(1) == 3,
              "out must be a float64 tensor [M, 3], got ", out.scalar_type(), " ", out.sizes());
  const int64_t M = out.size(0);
  if (frozen.has_value()) {
    check_dense_cpu(*frozen, "frozen");
    TORCH_CHECK(frozen->scalar_type() == at::kBool && frozen->dim() == 1 && frozen->size(0) == M,
                "frozen must be a bool tensor [", M, "], got ", frozen->scalar_type(), " ", frozen->sizes());
  }
  return M;
}

// Every chunk must lie inside its source (of `numels[source]` elements) and name a valid matrix.
void check_rows(const at::Tensor& chunks, const std::vector<int64_t>& numels, bool per_tensor, int64_t M) {
  const int64_t C = chunks.size(0);
  const int64_t* r = chunks.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t start = r[3 * c], len = r[3 * c + 1], id = r[3 * c + 2];
    TORCH_CHECK(id >= 0 && id < M, "chunk ", c, " has matrix id ", id, " outside [0, ", M, ")");
    const int64_t n = numels[per_tensor ? id : 0];
    // len <= n - start, not start + len <= n: the sum may overflow int64
    TORCH_CHECK(start >= 0 && len >= 0 && len <= kChunk && start <= n && len <= n - start, "chunk ", c,
                " (start ", start, ", length ", len, ") is outside its tensor of ", n, " elements (or longer than CHUNK=", kChunk, ")");
  }
}

// Shared hyperparameters rounded to float32 the way the reference rounds them.
Hyper make_hyper(double lr, bool lr_is_tensor, double beta1, double beta2, double eps, double weight_decay,
                 const c10::optional<at::Tensor>& grad_scale, bool maximize, bool* small_w) {
  Hyper h;
  if (grad_scale.has_value()) h.scale = grad_scale->item<float>();
  h.maximize = maximize;
  h.lerp_w = static_cast<float>(1.0 - beta1);
  *small_w = std::fabs(h.lerp_w) < 0.5f;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  // lr as a Python number: 1 - lr*wd in double, then rounded; as a float32 tensor: float32 math.
  h.decay = lr_is_tensor ? 1.f - static_cast<float>(lr) * static_cast<float>(weight_decay)
                         : static_cast<float>(1.0 - lr * weight_decay);
  // float64 arithmetic: the Python numbers as they are; a tensor lr's factor as float32 computes it
  h.d_scale = h.scale;
  h.d_lerp_w = 1.0 - beta1;
  h.d_beta2 = beta2;
  h.d_one_minus_beta2 = 1.0 - beta2;
  h.d_eps = eps;
  h.d_decay = lr_is_tensor ? static_cast<double>(h.decay) : 1.0 - lr * weight_decay;
  return h;
}

std::vector<MatrixHyper> make_matrix_hyper(int64_t M, double lr, double beta1, double beta2, double step,
                                           const c10::optional<at::Tensor>& step_per_matrix) {
  std::vector<MatrixHyper> mh(static_cast<size_t>(M));
  const float* steps = nullptr;
  at::Tensor steps_f;
  if (step_per_matrix.has_value()) {
    steps_f = step_per_matrix->to(at::kFloat).contiguous();
    TORCH_CHECK(steps_f.numel() == M, "per-matrix step must have ", M, " entries, got ", steps_f.numel());
    steps = steps_f.data_ptr<float>();
  }
  for (int64_t i = 0; i < M; ++i) {
    const double s = steps ? static_cast<double>(steps[i]) : step;
    const double bc1 = 1.0 - std::pow(beta1, s);
    mh[i].d_step_size = lr / bc1;
    mh[i].d_bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, s));
    mh[i].step_size = static_cast<float>(mh[i].d_step_size);
    mh[i].bc2_sqrt = static_cast<float>(mh[i].d_bc2_sqrt);
  }
  return mh;
}

// The parameter a Source updates: `param` itself, or with master weights the float32 `master`
// (read and written) and `param` as the copy that receives the rounded result.
void set_param(Source& s, const at::Tensor& param, const at::Tensor* master, const char* what,
               const char* master_what) {
  if (master == nullptr) {
    s.param = param.data_ptr();
    s.param_elsize = param.element_size();
    return;
  }
  check_dense_cpu(*master, master_what);
  TORCH_CHECK(master->scalar_type() == at::kFloat, master_what, " must be float32, got ", master->scalar_type());
  TORCH_CHECK(master->numel() == param.numel(), master_what, " has ", master->numel(), " elements, ", what,
              " has ", param.numel());
  dtype_code(param, what);
  s.param = master->data_ptr();
  s.param_elsize = 4;
  s.copy = param.data_ptr();
  s.copy_elsize = param.element_size();
}

// The moments of a Source: float32, or float64 for float64 params; max_exp_avg_sq (amsgrad) may be
// undefined.
void set_moments(Source& s, const at::Tensor& param, const at::Tensor& m, const at::Tensor& v,
                 const at::Tensor* vmax, const char* what) {
  const auto want = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = param.numel();
  check_dense_cpu(m, "exp_avg");
  check_dense_cpu(v, "exp_avg_sq");
  TORCH_CHECK(m.numel() == n && v.numel() == n, "moments of ", what, " differ in size from it");
  TORCH_CHECK(m.scalar_type() == want && v.scalar_type() == want, "moments of ", what, " must be ", want);
  s.exp_avg = m.data_ptr();
  s.exp_avg_sq = v.data_ptr();
  s.moment_elsize = m.element_size();
  if (vmax != nullptr) {
    check_dense_cpu(*vmax, "max_exp_avg_sq");
    TORCH_CHECK(vmax->numel() == n && vmax->scalar_type() == want, "max_exp_avg_sq of ", what, " must be ", want,
                " with ", n, " elements");
    s.max_exp_avg_sq = vmax->data_ptr();
  }
}

// The kernel of an AdamW Source; refuses dtype combinations without one.
ChunkFn adamw_kernel(bool update, int pd, int gd, bool scale, bool small_w, int cd, const char* what) {
  ChunkFn fn = select_kernel(update, pd, gd, scale, small_w, cd);
  TORCH_CHECK(fn != nullptr, what, ": no kernel for this dtype combination (float64 params need float64 "
              "gradients and no master)");
  return fn;
}

bool found_inf_set(const c10::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<double>() != 0.0;
}

void launch(const std::vector<Source>& src, bool per_tensor, const at::Tensor& chunks, int64_t M,
            const c10::optional<at::Tensor>& frozen, const Hyper& h, const std::vector<MatrixHyper>* mh,
            at::Tensor& out) {
  const int nthreads = at::get_num_threads();
  const bool* fz = frozen.has_value() ? frozen->data_ptr<bool>() : nullptr;
  pybind11::gil_scoped_release no_gil;
  run_chunks(src.data(), per_tensor, chunks.data_ptr<int64_t>(), chunks.size(0), M, fz, h,
             mh ? mh->data() : nullptr, nthreads, out.data_ptr<double>());
}

}  // namespace

// grad_stats over a list of M tensors: out[M, 3].
void grad_stats_list(const std::vector<at::Tensor>& grads, const at::Tensor& chunks,
                     const c10::optional<at::Tensor>& frozen, at::Tensor out) {
  const int64_t M = check_table_and_out(chunks, out, frozen);
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == M, "got ", grads.size(), " grads for ", M, " output rows");
  std::vector<Source> src(grads.size());
  std::vector<int64_t> numels(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    check_dense_cpu(grads[i], "grad");
    src[i].grad = grads[i].data_ptr();
    src[i].grad_elsize = grads[i].element_size();
    src[i].fn = select_kernel(false, kF32, dtype_code(grads[i], "grad"), false, true);
    numels[i] = grads[i].numel();
  }
  check_rows(chunks, numels, true, M);
  launch(src, true, chunks, M, frozen, Hyper{}, nullptr, out);
}

// grad_stats over one flat buffer described by a chunk table: out[M, 3].
void grad_stats_flat(const at::Tensor& buf, const at::Tensor& chunks, const c10::optional<at::Tensor>& frozen,
                     at::Tensor out) {
  const int64_t M = check_table_and_out(chunks, out, frozen);
  check_dense_cpu(buf, "grad buffer");
  std::vector<Source> src(1);
  src[0].grad = buf.data_ptr();
  src[0].grad_elsize = buf.element_size();
  src[0].fn = select_kernel(false, kF32, dtype_code(buf, "grad buffer"), false, true);
  check_rows(chunks, {buf.numel()}, false, M);
  launch(src, false, chunks, M, frozen, Hyper{}, nullptr, out);
}

// Masked AdamW (+ statistics of the gradients read) over lists of M tensors.
void adamw_list(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const at::Tensor& chunks, const c10::optional<at::Tensor>& frozen, double lr, bool lr_is_tensor,
                double beta1, double beta2, double eps, double weight_decay, double step,
                const c10::optional<at::Tensor>& step_per_matrix, const c10::optional<at::Tensor>& grad_scale,
                const c10::optional<at::Tensor>& found_inf, at::Tensor out,
                const std::vector<c10::optional<at::Tensor>>& masters, bool maximize,
                const std::vector<at::Tensor>& max_exp_avg_sqs) {
  const int64_t M = check_table_and_out(chunks, out, frozen);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == M && grads.size() == params.size() &&
                  exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "params, grads, exp_avgs, exp_avg_sqs must all have ", M, " tensors");
  TORCH_CHECK(masters.empty() || masters.size() == params.size(), "masters must be empty or have ", M,
              " entries, got ", masters.size());
  TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == params.size(),
              "max_exp_avg_sqs must be empty or have ", M, " entries, got ", max_exp_avg_sqs.size());
  bool small_w = true;
  const Hyper h = make_hyper(lr, lr_is_tensor, beta1, beta2, eps, weight_decay, grad_scale, maximize, &small_w);
  const bool update = !found_inf_set(found_inf);
  std::vector<Source> src(params.size());
  std::vector<int64_t> numels(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    check_dense_cpu(params[i], "param");
    check_dense_cpu(grads[i], "grad");
    TORCH_CHECK(grads[i].numel() == n, "tensors of matrix ", i, " differ in size");
    src[i].grad = grads[i].data_ptr();
    src[i].grad_elsize = grads[i].element_size();
    set_moments(src[i], params[i], exp_avgs[i], exp_avg_sqs[i],
                max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[i], "param");
    const bool has_master = !masters.empty() && masters[i].has_value();
    set_param(src[i], params[i], has_master ? &*masters[i] : nullptr, "param", "master param");
    src[i].fn = adamw_kernel(update, has_master ? kF32 : dtype_code(params[i], "param"),
                             dtype_code(grads[i], "grad"), grad_scale.has_value(), small_w,
                             has_master ? dtype_code(params[i], "param") : kNoCopy, "param");
    numels[i] = n;
  }
  check_rows(chunks, numels, true, M);
  if (!update) {
    launch(src, true, chunks, M, frozen, h, nullptr, out);
    return;
  }
  const auto mh = make_matrix_hyper(M, lr, beta1, beta2, step, step_per_matrix);
  launch(src, true, chunks, M, frozen, h, &mh, out);
}

// Masked AdamW (+ statistics) over four flat buffers of equal length described by a chunk table.
void adamw_flat(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const at::Tensor& chunks, const c10::optional<at::Tensor>& frozen,
                double lr, bool lr_is_tensor, double beta1, double beta2, double eps, double weight_decay,
                double step, const c10::optional<at::Tensor>& step_per_matrix,
                const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                at::Tensor out, const c10::optional<at::Tensor>& master, bool maximize,
                const c10::optional<at::Tensor>& max_exp_avg_sq) {
  const int64_t M = check_table_and_out(chunks, out, frozen);
  check_dense_cpu(param, "param buffer");
  check_dense_cpu(grad, "grad buffer");
  const int64_t n = param.numel();
  TORCH_CHECK(grad.numel() == n, "flat buffers differ in size");
  bool small_w = true;
  const Hyper h = make_hyper(lr, lr_is_tensor, beta1, beta2, eps, weight_decay, grad_scale, maximize, &small_w);
  const bool update = !found_inf_set(found_inf);
  std::vector<Source> src(1);
  src[0].grad = grad.data_ptr();
  src[0].grad_elsize = grad.element_size();
  set_moments(src[0], param, exp_avg, exp_avg_sq, max_exp_avg_sq.has_value() ? &*max_exp_avg_sq : nullptr,
              "param buffer");
  const at::Tensor* m = master.has_value() ? &*master : nullptr;
  set_param(src[0], param, m, "param buffer", "master buffer");
  src[0].fn = adamw_kernel(update, m ? kF32 : dtype_code(param, "param buffer"),
                           dtype_code(grad, "grad buffer"), grad_scale.has_value(), small_w,
                           m ? dtype_code(param, "param buffer") : kNoCopy, "param buffer");
  check_rows(chunks, {n}, false, M);
  if (!update) {
    launch(src, false, chunks, M, frozen, h, nullptr, out);
    return;
  }
  const auto mh = make_matrix_hyper(M, lr, beta1, beta2, step, step_per_matrix);
  launch(src, false, chunks, M, frozen, h, &mh, out);
}

// policy.cpp
void register_policy(pybind11::module& m);

}  // namespace grades_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grades CPU backend: fused per-matrix gradient statistics and masked AdamW (OpenMP)";
  m.attr("CHUNK") = grades_cpu::kChunk;
  m.def("grad_stats_list", &grades_cpu::grad_stats_list, "statistics of a list of gradients",
        py::arg("grads"), py::arg("chunks"), py::arg("frozen"), py::arg("out"));
  m.def("grad_stats_flat", &grades_cpu::grad_stats_flat, "statistics of a flat gradient buffer",
        py::arg("buf"), py::arg("chunks"), py::arg("frozen"), py::arg("out"));
  m.def("adamw_list", &grades_cpu::adamw_list, "masked AdamW + statistics over lists of tensors",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("chunks"),
        py::arg("frozen"), py::arg("lr"), py::arg("lr_is_tensor"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("step"), py::arg("step_per_matrix"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("out"),
        py::arg("masters") = std::vector<c10::optional<at::Tensor>>{}, py::arg("maximize") = false,
        py::arg("max_exp_avg_sqs") = std::vector<at::Tensor>{});
  m.def("adamw_flat", &grades_cpu::adamw_flat, "masked AdamW + statistics over flat buffers",
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("chunks"),
        py::arg("frozen"), py::arg("lr"), py::arg("lr_is_tensor"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("step"), py::arg("step_per_matrix"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("out"), py::arg("master") = py::none(),
        py::arg("maximize") = false, py::arg("max_exp_avg_sq") = py::none());
  grades_cpu::register_policy(m);
}
