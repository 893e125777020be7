// The CPU loops of cpu_loops.h. Where a loop stands for a composition that rounds once per step
// it rounds as that composition does (the same dtype, the same order), so results agree to the bit
// but where it says otherwise.
//
// residual_norm: the sum is rounded exactly as the composition rounds it (branch * keep * scale in
// the tensor's dtype, then + x), so the same units are dropped to the same values. The norm's statistics and
// per-element arithmetic run in float64 (the input's dtype is float32 or float64): at least as
// accurate as at::native_layer_norm, whose float32 statistics accumulate in float32.
#include "cpu_loops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ipmt {
namespace {

using Accumulate = double;

bool defined(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// Rows per parallel task: about ATen's grain of elements, at least one row.
int64_t rows_per_task(int64_t width) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(width, 1));
}

// The float64 sum of term(j) over j < width in four interleaved partial sums: a single running
// sum waits on each addition's latency (a third of the layer norm's time at 384 channels).
template <typename Term>
inline Accumulate interleaved_sum(int64_t width, Term&& term) {
  Accumulate a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t j = 0;
  for (; j + 4 <= width; j += 4) {
    a0 += term(j);
    a1 += term(j + 1);
    a2 += term(j + 2);
    a3 += term(j + 3);
  }
  for (; j < width; ++j) a0 += term(j);
  return (a0 + a1) + (a2 + a3);
}

// `value` where `condition` holds, else +0, without a branch: the signs of activations are
// random, and a branch on them mispredicts about as often as not.
template <typename T>
inline T select(bool condition, T value) {
  using Bits = std::conditional_t<sizeof(T) == sizeof(uint32_t), uint32_t, uint64_t>;
  Bits bits;
  std::memcpy(&bits, &value, sizeof(T));
  bits &= Bits(0) - static_cast<Bits>(condition);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// value * keep * scale in the tensor's dtype, as dropout computes it (x * keep * scale): a dropped
// NaN or infinity stays NaN, as in the published math.
template <typename T>
inline T kept(T value, const bool* keep, int64_t j, T scale) {
  return keep == nullptr ? value : value * static_cast<T>(keep[j]) * scale;
}

// max(value, 0) as relu_ computes it: NaN stays NaN.
template <typename T>
inline T relu(T value) {
  return select(!(value < T(0)), value);
}

// out = x * keep * scale over `count` elements.
template <typename T>
void dropout_values(const T* x, const bool* keep, T scale, int64_t count, T* out) {
  at::parallel_for(0, count, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = kept(x[i], keep, i, scale);
  });
}

template <typename T>
void residual_norm_rows(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& keep, double scale,
                        const at::Tensor& weight, const at::Tensor& bias, double eps, at::Tensor& out,
                        at::Tensor& sum, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t width = x.size(-1), rows = x.numel() / std::max<int64_t>(width, 1);
  const T* x_data = x.const_data_ptr<T>();
  const T* branch_data = defined(branch) ? branch.const_data_ptr<T>() : nullptr;
  const bool* keep_data = defined(keep) ? keep.const_data_ptr<bool>() : nullptr;
  const T* weight_data = defined(weight) ? weight.const_data_ptr<T>() : nullptr;
  const T* bias_data = defined(bias) ? bias.const_data_ptr<T>() : nullptr;
  T* out_data = out.mutable_data_ptr<T>();
  T* sum_data = branch_data != nullptr ? sum.mutable_data_ptr<T>() : nullptr;
  T* mean_data = weight_data != nullptr ? mean.mutable_data_ptr<T>() : nullptr;
  T* rstd_data = weight_data != nullptr ? rstd.mutable_data_ptr<T>() : nullptr;
  const T keep_scale = static_cast<T>(scale);
  at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * width;
      const bool* row_keep = keep_data != nullptr ? keep_data + offset : nullptr;
      const T* s = x_data + offset;  // without a branch the norm's input is x itself
      if (branch_data != nullptr) {
        T* sum_row = sum_data + offset;
        for (int64_t j = 0; j < width; ++j) {
          sum_row[j] = x_data[offset + j] + kept(branch_data[offset + j], row_keep, j, keep_scale);
        }
        s = sum_row;
      }
      if (weight_data == nullptr) continue;
      const Accumulate mu = interleaved_sum(width, [&](int64_t j) { return static_cast<Accumulate>(s[j]); }) / width;
      const Accumulate squares = interleaved_sum(width, [&](int64_t j) {
        const Accumulate centred = s[j] - mu;
        return centred * centred;
      });
      const Accumulate inverse_std = 1.0 / std::sqrt(squares / width + eps);
      mean_data[row] = static_cast<T>(mu);
      rstd_data[row] = static_cast<T>(inverse_std);
      T* o = out_data + offset;
      for (int64_t j = 0; j < width; ++j) {
        const Accumulate normed = (s[j] - mu) * inverse_std * weight_data[j];
        o[j] = static_cast<T>(bias_data != nullptr ? normed + bias_data[j] : normed);
      }
    }
  });
}

template <typename T>
void residual_norm_backward_rows(const at::Tensor& grad_out, const at::Tensor& sum, const at::Tensor& mean,
                                 const at::Tensor& rstd, const at::Tensor& keep, double scale,
                                 const at::Tensor& weight, at::Tensor& grad_sum, at::Tensor& grad_branch,
                                 at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t width = grad_out.size(-1), rows = grad_out.numel() / std::max<int64_t>(width, 1);
  const T* grad_data = grad_out.const_data_ptr<T>();
  const bool* keep_data = defined(keep) ? keep.const_data_ptr<bool>() : nullptr;
  const T keep_scale = static_cast<T>(scale);
  T* grad_branch_data = keep_data != nullptr ? grad_branch.mutable_data_ptr<T>() : nullptr;
  if (!defined(weight)) {
    // Both gradients are grad_out itself, but dropped: dropout_values does that.
    if (keep_data != nullptr) dropout_values(grad_data, keep_data, keep_scale, grad_out.numel(), grad_branch_data);
    return;
  }
  const T* sum_data = sum.const_data_ptr<T>();
  const T* mean_data = mean.const_data_ptr<T>();
  const T* rstd_data = rstd.const_data_ptr<T>();
  const T* weight_data = weight.const_data_ptr<T>();
  T* grad_sum_data = grad_sum.mutable_data_ptr<T>();
  // The parameters' gradients sum over rows: one float64 partial sum per thread, added at the end.
  const int64_t threads = at::get_num_threads();
  std::vector<Accumulate> partial(static_cast<size_t>(threads * 2 * width), 0.0);
  at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
    Accumulate* weight_partial = partial.data() + at::get_thread_num() * 2 * width;
    Accumulate* bias_partial = weight_partial + width;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * width;
      const T* dy = grad_data + offset;
      const T* s = sum_data + offset;
      const Accumulate mu = mean_data[row], inverse_std = rstd_data[row];
      // d sum = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight.
      const Accumulate g_total =
          interleaved_sum(width, [&](int64_t j) { return static_cast<Accumulate>(dy[j]) * weight_data[j]; });
      const Accumulate g_xhat_total = interleaved_sum(width, [&](int64_t j) {
        return static_cast<Accumulate>(dy[j]) * weight_data[j] * ((s[j] - mu) * inverse_std);
      });
      for (int64_t j = 0; j < width; ++j) {
        weight_partial[j] += static_cast<Accumulate>(dy[j]) * ((s[j] - mu) * inverse_std);
        bias_partial[j] += dy[j];
      }
      const Accumulate g_mean = g_total / width, g_xhat_mean = g_xhat_total / width;
      const bool* row_keep = keep_data != nullptr ? keep_data + offset : nullptr;
      T* ds = grad_sum_data + offset;
      T* db = grad_branch_data != nullptr ? grad_branch_data + offset : nullptr;
      for (int64_t j = 0; j < width; ++j) {
        const Accumulate xhat = (s[j] - mu) * inverse_std;
        ds[j] = static_cast<T>(inverse_std * (static_cast<Accumulate>(dy[j]) * weight_data[j] - g_mean -
                                              xhat * g_xhat_mean));
        if (db != nullptr) db[j] = kept(ds[j], row_keep, j, keep_scale);
      }
    }
  });
  T* grad_weight_data = grad_weight.mutable_data_ptr<T>();
  T* grad_bias_data = grad_bias.defined() ? grad_bias.mutable_data_ptr<T>() : nullptr;
  for (int64_t j = 0; j < width; ++j) {
    Accumulate weight_total = 0, bias_total = 0;
    for (int64_t t = 0; t < threads; ++t) {
      weight_total += partial[t * 2 * width + j];
      bias_total += partial[t * 2 * width + width + j];
    }
    grad_weight_data[j] = static_cast<T>(weight_total);
    if (grad_bias_data != nullptr) grad_bias_data[j] = static_cast<T>(bias_total);
  }
}

std::atomic<bool> cpu_paths_on{true};

}  // namespace

bool cpu_paths_enabled() { return cpu_paths_on.load(std::memory_order_relaxed); }

bool cpu_loops_apply(std::initializer_list<at::Tensor> tensors) {
  if (!cpu_paths_enabled()) return false;
  c10::optional<at::ScalarType> floating;
  for (const at::Tensor& t : tensors) {
    if (!defined(t)) continue;
    if (!t.is_cpu() || !t.is_contiguous()) return false;
    const auto dtype = t.scalar_type();
    if (dtype == at::kBool) continue;
    if ((dtype != at::kFloat && dtype != at::kDouble) || (floating && *floating != dtype)) return false;
    floating = dtype;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_norm(const at::Tensor& x,
                                                                        const at::Tensor& branch,
                                                                        const at::Tensor& keep, double scale,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& bias, double eps) {
  const bool norm = defined(weight);
  TORCH_CHECK(norm || defined(branch), "residual_norm: neither a branch nor a norm");
  at::Tensor sum = defined(branch) ? at::empty_like(x) : at::Tensor();
  at::Tensor out = norm ? at::empty_like(x) : sum;
  at::DimVector stats_shape(x.sizes().begin(), x.sizes().end() - 1);
  stats_shape.push_back(1);
  at::Tensor mean = at::empty(norm ? at::IntArrayRef(stats_shape) : at::IntArrayRef({0}), x.options());
  at::Tensor rstd = at::empty(norm ? at::IntArrayRef(stats_shape) : at::IntArrayRef({0}), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_norm", [&] {
    residual_norm_rows<scalar_t>(x, branch, keep, scale, weight, bias, eps, out, sum, mean, rstd);
  });
  // Without a norm the sum is the result (the outputs of an operator may not alias one another);
  // without a branch there is no sum.
  if (!norm || !sum.defined()) sum = at::empty({0}, x.options());
  return {out, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& sum, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& keep, double scale, const at::Tensor& weight, bool with_bias) {
  const bool norm = defined(weight);
  const at::Tensor grad = grad_out.contiguous();
  at::Tensor grad_sum = norm ? at::empty_like(grad) : grad;
  // Without a mask the branch's gradient is the sum's.
  at::Tensor grad_branch = defined(keep) ? at::empty_like(grad) : grad_sum;
  at::Tensor grad_weight = norm ? at::empty_like(weight) : at::Tensor();
  at::Tensor grad_bias = norm && with_bias ? at::empty_like(weight) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "residual_norm_backward", [&] {
    residual_norm_backward_rows<scalar_t>(grad, sum, mean, rstd, keep, scale, weight, grad_sum, grad_branch,
                                          grad_weight, grad_bias);
  });
  return {grad_sum, grad_branch, grad_weight, grad_bias};
}

at::Tensor dropout(const at::Tensor& x, const at::Tensor& keep, double scale) {
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout", [&] {
    dropout_values(x.const_data_ptr<scalar_t>(), keep.const_data_ptr<bool>(), static_cast<scalar_t>(scale),
                   x.numel(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

void relu_dropout_(at::Tensor& hidden, const at::Tensor& keep, double scale) {
  const bool* keep_data = defined(keep) ? keep.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "relu_dropout_", [&] {
    scalar_t* h = hidden.mutable_data_ptr<scalar_t>();
    const scalar_t keep_scale = static_cast<scalar_t>(scale);
    at::parallel_for(0, hidden.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      if (keep_data == nullptr) {
        for (int64_t i = begin; i < end; ++i) h[i] = relu(h[i]);
      } else {
        for (int64_t i = begin; i < end; ++i) h[i] = kept(relu(h[i]), keep_data, i, keep_scale);
      }
    });
  });
}

void relu_dropout_backward_(at::Tensor& grad, const at::Tensor& hidden, double scale) {
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "relu_dropout_backward_", [&] {
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* h = hidden.const_data_ptr<scalar_t>();
    const scalar_t keep_scale = static_cast<scalar_t>(scale);
    const bool scaled = scale != 1.0;
    at::parallel_for(0, grad.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      // threshold_backward's test (h <= 0 gives 0): a NaN activation passes the gradient.
      if (scaled) {
        for (int64_t i = begin; i < end; ++i) g[i] = select(!(h[i] <= scalar_t(0)), g[i] * keep_scale);
      } else {
        for (int64_t i = begin; i < end; ++i) g[i] = select(!(h[i] <= scalar_t(0)), g[i]);
      }
    });
  });
}

void scale_and_mask_logits_(at::Tensor& logits, const at::Tensor& token_mask, double scale, double masked_bias) {
  const int64_t batch = logits.size(0), tokens = logits.size(1), rows = logits.size(2);
  const bool* mask = token_mask.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "scale_and_mask_logits_", [&] {
    scalar_t* l = logits.mutable_data_ptr<scalar_t>();
    const scalar_t logit_scale = static_cast<scalar_t>(scale), bias = static_cast<scalar_t>(masked_bias);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const bool* image_mask = mask + b * tokens;
        const bool any_allowed = std::any_of(image_mask, image_mask + tokens, [](bool allowed) { return allowed; });
        scalar_t* image = l + b * tokens * rows;
        for (int64_t i = 0; i < tokens * rows; ++i) {
          image[i] = any_allowed && !image_mask[i / rows] ? bias : image[i] * logit_scale;
        }
      }
    });
  });
}

void attention_softmax_backward_(at::Tensor& grad, const at::Tensor& attention, const at::Tensor& keep,
                                 double scale) {
  const int64_t batch = grad.size(0), tokens = grad.size(1), rows = grad.size(2);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "attention_softmax_backward_", [&] {
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* a = attention.const_data_ptr<scalar_t>();
    const scalar_t* k = defined(keep) ? keep.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t logit_scale = static_cast<scalar_t>(scale);
    at::parallel_for(0, batch * rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t column = begin; column < end; ++column) {
        const int64_t b = column / rows, m = column % rows;
        scalar_t* gc = g + b * tokens * rows + m;
        const scalar_t* ac = a + b * tokens * rows + m;
        const scalar_t* kc = k != nullptr ? k + (b * rows + m) * tokens : nullptr;
        // The multiplier applied first, rounded, as grad_attention.mul_(keep) does.
        if (kc != nullptr) {
          for (int64_t n = 0; n < tokens; ++n) gc[n * rows] *= kc[n];
        }
        Accumulate dot = 0;
        for (int64_t n = 0; n < tokens; ++n) dot += static_cast<Accumulate>(gc[n * rows]) * ac[n * rows];
        for (int64_t n = 0; n < tokens; ++n) {
          gc[n * rows] = static_cast<scalar_t>(ac[n * rows] * (gc[n * rows] - dot)) * logit_scale;
        }
      }
    });
  });
}

at::Tensor sampling_locations(const at::Tensor& reference_points, const at::Tensor& offsets,
                              const at::Tensor& normalizer) {
  at::Tensor locations = at::empty_like(offsets);
  const int64_t batch = offsets.size(0), tokens = offsets.size(1);
  const int64_t pairs = offsets.numel() / std::max<int64_t>(batch * tokens * 2, 1);  // per token
  AT_DISPATCH_FLOATING_TYPES(offsets.scalar_type(), "sampling_locations", [&] {
    const scalar_t* reference = reference_points.const_data_ptr<scalar_t>();
    const scalar_t* offset = offsets.const_data_ptr<scalar_t>();
    const scalar_t* norm = normalizer.const_data_ptr<scalar_t>();
    scalar_t* out = locations.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t base = (b * tokens + t) * pairs * 2;
        for (int64_t p = 0; p < pairs; ++p) {
          for (int64_t c = 0; c < 2; ++c) {
            const int64_t i = base + p * 2 + c;
            out[i] = reference[t * 2 + c] + offset[i] / norm[c];
          }
        }
      }
    }
  });
  return locations;
}

at::Tensor divide_pairs(const at::Tensor& grad, const at::Tensor& normalizer) {
  at::Tensor out = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "divide_pairs", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* norm = normalizer.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < grad.numel(); ++i) o[i] = g[i] / norm[i % 2];
  });
  return out;
}

}  // namespace ipmt

extern "C" int ipmt_fast_set_cpu_paths(int enabled) {
  return ipmt::cpu_paths_on.exchange(enabled != 0) ? 1 : 0;
}
