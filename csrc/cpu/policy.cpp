// The GradES decision rule for state held in host memory, as one native call per optimizer step.
//
// GradES keeps its per-component state (frozen mask, patience counters, EMA, levels,
// thresholds, freeze steps, last statistic) in small tensors. On a GPU the rule runs as a few
// tensor ops on the device; on the CPU a dozen tiny NumPy/torch ops cost more host time than the
// arithmetic is worth (each op is microseconds of dispatch for a [C] vector, C ~ 10..1000), and
// that time lands on every training step. HostPolicy runs the whole rule -- row reduction per
// component, participation, unclipping, statistic, EMA, thresholds, patience, freeze cap -- in one
// pass over C components, in place on the very tensors Python holds.
//
// It must decide bitwise as the torch rule does (grades/policy/rule.py, TorchRule): the same
// float64 operations in the same order, each rounded once (the build disables FMA contraction),
// IEEE division, and square roots taken by ATen itself. tests/test_policy.py runs both side by side.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "grades_cpu.h"

namespace grades_cpu {
namespace {

enum Statistic : int64_t { kL1 = 0, kL2 = 1, kMeanAbs = 2, kRms = 3 };
// bits of step()'s result, as grades/policy/rule.py names them (HISTORY_FULL, FROZE)
constexpr int64_t kHistoryFull = 1, kFroze = 2;

void check_state(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous(), what,
              " must be a dense contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == n, what, " must be a ", dtype, " tensor [",
              n, "], got ", t.scalar_type(), " ", t.sizes());
}

class HostPolicy {
 public:
  // idx: [C, K] int64 rows of each component in the statistics table, padded with `num_rows`.
  // numel: [C] float64 (elements per component, >= 1). The state tensors are [C] (frozen: bool;
  // counter, freeze_step: int64; the rest float64) and invalid_steps a 0-d int64 tensor; they are
  // updated in place. new_frozen: [C] bool, set to the components frozen by the last step().
  // quorum: qualifying components freeze only when at least this many qualify or are frozen.
  HostPolicy(at::Tensor idx, int64_t num_rows, int64_t statistic, at::Tensor numel, double ema, int64_t level_div,
             bool auto_mode, int64_t check_interval, int64_t patience, int64_t max_frozen, int64_t quorum,
             at::Tensor frozen, at::Tensor counter, at::Tensor ema_v, at::Tensor ema_w, at::Tensor ref,
             at::Tensor ref_w, at::Tensor thresh, at::Tensor freeze_step, at::Tensor last_stat,
             at::Tensor invalid_steps, at::Tensor new_frozen)
      : idx_(std::move(idx)), numel_(std::move(numel)), frozen_(std::move(frozen)), counter_(std::move(counter)),
        ema_v_(std::move(ema_v)), ema_w_(std::move(ema_w)), ref_(std::move(ref)), ref_w_(std::move(ref_w)),
        thresh_(std::move(thresh)), freeze_step_(std::move(freeze_step)), last_stat_(std::move(last_stat)),
        invalid_steps_(std::move(invalid_steps)), new_frozen_(std::move(new_frozen)), num_rows_(num_rows),
        statistic_(statistic), ema_(ema), level_div_(level_div), auto_(auto_mode),
        check_interval_(check_interval), patience_(patience), max_frozen_(max_frozen), quorum_(quorum) {
    TORCH_CHECK(idx_.device().is_cpu() && idx_.is_contiguous() && idx_.scalar_type() == at::kLong &&
                    idx_.dim() == 2 && idx_.size(1) >= 1,
                "idx must be a contiguous int64 CPU tensor [C, K], got ", idx_.scalar_type(), " ", idx_.sizes());
    C_ = idx_.size(0);
    K_ = idx_.size(1);
    TORCH_CHECK(num_rows_ >= 0, "num_rows must be >= 0");
    const int64_t* ix = idx_.data_ptr<int64_t>();
    for (int64_t i = 0; i < C_ * K_; ++i)
      TORCH_CHECK(ix[i] >= 0 && ix[i] <= num_rows_, "idx entry ", ix[i], " outside [0, ", num_rows_, "]");
    TORCH_CHECK(statistic_ >= kL1 && statistic_ <= kRms, "unknown statistic code ", statistic_);
    TORCH_CHECK(ema_ >= 0.0 && ema_ < 1.0, "ema must be in [0, 1), got ", ema_);
    TORCH_CHECK(check_interval_ >= 1 && patience_ >= 1 && max_frozen_ >= 0 && level_div_ >= 1 && quorum_ >= 0,
                "bad check_interval/patience/max_frozen/level_div/quorum");
    check_state(numel_, at::kDouble, C_, "numel");
    check_state(frozen_, at::kBool, C_, "frozen");
    check_state(counter_, at::kLong, C_, "counter");
    check_state(freeze_step_, at::kLong, C_, "freeze_step");
    check_state(new_frozen_, at::kBool, C_, "new_frozen");
    for (auto* t : {&ema_v_, &ema_w_, &ref_, &ref_w_, &thresh_, &last_stat_}) check_state(*t, at::kDouble, C_, "state");
    TORCH_CHECK(invalid_steps_.device().is_cpu() && invalid_steps_.scalar_type() == at::kLong &&
                    invalid_steps_.numel() == 1,
                "invalid_steps must be a one-element int64 CPU tensor");
  }

  // One optimizer step t (1-based) with grace period `grace`, called as the torch rule is
  // (grades/policy/rule.py, TorchRule.step):
  //   rows:         [num_rows, 3] float64 (sum g^2, sum |g|, non-finite count) per row of the table;
  //   row_part:     [num_rows] bool or None -- rows that had a gradient (a component takes part
  //                 when all its rows did);  participated: [C] bool or None -- the same per component;
  //   clip:         the factor the gradients were multiplied by (statistics are divided by it; a
  //                 value that is not finite and > 0 makes the step invalid), or None;
  //   (a step is also invalid when any component's sum g^2 or sum |g| is not finite)
  //   skipped:      bool tensor, the optimizer skipped this step (non-finite gradients): the step
  //                 is invalid; None: it did not.
  // Records a history sample (step, frozen count, last statistic) when t is a multiple of the
  // history interval or something froze, if history buffers are bound and not full.
  // Returns kFroze when components froze (listed in new_frozen) + kHistoryFull when the history
  // buffers are now full: zero in the common case, nothing for the caller to do.
  int64_t step(const at::Tensor& rows, const c10::optional<at::Tensor>& row_part,
               const c10::optional<at::Tensor>& participated, c10::optional<double> clip,
               const c10::optional<at::Tensor>& skipped_flag, int64_t t, int64_t grace) {
    bool skipped = false;
    if (skipped_flag.has_value()) {
      TORCH_CHECK(skipped_flag->device().is_cpu() && skipped_flag->numel() == 1 &&
                      skipped_flag->scalar_type() == at::kBool,
                  "skipped must be a one-element bool CPU tensor");
      skipped = skipped_flag->item<bool>();
    }
    TORCH_CHECK(rows.device().is_cpu() && rows.is_contiguous() && rows.scalar_type() == at::kDouble &&
                    rows.dim() == 2 && rows.size(0) == num_rows_ && rows.size(1) == 3,
                "rows must be a contiguous float64 CPU tensor [", num_rows_, ", 3], got ", rows.scalar_type(), " ",
                rows.sizes());
    const bool* rp = nullptr;
    if (row_part.has_value()) {
      check_state(*row_part, at::kBool, num_rows_, "row_part");
      rp = row_part->data_ptr<bool>();
    }
    const bool* tk = nullptr;
    if (participated.has_value()) {
      check_state(*participated, at::kBool, C_, "participated");
      tk = participated->data_ptr<bool>();
    }
    const double* r = rows.data_ptr<double>();
    const int64_t* ix = idx_.data_ptr<int64_t>();
    const double* numel = numel_.data_ptr<double>();
    bool* frozen = frozen_.data_ptr<bool>();
    int64_t* counter = counter_.data_ptr<int64_t>();
    double* ema = ema_v_.data_ptr<double>();
    double* ema_w = ema_w_.data_ptr<double>();
    double* ref = ref_.data_ptr<double>();
    double* ref_w = ref_w_.data_ptr<double>();
    double* thresh = thresh_.data_ptr<double>();
    int64_t* fstep = freeze_step_.data_ptr<int64_t>();
    double* last = last_stat_.data_ptr<double>();
    bool* fresh = new_frozen_.data_ptr<bool>();

    // 1. per-component sums in index order (a pad entry adds a zero row), participation, unclip
    stats_.resize(3 * C_);
    ok_.resize(C_);
    bool valid = !skipped;
    double c = 1.0, bad = 0.0;
    const bool unclip = clip.has_value() && *clip != 1.0;
    if (unclip) {
      c = *clip;
      bad = (std::isfinite(c) && c > 0.0) ? 0.0 : 1.0;
    }
    for (int64_t i = 0; i < C_; ++i) {
      const int64_t* row = ix + i * K_;
      double s0 = 0.0, s1 = 0.0, s2 = 0.0;
      bool part = tk == nullptr || tk[i];
      for (int64_t j = 0; j < K_; ++j) {
        const int64_t k = row[j];
        const double a = k < num_rows_ ? r[3 * k] : 0.0;
        const double b = k < num_rows_ ? r[3 * k + 1] : 0.0;
        const double n = k < num_rows_ ? r[3 * k + 2] : 0.0;
        if (j == 0) {
          s0 = a; s1 = b; s2 = n;
        } else {
          s0 += a; s1 += b; s2 += n;
        }
        if (rp != nullptr && k < num_rows_) part = part && rp[k];
      }
      if (unclip) {
        s0 = s0 / (c * c);
        s1 = s1 / c;
        s2 = s2 + bad;
      }
      // a valid reading: no non-finite gradient value and no overflowed sum (a finite gradient
      // beyond ~1e19 gives an infinite float32 sum of squares)
      if (s2 != 0.0 || !std::isfinite(s0) || !std::isfinite(s1)) valid = false;
      stats_[3 * i] = s0;
      stats_[3 * i + 1] = s1;
      stats_[3 * i + 2] = s2;
      ok_[i] = part;
    }
    if (!valid) invalid_steps_.data_ptr<int64_t>()[0] += 1;
    // square roots through ATen, on the same [C, 3] layout as the tensor path: its vectorised CPU
    // square root is not always correctly rounded, and the paths must agree bitwise
    at::Tensor roots;
    const double* root = nullptr;
    if (statistic_ == kL2 || statistic_ == kRms) {
      const at::Tensor s = at::from_blob(stats_.data(), {C_, 3}, at::TensorOptions().dtype(at::kDouble));
      roots = statistic_ == kL2 ? s.select(1, 0).sqrt() : (s.select(1, 0) / numel_).sqrt();
      roots = roots.contiguous();
      root = roots.data_ptr<double>();
    }

    // 2. statistic, EMA, last value; the level (lowest statistic in the last grace steps, as
    // rule.py's level_window_start places them); patience; which components qualify
    const bool decide = t > grace && (t - grace) % check_interval_ == 0;
    const bool track = auto_ && t <= grace && t > grace - std::max<int64_t>(1, grace / level_div_);
    const double d = ema_, one_d = 1.0 - ema_;
    int64_t n_frozen = 0;
    for (int64_t i = 0; i < C_; ++i) n_frozen += frozen[i] ? 1 : 0;
    int64_t n_qual = 0;
    for (int64_t i = 0; i < C_; ++i) {
      const bool live = !frozen[i];
      const bool ok = valid && (ok_[i] || frozen[i]);
      const double s1 = stats_[3 * i + 1];
      double val = 0.0;
      if (live) {
        switch (statistic_) {
          case kL1: val = s1; break;
          case kMeanAbs: val = s1 / numel[i]; break;
          default: val = root[i]; break;  // kL2, kRms
        }
        if (std::isnan(val)) val = std::numeric_limits<double>::infinity();
      }
      double cur = val;
      if (d != 0.0) {
        if (ok) {
          ema[i] = d * ema[i] + one_d * val;
          ema_w[i] = d * ema_w[i] + one_d;
        }
        cur = ema[i] / std::max(ema_w[i], 1e-300);
      }
      if (ok) last[i] = cur;
      fresh[i] = false;
      if (t <= grace) {
        if (track && ok) {
          ref[i] = ref_w[i] > 0.0 ? std::min(ref[i], cur) : cur;
          ref_w[i] += 1.0;
        }
      } else if (decide && ok) {
        const bool below = live && cur < thresh[i];
        counter[i] = below ? counter[i] + 1 : 0;
        if (live && counter[i] >= patience_) {
          fresh[i] = true;
          ++n_qual;
        }
      }
    }
    // 3. freezing: the qualifying components, once the quorum is met; the earliest in order win
    // when more qualify than the cap allows
    int64_t room = max_frozen_ - n_frozen, n_new = 0;
    const bool quorate = n_frozen + n_qual >= quorum_;
    for (int64_t i = 0; i < C_; ++i) {
      if (!fresh[i]) continue;
      if (quorate && room > 0) {
        --room;
        ++n_new;
        frozen[i] = true;
        fstep[i] = t;
      } else {
        fresh[i] = false;
      }
    }
    bool full = false;
    if (hist_steps_.defined()) {
      int64_t* n = hist_n_.data_ptr<int64_t>();
      if ((t % hist_every_ == 0 || n_new > 0) && *n < hist_steps_.size(0)) {
        const int64_t row = *n;
        hist_steps_.data_ptr<int64_t>()[row] = t;
        hist_frozen_.data_ptr<int64_t>()[row] = n_frozen + n_new;
        std::copy(last, last + C_, hist_stat_.data_ptr<double>() + row * C_);
        *n = row + 1;
      }
      full = *n >= hist_steps_.size(0);
    }
    if (t == grace && auto_) {
      // thresholds become fixed at the end of the grace period; a component without a valid
      // reading in the level window gets a negative one (it cannot freeze)
      for (int64_t i = 0; i < C_; ++i) thresh[i] = thresh[i] * (ref_w[i] > 0.0 ? ref[i] : -1.0);
    }
    return (n_new > 0 ? kFroze : 0) + (full ? kHistoryFull : 0);
  }

  // History buffers: steps [cap] int64, frozen [cap] int64, stat [cap, C] float64, and the number
  // of samples in them n [1] int64 (shared with Python, which thins and grows them); a sample is
  // recorded every `every` steps.
  void bind_history(at::Tensor steps, at::Tensor frozen, at::Tensor stat, at::Tensor n, int64_t every) {
    const int64_t cap = steps.numel();
    check_state(steps, at::kLong, cap, "history steps");
    check_state(frozen, at::kLong, cap, "history frozen");
    TORCH_CHECK(stat.device().is_cpu() && stat.is_contiguous() && stat.scalar_type() == at::kDouble &&
                    stat.dim() == 2 && stat.size(0) == cap && stat.size(1) == C_,
                "history stat must be a contiguous float64 CPU tensor [", cap, ", ", C_, "]");
    check_state(n, at::kLong, 1, "history count");
    TORCH_CHECK(every >= 1, "history interval must be >= 1, got ", every);
    hist_steps_ = std::move(steps);
    hist_frozen_ = std::move(frozen);
    hist_stat_ = std::move(stat);
    hist_n_ = std::move(n);
    hist_every_ = every;
  }

 private:
  at::Tensor idx_, numel_, frozen_, counter_, ema_v_, ema_w_, ref_, ref_w_, thresh_, freeze_step_, last_stat_,
      invalid_steps_, new_frozen_;
  int64_t num_rows_, statistic_;
  double ema_;
  int64_t level_div_;
  bool auto_;
  int64_t check_interval_, patience_, max_frozen_, quorum_;
  int64_t C_ = 0, K_ = 1;
  at::Tensor hist_steps_, hist_frozen_, hist_stat_, hist_n_;
  int64_t hist_every_ = 1;
  std::vector<double> stats_;
  std::vector<char> ok_;
};

}  // namespace

void register_policy(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<HostPolicy>(m, "HostPolicy",
                         "The GradES decision rule on host-memory state, one call per optimizer step")
      .def(py::init<at::Tensor, int64_t, int64_t, at::Tensor, double, int64_t, bool, int64_t, int64_t, int64_t,
                    int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor, at::Tensor, at::Tensor, at::Tensor>(),
           py::arg("idx"), py::arg("num_rows"), py::arg("statistic"), py::arg("numel"), py::arg("ema"),
           py::arg("level_div"), py::arg("auto_mode"), py::arg("check_interval"), py::arg("patience"),
           py::arg("max_frozen"), py::arg("quorum"), py::arg("frozen"), py::arg("counter"), py::arg("ema_v"),
           py::arg("ema_w"), py::arg("ref"), py::arg("ref_w"), py::arg("thresh"), py::arg("freeze_step"),
           py::arg("last_stat"), py::arg("invalid_steps"), py::arg("new_frozen"))
      .def("step", &HostPolicy::step, py::arg("rows"), py::arg("row_part"), py::arg("participated"),
           py::arg("clip"), py::arg("skipped"), py::arg("t"), py::arg("grace"))
      .def("bind_history", &HostPolicy::bind_history, py::arg("steps"), py::arg("frozen"), py::arg("stat"),
           py::arg("n"), py::arg("every"));
}

}  // namespace grades_cpu
