// The fused Sculptor step on CPU: torch.ops.kintsugi.fused_sculpt_ (docs/maths.md §2.3).
//
// One param group's step — θ moved by the base rule scaled by ϕ, the fracture signal, ϕ
// gilded — in as few passes over memory as the maths allows, each tensor's passes run back to
// back so its buffers are still in cache:
//
//   element: [Σ|g| if fracture="relative"] → θ step and gilding in one loop, ϕ' stored
//            normalised by a foreseen factor where it can be, Σϕ
//            → [ϕ ← ϕ·(n/Σϕ) if phi_norm="mean" and mean ϕ is not within kForesight of 1;
//               Σϕ summed again, plainly, where mean ϕ < 1/2 made Σ(ϕ − 1) cancel]
//   row:     θ step accumulating each row's Σ|g| → gild the row vector ϕ
//   tensor:  θ step accumulating Σ|g| → after every tensor, gild the group's ϕ vector
//
// Tensors of at least kParallelTensor elements are split across threads; smaller ones are
// stepped whole by one thread each (shares balanced by element count), which needs no
// cross-thread reduction and keeps each tensor in one core's cache. The per-lane maths lives
// in sculpt_math.h.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "sculpt_math.h"

namespace kintsugi {
namespace {

constexpr int64_t kParallelTensor = int64_t{1} << 18;
constexpr int64_t kGrain = int64_t{1} << 15;  // elements per parallel chunk of a large tensor
constexpr int64_t kConvertChunk = 256;        // lanes converted at a time for bf16/fp16
constexpr int64_t kSumBlock = 256;            // vector adds before a sum goes into a double
// How far from 1 (relative) mean ϕ may end under phi_norm="mean" before the element pathway
// makes a pass to rescale ϕ. Where the normalising factor was foreseen, each step leaves its
// rounding error in Σϕ for the next, damped only by 1/(1 + β): unbounded, the mean would drift
// by about 1/β roundings.
template <typename T>
constexpr double kForesight = 4 * std::numeric_limits<T>::epsilon();

enum class Pathway { kElement, kRow, kTensor };

// The group's options, as the Python dispatcher passes them.
struct Options {
  BaseKind base;
  double lr, beta1, beta2, eps, momentum, dampening, weight_decay;
  bool amsgrad, nesterov, maximize;
  Pathway pathway;
  bool relative, norm_mean, multiplicative, softplus;
  double beta, gamma, l1, phi_min;
  std::optional<double> phi_max;
  std::optional<double> grad_scale;
};

// Σ of vector lanes: vector adds within a block, blocks added in double.
template <typename T>
class LaneSum {
 public:
  void add(const Vec<T>& x) {
    acc_ = acc_ + x;
    if (++pending_ == kSumBlock) {
      flush();
    }
  }
  void add_first(const Vec<T>& x, int64_t count) {
    add(Vec<T>::set(Vec<T>(0), x, count));
  }
  double total() {
    flush();
    return total_;
  }

 private:
  void flush() {
    T lanes[Vec<T>::size()];
    acc_.store(lanes);
    for (T lane : lanes) {
      total_ += lane;
    }
    acc_ = Vec<T>(0);
    pending_ = 0;
  }
  Vec<T> acc_{0};
  int64_t pending_ = 0;
  double total_ = 0;
};

// ϕ − 1, summed where Σϕ is wanted (Σϕ = n + Σ(ϕ − 1)): ϕ lies near 1, and LaneSum's float
// additions of values near 1 round alike, so Σϕ would drift by tens of eps over a block, while
// the deviations sum almost exactly.
template <typename T>
Vec<T> deviation_from_one(const Vec<T>& phi) {
  return phi - Vec<T>(1);
}

// ϕ ← max(ϕ·factor, tiny) over n values (the phi_norm="mean" rescaling), re-deriving ρ;
// returns Σ(ϕ − 1) of the result, so the caller can tell whether mean ϕ reached 1.
template <typename T>
double normalise(T* phi, T* rho, int64_t n, T factor) {
  using V = Vec<T>;
  const V f(factor);
  const V tiny(std::numeric_limits<T>::min());
  LaneSum<T> deviation;
  for_each_vector_interleaved<T>(n, [&](int64_t i, int64_t count) {
    const V out = at::vec::clamp_min(V::loadu(phi + i, count) * f, tiny);
    out.store(phi + i, count);
    if (rho != nullptr) {
      softplus_inverse(out).store(rho + i, count);
    }
    deviation.add_first(deviation_from_one(out), count);
  });
  return deviation.total();
}

// Σϕ from the sum of deviations Σ(ϕ − 1), unless that sum has cancelled: where ϕ lies far below
// 1 (every pathway clamped to a phi_min of 1e-6, say) each ϕ − 1 rounds to about −1, and n +
// Σ(ϕ − 1) keeps none of Σϕ's digits (it reached 0, and n/Σϕ inf, at phi_min = 1e-8). Then
// `plain_sum()` sums ϕ itself, which is exact enough there. ϕ − 1 is exact for ϕ in [1/2, 2]
// (Sterbenz), so a mean of at least 1/2 keeps the deviations' sum accurate.
template <typename F>
double phi_sum_of(double deviation_sum, int64_t n, const F& plain_sum) {
  const double sum = double(n) + deviation_sum;
  return sum >= 0.5 * double(n) ? sum : plain_sum();
}

// f(begin, end) → partial sum over [0, n): across threads, or at once.
template <typename F>
double sum_over(bool parallel, int64_t n, int64_t grain, const F& f) {
  if (!parallel || n <= grain) {
    return f(0, n);
  }
  return at::parallel_reduce(
      0, n, grain, 0.0,
      [&](int64_t begin, int64_t end, double acc) { return acc + f(begin, end); },
      std::plus<double>());
}

// torch's mean-then-clamp_min(tiny) of the relative fracture; NaN propagates, as in torch.
template <typename T>
T clamp_mean(double sum, int64_t n) {
  const T mean = static_cast<T>(sum / static_cast<double>(n));
  return std::isnan(mean) ? mean : std::max(mean, std::numeric_limits<T>::min());
}

template <typename T>
Gilding<T> make_gilding(const Options& o, int64_t scope_size) {
  const double max = std::numeric_limits<T>::max();
  double cap = o.phi_max ? std::min(*o.phi_max, max) : max;
  if (o.norm_mean) {
    cap = std::min(cap, max / static_cast<double>(std::max<int64_t>(scope_size, 1)));
  }
  Gilding<T> gd;
  gd.beta = static_cast<T>(o.beta);
  gd.gamma = static_cast<T>(o.gamma);
  gd.l1 = static_cast<T>(o.l1);
  gd.phi_min = static_cast<T>(o.phi_min);
  gd.phi_cap = static_cast<T>(cap);
  gd.multiplicative = o.multiplicative;
  gd.softplus = o.softplus;
  return gd;
}

// Gilds a whole scope held as vectors (row ϕ of a tensor, or the group's tensor ϕ):
// relative fracture, gilding, then normalisation. `l` is scratch.
template <typename T>
void gild_vector(const Options& o, T* phi, T* rho, T* l, int64_t n) {
  using V = Vec<T>;
  if (n == 0) {
    return;
  }
  const Gilding<T> gd = make_gilding<T>(o, n);
  if (o.relative) {
    LaneSum<T> sum;
    for_each_vector<T>(n, [&](int64_t i, int64_t count) { sum.add(V::loadu(l + i, count).abs()); });
    const V mean(clamp_mean<T>(sum.total(), n));
    for_each_vector<T>(n, [&](int64_t i, int64_t count) {
      (V::loadu(l + i, count) / mean).store(l + i, count);
    });
  }
  LaneSum<T> deviation, plain;
  for_each_vector<T>(n, [&](int64_t i, int64_t count) {
    V r = gd.softplus ? V::loadu(rho + i, count) : V(0);
    const V out = gild_lanes(gd, V::loadu(phi + i, count), V::loadu(l + i, count), r);
    out.store(phi + i, count);
    if (gd.softplus && !o.norm_mean) {
      softplus_inverse(out).store(rho + i, count);
    }
    deviation.add_first(deviation_from_one(out), count);
    plain.add_first(out, count);
  });
  if (o.norm_mean) {
    T* const rho_out = gd.softplus ? rho : nullptr;
    const double sum = phi_sum_of(deviation.total(), n, [&] { return plain.total(); });
    const double after = double(n) + normalise(phi, rho_out, n, static_cast<T>(double(n) / sum));
    if (std::abs(after / double(n) - 1) > kForesight<T>) {
      normalise(phi, rho_out, n, static_cast<T>(double(n) / after));  // from a cancelled Σ
    }
  }
}

// One parameter of the group with its state, and how its step runs.
struct Slot {
  at::Tensor param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer, phi, rho;
  bool fresh_momentum = false;
  double step = 0;  // this step's count t (Adam/AdamW)
  Pathway pathway = Pathway::kElement;
  int64_t row_len = 1;
  double fracture_sum = 0;  // tensor pathway: Σ|g|, gilded with the group afterwards
  // Dense copies made for tensors whose buffers are not laid out alike (rare: sliced views);
  // copied back into the originals after the step.
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;

  std::vector<at::Tensor*> buffers() {
    std::vector<at::Tensor*> out;
    for (at::Tensor* t : {&param, &grad, &exp_avg, &exp_avg_sq, &max_exp_avg_sq,
                          &momentum_buffer}) {
      if (t->defined()) {
        out.push_back(t);
      }
    }
    if (pathway == Pathway::kElement) {
      out.push_back(&phi);
      if (rho.defined()) {
        out.push_back(&rho);
      }
    }
    return out;
  }

  // Every buffer walked in one flat order: same strides, non-overlapping and dense; for the
  // row pathway each θ[i] must also be one contiguous block (true of channels_last too).
  void make_dense() {
    const auto buffers = this->buffers();
    const bool alike = std::all_of(buffers.begin(), buffers.end(), [&](at::Tensor* t) {
      return t->strides() == param.strides() && t->is_non_overlapping_and_dense();
    });
    const bool rows_ok = pathway != Pathway::kRow || param.stride(0) == row_len;
    if (alike && rows_ok) {
      return;
    }
    for (at::Tensor* t : buffers) {
      at::Tensor dense = t->contiguous();
      if (!dense.is_same(*t)) {
        copies.emplace_back(*t, dense);
        *t = dense;
      }
    }
  }

  void copy_back() {
    for (auto& [original, dense] : copies) {
      original.copy_(dense);
    }
  }
};

// The step of one Slot whose buffers are stored as S and computed in T (float for
// bf16/fp16/float, double for double; ϕ is always T).
template <typename S, typename T>
class SlotStep {
  using V = Vec<T>;

 public:
  SlotStep(Slot& slot, const Options& o) : slot_(slot), o_(o), n_(slot.param.numel()) {
    rule_ = make_rule();
    buffers_.param = slot.param.data_ptr<S>();
    buffers_.grad = slot.grad.data_ptr<S>();
    if (slot.exp_avg.defined()) {
      buffers_.exp_avg = slot.exp_avg.data_ptr<S>();
      buffers_.exp_avg_sq = slot.exp_avg_sq.data_ptr<S>();
    }
    if (slot.max_exp_avg_sq.defined()) {
      buffers_.max_exp_avg_sq = slot.max_exp_avg_sq.data_ptr<S>();
    }
    if (slot.momentum_buffer.defined()) {
      buffers_.momentum_buffer = slot.momentum_buffer.data_ptr<S>();
    }
    phi_ = slot.phi.data_ptr<T>();
    rho_ = slot.rho.defined() ? slot.rho.data_ptr<T>() : nullptr;
  }

  void run(bool parallel) {
    if (n_ == 0) {
      return;
    }
    switch (slot_.pathway) {
      case Pathway::kElement:
        return run_element(parallel);
      case Pathway::kRow:
        return run_rows(parallel);
      case Pathway::kTensor:
        slot_.fracture_sum = sum_over(parallel, n_, kGrain, [&](int64_t begin, int64_t end) {
          return direction_pass(begin, end, V(*phi_));
        });
        return;
    }
  }

 private:
  BaseRule<T> make_rule() const {
    BaseRule<T> r;
    r.kind = o_.base;
    r.maximize = o_.maximize;
    r.unscale = o_.grad_scale.has_value();
    r.grad_scale = static_cast<T>(o_.grad_scale.value_or(1.0));
    r.lr = static_cast<T>(o_.lr);
    r.weight_decay = static_cast<T>(o_.weight_decay);
    if (o_.base == BaseKind::kSGD) {
      r.has_momentum = o_.momentum != 0;
      r.fresh_momentum = slot_.fresh_momentum;
      r.nesterov = o_.nesterov;
      r.momentum = static_cast<T>(o_.momentum);
      r.dampening_keep = static_cast<T>(1 - o_.dampening);
      return r;
    }
    // As torch: bias corrections in double from the step count, then cast.
    const double bias_correction1 = 1 - std::pow(o_.beta1, slot_.step);
    const double bias_correction2 = 1 - std::pow(o_.beta2, slot_.step);
    r.amsgrad = o_.amsgrad;
    r.decay = static_cast<T>(1 - o_.lr * o_.weight_decay);
    r.lerp_weight = static_cast<T>(1 - o_.beta1);
    r.beta2 = static_cast<T>(o_.beta2);
    r.one_minus_beta2 = static_cast<T>(1 - o_.beta2);
    r.eps = static_cast<T>(o_.eps);
    r.step_size = static_cast<T>(o_.lr / bias_correction1);
    r.inv_bias_correction2_sqrt = static_cast<T>(1 / std::sqrt(bias_correction2));
    return r;
  }

  // Runs f(buffers in T positioned at `begin`, begin, count) over [begin, end) and returns the
  // sum of its results. Reduced-precision storage is converted to T in small chunks and the
  // buffers f writes are converted back (the grad only when it is unscaled).
  template <typename F>
  double in_math_type(const Buffers<S>& src, int64_t begin, int64_t end, bool write_grad, const F& f) {
    if constexpr (std::is_same_v<S, T>) {
      Buffers<T> at_begin;
      auto offset = [&](T* ptr) { return ptr == nullptr ? nullptr : ptr + begin; };
      at_begin.param = offset(src.param);
      at_begin.grad = offset(src.grad);
      at_begin.exp_avg = offset(src.exp_avg);
      at_begin.exp_avg_sq = offset(src.exp_avg_sq);
      at_begin.max_exp_avg_sq = offset(src.max_exp_avg_sq);
      at_begin.momentum_buffer = offset(src.momentum_buffer);
      return f(at_begin, begin, end - begin);
    } else {
      T local[6][kConvertChunk];
      S* const stored[6] = {src.param, src.grad, src.exp_avg, src.exp_avg_sq,
                            src.max_exp_avg_sq, src.momentum_buffer};
      Buffers<T> math;
      T** const slots[6] = {&math.param, &math.grad, &math.exp_avg, &math.exp_avg_sq,
                            &math.max_exp_avg_sq, &math.momentum_buffer};
      double total = 0;
      for (int64_t start = begin; start < end; start += kConvertChunk) {
        const int64_t count = std::min(kConvertChunk, end - start);
        for (int k = 0; k < 6; ++k) {
          *slots[k] = stored[k] == nullptr ? nullptr : local[k];
          if (stored[k] != nullptr) {
            at::vec::convert(stored[k] + start, local[k], count);
          }
        }
        total += f(math, start, count);
        for (int k = 0; k < 6; ++k) {
          if (stored[k] != nullptr && (k != 1 || write_grad)) {
            at::vec::convert(local[k], stored[k] + start, count);
          }
        }
      }
      return total;
    }
  }

  Buffers<S> grad_only() const {
    Buffers<S> b;
    b.grad = buffers_.grad;
    return b;
  }

  // Σ|g| (unscaled) over [begin, end): the relative fracture's denominator.
  double abs_sum(int64_t begin, int64_t end) {
    return in_math_type(grad_only(), begin, end, false, [&](const Buffers<T>& b, int64_t, int64_t n) {
      LaneSum<T> sum;
      for_each_vector_interleaved<T>(n, [&](int64_t i, int64_t count) {
        V g = V::loadu(b.grad + i, count);
        if (rule_.unscale) {
          g = g / V(rule_.grad_scale);
        }
        sum.add(g.abs());
      });
      return sum.total();
    });
  }

  // θ step with one ϕ for all lanes of [begin, end); returns Σ|g| (row and tensor pathways).
  double direction_pass(int64_t begin, int64_t end, const V& phi) {
    return in_math_type(buffers_, begin, end, rule_.unscale, [&](const Buffers<T>& b, int64_t, int64_t n) {
      LaneSum<T> sum;
      for_each_vector<T>(n, [&](int64_t i, int64_t count) { sum.add(base_step(rule_, b, i, count, phi)); });
      return sum.total();
    });
  }

  // θ step and gilding of each lane's own ϕ over [begin, end), ϕ' stored as max(ϕ'·scale, floor)
  // (1 and 0 store it as it is); returns Σ(stored − 1), see deviation_from_one.
  double element_pass(int64_t begin, int64_t end, const Gilding<T>& gd, T inv_mean, T scale, T floor) {
    const bool store_rho = gd.softplus && !o_.norm_mean;  // else normalise() derives it
    return in_math_type(buffers_, begin, end, rule_.unscale, [&](const Buffers<T>& b, int64_t start, int64_t n) {
      T* phi = phi_ + start;
      T* rho = rho_ == nullptr ? nullptr : rho_ + start;
      LaneSum<T> sum;
      for_each_vector<T>(n, [&](int64_t i, int64_t count) {
        const V phi_before = V::loadu(phi + i, count);
        V l = base_step(rule_, b, i, count, phi_before);
        if (o_.relative) {
          l = l * V(inv_mean);
        }
        V r = gd.softplus ? V::loadu(rho + i, count) : V(0);
        const V out = gild_lanes(gd, phi_before, l, r);
        const V stored = at::vec::clamp_min(out * V(scale), V(floor));
        stored.store(phi + i, count);
        if (store_rho) {
          softplus_inverse(out).store(rho + i, count);
        }
        sum.add_first(deviation_from_one(stored), count);
      });
      return sum.total();
    });
  }

  void run_element(bool parallel) {
    T inv_mean = 1;
    double abs_total = 0;
    if (o_.relative) {
      abs_total = sum_over(parallel, n_, kGrain, [&](int64_t b, int64_t e) { return abs_sum(b, e); });
      inv_mean = T(1) / clamp_mean<T>(abs_total, n_);
    }
    const Gilding<T> gd = make_gilding<T>(o_, n_);
    const T scale = foreseen_factor(gd, abs_total, inv_mean).value_or(T(1));
    // normalise()'s floor, applied as ϕ is stored in case no rescaling follows
    const T floor = o_.norm_mean ? std::numeric_limits<T>::min() : T(0);
    const double phi_sum = double(n_) + sum_over(parallel, n_, kGrain, [&](int64_t b, int64_t e) {
      return element_pass(b, e, gd, inv_mean, scale, floor);
    });
    if (!o_.norm_mean) {
      return;
    }
    double sum = phi_sum_of(phi_sum - double(n_), n_, [&] {
      return sum_over(parallel, n_, kGrain, [&](int64_t b, int64_t e) { return plain_sum(b, e); });
    });
    // Under softplus the rescaling pass also derives ρ, so it always runs. A second pass only
    // where the first factor came from a sum of ϕ far from 1, whose rounding exceeds kForesight.
    for (int pass = 0; pass < 2; ++pass) {
      if (!(gd.softplus && pass == 0) && std::abs(sum / double(n_) - 1) <= kForesight<T>) {
        return;
      }
      const T factor = static_cast<T>(double(n_) / sum);  // one rounding: ϕ ≡ 1 stays 1
      sum = double(n_) + sum_over(parallel, n_, kGrain, [&](int64_t b, int64_t e) {
        return normalise(phi_ + b, rho_ == nullptr ? nullptr : rho_ + b, e - b, factor);
      });
    }
  }

  // Σϕ over [begin, end), for phi_sum_of.
  double plain_sum(int64_t begin, int64_t end) const {
    LaneSum<T> sum;
    for_each_vector_interleaved<T>(end - begin, [&](int64_t i, int64_t count) {
      sum.add(V::loadu(phi_ + begin + i, count));
    });
    return sum.total();
  }

  // The phi_norm="mean" factor n/Σϕ', foreseen before the step so that ϕ' is stored normalised
  // in the step's own pass; none where it cannot be. The pass after the step that would otherwise
  // rescale ϕ cost up to 0.2× of torch's fused SGD step (benchmarks/README.md).
  //
  // Under additive ascent, clamp positivity and no damping, Σϕ' = Σϕ + β·Σ(l − λ) as long as no
  // pathway is clamped or has a non-finite u; with the relative fracture Σl = Σ|g|/mean|g| is
  // known from the pre-pass, and Σϕ = n holds to rounding after the last step's normalisation.
  // run_element sums ϕ as stored in the step's pass and rescales it after all where its mean is
  // off by more than kForesight (the first step, a clamped pathway, ϕ set by hand).
  std::optional<T> foreseen_factor(const Gilding<T>& gd, double abs_total, T inv_mean) const {
    if (!(o_.norm_mean && o_.relative && gd.gamma == 0 && !gd.softplus && !gd.multiplicative)) {
      return std::nullopt;
    }
    const double u_total = abs_total * double(inv_mean) - double(n_) * o_.l1;
    const double factor = double(n_) / (double(n_) + o_.beta * u_total);
    // ϕ'·factor must neither overflow nor underflow, or a rescaling after the step could not
    // recover ϕ'.
    const bool lossless = factor * gd.phi_min >= std::numeric_limits<T>::min() &&
                          factor * gd.phi_cap <= std::numeric_limits<T>::max();
    if (!std::isfinite(factor) || !lossless) {
      return std::nullopt;
    }
    return static_cast<T>(factor);
  }

  void run_rows(bool parallel) {
    const int64_t len = slot_.row_len;
    const int64_t rows = n_ / len;
    std::vector<T> fracture(rows);
    sum_over(parallel, rows, std::max<int64_t>(1, kGrain / len), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const double sum = direction_pass(r * len, (r + 1) * len, V(phi_[r]));
        fracture[r] = static_cast<T>(sum / static_cast<double>(len));
      }
      return 0.0;
    });
    gild_vector(o_, phi_, rho_, fracture.data(), rows);
  }

  Slot& slot_;
  const Options& o_;
  const int64_t n_;
  BaseRule<T> rule_;
  Buffers<S> buffers_;
  T* phi_ = nullptr;
  T* rho_ = nullptr;
};

void step_slot(Slot& slot, const Options& o, bool parallel) {
  switch (slot.param.scalar_type()) {
    case at::kFloat:
      return SlotStep<float, float>(slot, o).run(parallel);
    case at::kDouble:
      return SlotStep<double, double>(slot, o).run(parallel);
    case at::kBFloat16:
      return SlotStep<c10::BFloat16, float>(slot, o).run(parallel);
    case at::kHalf:
      return SlotStep<c10::Half, float>(slot, o).run(parallel);
    default:
      TORCH_CHECK(false, "unreachable: dtype checked in make_slots");
  }
}

// One-element CPU tensors (step counts, 0-d ϕ, GradScaler's scale and found_inf) are read and
// written through their data pointer: a dispatcher call per tensor would cost more than the
// step of a small tensor.
double get_scalar(const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1 && t.is_cpu(), "fused_sculpt_: expected a one-element CPU tensor");
  switch (t.scalar_type()) {
    case at::kFloat:
      return *t.const_data_ptr<float>();
    case at::kDouble:
      return *t.const_data_ptr<double>();
    default:
      return t.item<double>();
  }
}

void set_scalar(const at::Tensor& t, double value) {
  switch (t.scalar_type()) {
    case at::kFloat:
      *t.data_ptr<float>() = static_cast<float>(value);
      return;
    case at::kDouble:
      *t.data_ptr<double>() = value;
      return;
    default:
      t.fill_(value);
  }
}

// The tensor pathway's scope is the group: its per-tensor fractures and 0-d ϕ are gilded as
// one vector, in the dtype of the first ϕ (as the reference stacks them).
template <typename T>
void gild_group(const Options& o, std::vector<Slot>& slots) {
  const int64_t n = static_cast<int64_t>(slots.size());
  std::vector<T> phi(n), rho(n), fracture(n);
  for (int64_t i = 0; i < n; ++i) {
    const Slot& s = slots[i];
    // a.mean(); an empty tensor's is NaN, as in torch
    fracture[i] = static_cast<T>(s.fracture_sum / static_cast<double>(s.param.numel()));
    phi[i] = static_cast<T>(get_scalar(s.phi));
    if (o.softplus) {
      rho[i] = static_cast<T>(get_scalar(s.rho));
    }
  }
  gild_vector<T>(o, phi.data(), o.softplus ? rho.data() : nullptr, fracture.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    set_scalar(slots[i].phi, phi[i]);
    if (o.softplus) {
      set_scalar(slots[i].rho, rho[i]);
    }
  }
}

std::vector<Slot> make_slots(
    at::TensorList params, at::TensorList grads, at::TensorList phis, at::TensorList rhos,
    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
    at::TensorList momentum_buffers, const c10::List<bool>& fresh_momentum,
    at::TensorList state_steps, const Options& o) {
  const size_t n = params.size();
  const bool adam = o.base != BaseKind::kSGD;
  const bool has_momentum = !adam && o.momentum != 0;
  auto expect = [&](at::TensorList list, bool needed, const char* name) {
    TORCH_CHECK(list.size() == (needed ? n : 0), "fused_sculpt_: ", name, " has ", list.size(),
                " tensors for ", n, " params");
  };
  expect(grads, true, "grads");
  expect(phis, true, "phis");
  expect(rhos, o.softplus, "rhos");
  expect(exp_avgs, adam, "exp_avgs");
  expect(exp_avg_sqs, adam, "exp_avg_sqs");
  expect(max_exp_avg_sqs, adam && o.amsgrad, "max_exp_avg_sqs");
  expect(momentum_buffers, has_momentum, "momentum_buffers");
  expect(state_steps, adam, "state_steps");

  std::vector<Slot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    Slot& s = slots[i];
    s.param = params[i];
    s.grad = grads[i];
    s.phi = phis[i];
    const auto dtype = s.param.scalar_type();
    TORCH_CHECK(s.param.is_cpu(), "fused_sculpt_: expected CPU tensors, got ", s.param.device());
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                    dtype == at::kHalf,
                "fused_sculpt_: fused=True supports float32, float64, bfloat16 and float16 "
                "parameters, got ", dtype);
    TORCH_CHECK(s.grad.scalar_type() == dtype && s.grad.sizes() == s.param.sizes(),
                "fused_sculpt_: grad of param ", i, " does not match its dtype and shape");
    const auto phi_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(s.phi.scalar_type() == phi_dtype, "fused_sculpt_: phi of param ", i,
                " must be ", phi_dtype, ", got ", s.phi.scalar_type());
    if (o.softplus) {
      s.rho = rhos[i];
      TORCH_CHECK(s.rho.scalar_type() == phi_dtype && s.rho.sizes() == s.phi.sizes(),
                  "fused_sculpt_: rho of param ", i, " does not match its phi");
    }
    if (adam) {
      s.exp_avg = exp_avgs[i];
      s.exp_avg_sq = exp_avg_sqs[i];
      if (o.amsgrad) {
        s.max_exp_avg_sq = max_exp_avg_sqs[i];
      }
      s.step = get_scalar(state_steps[i]) + 1;
    }
    if (has_momentum) {
      s.momentum_buffer = momentum_buffers[i];
      s.fresh_momentum = fresh_momentum.get(i);
    }
    for (at::Tensor* t : {&s.exp_avg, &s.exp_avg_sq, &s.max_exp_avg_sq, &s.momentum_buffer}) {
      TORCH_CHECK(!t->defined() || (t->scalar_type() == dtype && t->sizes() == s.param.sizes()),
                  "fused_sculpt_: state of param ", i, " does not match its dtype and shape");
    }
    // Checked before any slot steps: a written buffer whose elements share memory (an
    // expanded tensor) would fail only when its dense copy is written back, after the step.
    for (at::Tensor* t : {&s.param, &s.phi, &s.rho, &s.exp_avg, &s.exp_avg_sq,
                          &s.max_exp_avg_sq, &s.momentum_buffer}) {
      TORCH_CHECK(!t->defined() || at::has_internal_overlap(*t) != at::MemOverlap::Yes,
                  "fused_sculpt_: a tensor of param ", i, " has elements that share memory "
                  "(expanded?); fused=True writes it in place");
    }

    // A row pathway over rows of one element (1-D params) or over a 0-d param is the element
    // pathway: one ϕ per element, scoped by the tensor.
    s.pathway = o.pathway;
    if (s.pathway == Pathway::kRow) {
      s.row_len = s.param.dim() == 0 || s.param.size(0) == 0
          ? 1 : s.param.numel() / s.param.size(0);
      if (s.row_len == 1) {
        s.pathway = Pathway::kElement;
      }
    }
    const int64_t phi_numel = s.pathway == Pathway::kElement ? s.param.numel()
        : s.pathway == Pathway::kRow ? s.param.size(0) : 1;
    TORCH_CHECK(s.phi.numel() == phi_numel, "fused_sculpt_: phi of param ", i, " has ",
                s.phi.numel(), " elements, its pathway needs ", phi_numel);
    TORCH_CHECK(s.pathway == Pathway::kElement || s.phi.is_contiguous(),
                "fused_sculpt_: row and tensor phi must be contiguous");
    s.make_dense();
  }
  return slots;
}

void fused_sculpt_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList phis, at::TensorList rhos,
    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
    at::TensorList momentum_buffers, const c10::List<bool>& fresh_momentum,
    at::TensorList state_steps, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf, c10::string_view base, double lr, double beta1,
    double beta2, double eps, bool amsgrad, double momentum, double dampening, bool nesterov,
    double weight_decay, bool maximize, c10::string_view pathway, bool relative, double beta,
    double gamma, double l1, double phi_min, std::optional<double> phi_max, bool norm_mean,
    bool multiplicative, bool softplus) {
  // GradScaler found inf/NaN grads: skip the whole step (θ, ϕ, moments and step counts).
  if (found_inf.has_value() && get_scalar(*found_inf) != 0) {
    return;
  }
  Options o;
  o.base = base == "sgd" ? BaseKind::kSGD : base == "adamw" ? BaseKind::kAdamW : BaseKind::kAdam;
  TORCH_CHECK(base == "sgd" || base == "adam" || base == "adamw", "fused_sculpt_: unknown base ", base);
  o.pathway = pathway == "row" ? Pathway::kRow : pathway == "tensor" ? Pathway::kTensor
                                                                      : Pathway::kElement;
  TORCH_CHECK(pathway == "element" || pathway == "row" || pathway == "tensor",
              "fused_sculpt_: unknown pathway ", pathway);
  o.lr = lr;
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.amsgrad = amsgrad;
  o.momentum = momentum;
  o.dampening = dampening;
  o.nesterov = nesterov;
  o.weight_decay = weight_decay;
  o.maximize = maximize;
  o.relative = relative;
  o.beta = beta;
  o.gamma = gamma;
  o.l1 = l1;
  o.phi_min = phi_min;
  o.phi_max = phi_max;
  o.norm_mean = norm_mean;
  o.multiplicative = multiplicative;
  o.softplus = softplus;
  if (grad_scale.has_value()) {
    o.grad_scale = get_scalar(*grad_scale);
  }

  std::vector<Slot> slots = make_slots(params, grads, phis, rhos, exp_avgs, exp_avg_sqs,
                                       max_exp_avg_sqs, momentum_buffers, fresh_momentum,
                                       state_steps, o);
  if (o.base != BaseKind::kSGD) {
    for (size_t i = 0; i < slots.size(); ++i) {
      set_scalar(state_steps[i], slots[i].step);
    }
  }

  std::vector<Slot*> small;
  int64_t small_total = 0;
  for (Slot& s : slots) {
    if (s.param.numel() >= kParallelTensor) {
      step_slot(s, o, /*parallel=*/true);
    } else {
      small.push_back(&s);
      small_total += s.param.numel();
    }
  }
  if (!small.empty()) {
    // Contiguous shares of about equal element count, one per thread.
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(
        at::get_num_threads(), (small_total + kGrain - 1) / kGrain));
    std::vector<int64_t> share(small.size());
    int64_t start = 0;
    for (size_t k = 0; k < small.size(); ++k) {
      share[k] = small_total == 0 ? 0 : std::min(threads - 1, start * threads / small_total);
      start += small[k]->param.numel();
    }
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (size_t k = 0; k < small.size(); ++k) {
        if (share[k] >= t0 && share[k] < t1) {
          step_slot(*small[k], o, /*parallel=*/false);
        }
      }
    });
  }
  for (Slot& s : slots) {
    s.copy_back();
  }
  if (o.pathway == Pathway::kTensor && !slots.empty()) {
    if (slots.front().phi.scalar_type() == at::kDouble) {
      gild_group<double>(o, slots);
    } else {
      gild_group<float>(o, slots);
    }
  }
}

}  // namespace
}  // namespace kintsugi

TORCH_LIBRARY(kintsugi, m) {
  m.def(
      "fused_sculpt_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] phis, "
      "Tensor(d!)[] rhos, Tensor(e!)[] exp_avgs, Tensor(f!)[] exp_avg_sqs, "
      "Tensor(g!)[] max_exp_avg_sqs, Tensor(h!)[] momentum_buffers, bool[] fresh_momentum, "
      "Tensor(i!)[] state_steps, Tensor? grad_scale, Tensor? found_inf, *, str base, float lr, "
      "float beta1, float beta2, float eps, bool amsgrad, float momentum, float dampening, "
      "bool nesterov, float weight_decay, bool maximize, str pathway, bool relative, "
      "float beta, float gamma, float l1, float phi_min, float? phi_max, bool norm_mean, "
      "bool multiplicative, bool softplus) -> ()");
}

TORCH_LIBRARY_IMPL(kintsugi, CPU, m) {
  m.impl("fused_sculpt_", &kintsugi::fused_sculpt_cpu);
}
