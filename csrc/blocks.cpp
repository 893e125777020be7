// Sub-layer ops of IPMT's transformer, each one dispatcher call forward and one backward: a fused
// op of fused_ops.cpp with the dropouts, residual and layer norm around it (the compiled form of
// the ops in ipmt_fast/ops/blocks.py, which holds their reference compositions). At IPMT's batch
// sizes the host issuing ops sets a GPU's pace, so a transformer layer is a handful of these calls.
//
// Dropout masks are drawn inside, exactly as the Python compositions draw them (bernoulli_ on a
// bool tensor of the same shape, in the same order: ipmt_fast/ops/_dropout.py; on the CPU the same
// masks from one loop, dropout_draws.h), so every backend applies the same masks from the same
// seed; each mask is returned and saved for backward.
//
// Precision: `compute_dtype` (set by the autocast rule, autograd.cpp) is the dtype the matrix
// products run in, as autocast would cast them; residual sums follow type promotion, and layer
// norms run in float32 under autocast (CUDA autocast's rule for layer_norm).
#include <ATen/ATen.h>

#include <cmath>

#include "cpu_loops.h"
#include "dropout_draws.h"
#include "fused_ops.h"
#include "patch_conv.h"

namespace ipmt {
namespace {

using c10::optional;

// What a tensor returns where an op has nothing to return (no dropout, no layer norm).
Tensor nothing(const Tensor& like, at::ScalarType dtype) { return at::empty({0}, like.options().dtype(dtype)); }

bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

// Whether an optional tensor argument was given (not None).
bool given(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

struct Precision {
  optional<at::ScalarType> compute;

  // `t` as autocast would hand it to a matrix product: floating tensors but float64 in `compute`.
  Tensor lower(const Tensor& t) const {
    if (!compute || !t.defined() || !t.is_floating_point() || t.scalar_type() == at::kDouble ||
        t.scalar_type() == *compute) {
      return t;
    }
    return t.to(*compute);
  }
  at::ScalarType lower_dtype(const Tensor& t) const { return lower(t).scalar_type(); }

  // The dtype a layer norm of a `dtype` tensor runs in: float32 under autocast for half precision.
  at::ScalarType norm_dtype(at::ScalarType dtype) const {
    return compute && (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
  }
  // A layer norm's input: `t` in norm_dtype.
  Tensor norm_input(const Tensor& t) const { return cast(t, norm_dtype(t.scalar_type())); }
};

// Dropout: 1 / (1 - p) on kept units (nothing is kept when p == 1).
double keep_scale(double p) { return p == 1.0 ? 0.0 : 1.0 / (1.0 - p); }

bool dropping(double p, bool train) { return train && p != 0.0; }

// Draws into `keep` (a contiguous bool tensor, or a block of rows of one) the mask draw_keep would
// return for its shape.
void draw_keep_into(Tensor keep, double p) {
  if (dropout_draw_loop_applies(keep)) {
    draw_keep_mask_into(keep, 1.0 - p);
  } else {
    keep.bernoulli_(1.0 - p);
  }
}

// A bool keep mask of `shape`, or an empty tensor when nothing is dropped.
Tensor draw_keep(const Tensor& like, at::IntArrayRef shape, double p, bool train) {
  if (!dropping(p, train)) return nothing(like, at::kBool);
  Tensor keep = at::empty(shape, like.options().dtype(at::kBool));
  draw_keep_into(keep, p);
  return keep;
}

// A multiplier of `shape` in `dtype` (0 or 1 / (1 - p)), or an empty tensor when nothing is dropped.
Tensor draw_multiplier(const Tensor& like, at::IntArrayRef shape, at::ScalarType dtype, double p, bool train) {
  if (!dropping(p, train)) return nothing(like, dtype);
  if ((dtype == at::kFloat || dtype == at::kDouble) && dropout_draw_loop_applies(like)) {
    return draw_keep_multiplier(shape, dtype, 1.0 - p, keep_scale(p));
  }
  Tensor multiplier = at::empty(shape, like.options().dtype(dtype)).bernoulli_(1.0 - p);
  return mul_scalar_(multiplier, keep_scale(p));
}

// x * keep * scale, the same values as the Python `x * keep * scale` (a dropped NaN stays NaN), or
// x without a mask: one CPU loop where it applies (cpu_loops.h), else native_dropout_backward's
// one kernel.
Tensor apply_keep(const Tensor& x, const Tensor& keep, double p) {
  if (!present(keep)) return x;
  if (cpu_loops_apply({x, keep})) return dropout(x, keep, keep_scale(p));
  return at::native_dropout_backward(x, keep, keep_scale(p));
}

optional<Tensor> optional_mask(const Tensor& keep) { return present(keep) ? optional<Tensor>(keep) : c10::nullopt; }

// The least logit of `dtype` whose sigmoid, as torch rounds it, is still >= 0.5: the published
// mask sigmoid(logit) >= 0.5 as a comparison (ipmt_fast/ops/query_activation.py derives the values
// and the tests prove them against torch's sigmoid).
double mask_logit_threshold(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return -0x1p-11;
    case at::kBFloat16: return -0x1p-8;
    case at::kFloat: return -0x1.7ffffcp-23;
    case at::kDouble: return -0x1.7fffffffffffep-52;
    default: TORCH_CHECK(false, "no mask threshold for dtype ", dtype);
  }
}

struct Normed {
  // source: what backward takes the layer norm's input from (residual_layer_norm).
  Tensor out, source, mean, rstd;
};

// LayerNorm over the last dimension, or `x` itself with empty statistics when there is no weight.
Normed layer_norm(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                  const Precision& precision) {
  if (!given(weight)) {
    // Distinct empty tensors: an operator's outputs may not alias one another.
    return {x, nothing(x, x.scalar_type()), nothing(x, x.scalar_type()), nothing(x, x.scalar_type())};
  }
  const Tensor input = precision.norm_input(x);
  auto [out, mean, rstd] = at::native_layer_norm(input, {input.size(-1)}, weight, bias, eps);
  return {out, input, mean, rstd};
}

struct NormGrads {
  Tensor input, weight, bias;
};

NormGrads layer_norm_backward(const Tensor& grad, const Tensor& input, const Tensor& mean, const Tensor& rstd,
                              const optional<Tensor>& weight, const optional<Tensor>& bias) {
  if (!present(input)) return {grad, Tensor(), Tensor()};
  const bool with_bias = given(bias);
  auto [grad_input, grad_weight, grad_bias] = at::native_layer_norm_backward(
      cast(grad, input.scalar_type()), input, {input.size(-1)}, mean, rstd, weight, bias, {true, true, with_bias});
  return {grad_input, grad_weight, grad_bias};
}

// x + Drop(branch) in the dtype its layer norm runs in.
Tensor residual_sum(const Tensor& x, const Tensor& branch, const Tensor& keep, double p, const Precision& precision) {
  return precision.norm_input(x + apply_keep(branch, keep, p));
}

// Whether `t`, x's residual branch or the source kept for its layer norm (Normed), has a dtype
// other than the norm's: the branch is then kept in place of the norm's input, which always has
// the norm's dtype (so backward tells the two apart by this same test).
bool narrower_than_norm(const Tensor& x, const Tensor& t, const Precision& precision) {
  return present(t) && t.scalar_type() != precision.norm_dtype(at::promote_types(x.scalar_type(), t.scalar_type()));
}

// LN(x + Drop(branch)) with the drawn keep mask (x + Drop(branch) without a norm weight, LN(x)
// without a branch): one row loop each way where it applies (cpu_loops.h), the ATen composition
// elsewhere. Its `source` for backward is the norm's input, or the branch where that is narrower
// (autocast: a bf16 branch, a float32 sum): backward then forms the sum again with the same ops
// from the same values, the same bits from half the bytes kept.
Normed residual_layer_norm(const Tensor& x, const Tensor& branch, const Tensor& keep, double p,
                           const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                           const Precision& precision) {
  const Tensor norm_weight = weight.value_or(Tensor()), norm_bias = bias.value_or(Tensor());
  if (cpu_loops_apply({x, branch, keep, norm_weight, norm_bias})) {
    auto [out, sum, mean, rstd] = residual_norm(x, branch, keep, keep_scale(p), norm_weight, norm_bias, eps);
    return {out, sum, mean, rstd};
  }
  if (!branch.defined()) return layer_norm(x, weight, bias, eps, precision);
  Normed normed = layer_norm(residual_sum(x, branch, keep, p, precision), weight, bias, eps, precision);
  if (present(normed.source) && narrower_than_norm(x, branch, precision)) normed.source = branch;
  return normed;
}

struct ResidualNormGrads {
  Tensor sum, branch, weight, bias;  // sum: the gradient of x; branch: of the dropped branch
};

// The gradients of residual_layer_norm(x, ...) from its `source` and statistics.
ResidualNormGrads residual_layer_norm_backward(const Tensor& grad_out, const Tensor& x, const Tensor& source,
                                               const Tensor& mean, const Tensor& rstd, const Tensor& keep, double p,
                                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                                               const Precision& precision) {
  const Tensor norm_weight = weight.value_or(Tensor()), norm_bias = bias.value_or(Tensor());
  const Tensor input = narrower_than_norm(x, source, precision) ? residual_sum(x, source, keep, p, precision) : source;
  if (cpu_loops_apply({grad_out, input, keep, norm_weight, norm_bias})) {
    auto [grad_sum, grad_branch, grad_weight, grad_bias] =
        residual_norm_backward(grad_out, input, mean, rstd, keep, keep_scale(p), norm_weight, present(norm_bias));
    return {grad_sum, grad_branch, grad_weight, grad_bias};
  }
  const NormGrads norm = layer_norm_backward(grad_out, input, mean, rstd, weight, bias);
  return {norm.input, apply_keep(norm.input, keep, p), norm.weight, norm.bias};
}

Tensor as_dtype_of(const Tensor& grad, const Tensor& like) { return cast(grad, like.scalar_type()); }

// The gradient of an optional argument: empty where the argument was None (the autograd layer
// gives None for it).
Tensor optional_grad(const Tensor& grad, const optional<Tensor>& argument, const Tensor& like) {
  return grad.defined() && given(argument) ? as_dtype_of(grad, *argument) : nothing(like, like.scalar_type());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// prototype_attention_block: [LN](P + Drop(masked_prototype_attention(P, T, mask, Drop_attn)))
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
prototype_attention_block(const Tensor& prototype, const Tensor& tokens, const Tensor& token_mask,
                          const Tensor& q_weight, const Tensor& k_weight, const Tensor& v_weight,
                          const Tensor& proj_weight, const optional<Tensor>& norm_weight,
                          const optional<Tensor>& norm_bias, double norm_eps, double scale, double masked_bias,
                          double dropout_p, bool train, optional<at::ScalarType> compute_dtype) {
  const Precision precision{compute_dtype};
  const int64_t b = prototype.size(0), m = prototype.size(1), n = tokens.size(1);
  const Tensor attn_keep = draw_multiplier(prototype, {b, m, n}, precision.lower_dtype(prototype), dropout_p, train);
  auto [out, query, query_key, attention, pooled, value] = masked_prototype_attention(
      precision.lower(prototype), precision.lower(tokens), token_mask, precision.lower(q_weight),
      precision.lower(k_weight), precision.lower(v_weight), precision.lower(proj_weight), optional_mask(attn_keep),
      scale, masked_bias);
  const Tensor proj_keep = draw_keep(prototype, out.sizes(), dropout_p, train);
  const Normed normed =
      residual_layer_norm(prototype, out, proj_keep, dropout_p, norm_weight, norm_bias, norm_eps, precision);
  return {normed.out, attn_keep, proj_keep, query, query_key, attention, pooled, value, normed.source, normed.mean,
          normed.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> prototype_attention_block_backward(
    const Tensor& grad_out, const Tensor& prototype, const Tensor& tokens, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& v_weight, const Tensor& proj_weight, const optional<Tensor>& norm_weight,
    const optional<Tensor>& norm_bias, double scale, double dropout_p, optional<at::ScalarType> compute_dtype,
    const Tensor& attn_keep, const Tensor& proj_keep, const Tensor& query, const Tensor& query_key,
    const Tensor& attention, const Tensor& pooled, const Tensor& value, const Tensor& norm_source,
    const Tensor& norm_mean, const Tensor& norm_rstd) {
  const Precision precision{compute_dtype};
  const ResidualNormGrads norm = residual_layer_norm_backward(grad_out, prototype, norm_source, norm_mean, norm_rstd,
                                                              proj_keep, dropout_p, norm_weight, norm_bias, precision);
  const Tensor grad_branch = cast(norm.branch, value.scalar_type()).contiguous();
  auto [grad_prototype, grad_tokens, grad_q, grad_k, grad_v, grad_proj] = masked_prototype_attention_backward(
      grad_branch, precision.lower(prototype), precision.lower(tokens), precision.lower(q_weight),
      precision.lower(k_weight), precision.lower(v_weight), precision.lower(proj_weight), optional_mask(attn_keep),
      scale, query, query_key, attention, pooled, value);
  // Out of place: without a layer norm, norm.sum is the incoming gradient itself.
  return {as_dtype_of(norm.sum, prototype) + grad_prototype,
          as_dtype_of(grad_tokens, tokens),
          as_dtype_of(grad_q, q_weight),
          as_dtype_of(grad_k, k_weight),
          as_dtype_of(grad_v, v_weight),
          as_dtype_of(grad_proj, proj_weight),
          optional_grad(norm.weight, norm_weight, grad_out),
          optional_grad(norm.bias, norm_bias, grad_out)};
}

// ---------------------------------------------------------------------------------------------
// feed_forward_block: [LN](x + Drop(feed_forward(x)))  (IPMT's FFN, then its layer norm)
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> feed_forward_block(
    const Tensor& x, const Tensor& hidden_weight, const Tensor& output_weight, const optional<Tensor>& norm_weight,
    const optional<Tensor>& norm_bias, double norm_eps, double dropout_p, bool train, bool recompute_hidden,
    optional<at::ScalarType> compute_dtype) {
  const Precision precision{compute_dtype};
  std::vector<int64_t> hidden_shape(x.sizes().begin(), x.sizes().end());
  hidden_shape.back() = hidden_weight.size(0);
  const Tensor hidden_keep = draw_keep(x, hidden_shape, dropout_p, train);
  auto [out, hidden] =
      feed_forward(precision.lower(x), precision.lower(hidden_weight), precision.lower(output_weight),
                   optional_mask(hidden_keep), present(hidden_keep) ? keep_scale(dropout_p) : 1.0, recompute_hidden);
  const Tensor out_keep = draw_keep(x, out.sizes(), dropout_p, train);
  const Normed normed = residual_layer_norm(x, out, out_keep, dropout_p, norm_weight, norm_bias, norm_eps, precision);
  return {normed.out, hidden_keep, out_keep, hidden, normed.source, normed.mean, normed.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> feed_forward_block_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& hidden_weight, const Tensor& output_weight,
    const optional<Tensor>& norm_weight, const optional<Tensor>& norm_bias, double dropout_p,
    optional<at::ScalarType> compute_dtype, const Tensor& hidden_keep, const Tensor& out_keep, const Tensor& hidden,
    const Tensor& norm_source, const Tensor& norm_mean, const Tensor& norm_rstd) {
  const Precision precision{compute_dtype};
  const ResidualNormGrads norm = residual_layer_norm_backward(grad_out, x, norm_source, norm_mean, norm_rstd, out_keep,
                                                              dropout_p, norm_weight, norm_bias, precision);
  const Tensor lower_x = precision.lower(x);
  const Tensor grad_branch = cast(norm.branch, lower_x.scalar_type()).contiguous();
  auto [grad_x, grad_hidden_weight, grad_output_weight] =
      feed_forward_backward(grad_branch, lower_x, precision.lower(hidden_weight), precision.lower(output_weight),
                            optional_mask(hidden_keep), present(hidden_keep) ? keep_scale(dropout_p) : 1.0, hidden);
  // Out of place, as in prototype_attention_block_backward.
  return {as_dtype_of(norm.sum, x) + grad_x, as_dtype_of(grad_hidden_weight, hidden_weight),
          as_dtype_of(grad_output_weight, output_weight), optional_grad(norm.weight, norm_weight, grad_out),
          optional_grad(norm.bias, norm_bias, grad_out)};
}

// ---------------------------------------------------------------------------------------------
// prediction_head: E = FFN(LN(P)) (decoder_norm, mask_embed); logits = E T^T; next mask
// With second tokens T2 it is also the head of (P, T2), as a second call would be, with dropout
// masks of its own drawn after the first head's; logits = [E T^T, E2 T2^T] along the tokens.
// The two heads share LN(P) and run their FFNs as one over the stacked rows [LN(P); LN(P)], so
// the FFN's weight gradients come from one product each.
// ---------------------------------------------------------------------------------------------

namespace {

// The rows of head `head` (B, ...) of `t` (heads * B, ...): a view, `t` itself for one head.
Tensor head_rows(const Tensor& t, int64_t head, int64_t batch) {
  return t.size(0) == batch ? t : t.narrow(0, head * batch, batch);
}

}  // namespace

// The layer norm's float32 input is not returned: it is the prototype itself outside autocast, and an
// operator's output may not alias its input; the backward casts the prototype again instead.
// `normed` is returned as the FFN's input rows, LN(P) once per head.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> prediction_head(
    const Tensor& prototype, const Tensor& tokens, const optional<Tensor>& second_tokens, const Tensor& norm_weight,
    const Tensor& norm_bias, double norm_eps, const Tensor& hidden_weight, const Tensor& output_weight,
    double dropout_p, bool train, optional<at::ScalarType> compute_dtype) {
  const Precision precision{compute_dtype};
  const bool two_heads = given(second_tokens);
  const int64_t batch = prototype.size(0);
  const Normed normed = residual_layer_norm(prototype, Tensor(), Tensor(), 0.0, norm_weight, norm_bias, norm_eps,
                                            precision);
  const Tensor rows = two_heads ? at::cat({normed.out, normed.out}) : normed.out;
  std::vector<int64_t> hidden_shape(rows.sizes().begin(), rows.sizes().end());
  hidden_shape.back() = hidden_weight.size(0);
  Tensor hidden_keep = nothing(prototype, at::kBool), out_keep = nothing(prototype, at::kBool);
  if (dropping(dropout_p, train)) {
    hidden_keep = at::empty(hidden_shape, prototype.options().dtype(at::kBool));
    out_keep = at::empty(rows.sizes(), prototype.options().dtype(at::kBool));
    // In the order two calls draw them: a head's hidden mask, then its output mask.
    for (int64_t head = 0; head < (two_heads ? 2 : 1); ++head) {
      draw_keep_into(head_rows(hidden_keep, head, batch), dropout_p);
      draw_keep_into(head_rows(out_keep, head, batch), dropout_p);
    }
  }
  auto [out, hidden] = feed_forward(precision.lower(rows), precision.lower(hidden_weight),
                                    precision.lower(output_weight), optional_mask(hidden_keep),
                                    present(hidden_keep) ? keep_scale(dropout_p) : 1.0, false);
  const Tensor embedding =
      residual_layer_norm(rows, out, out_keep, dropout_p, c10::nullopt, c10::nullopt, 0.0, precision).out;
  const Tensor lower_embedding = precision.lower(embedding);
  const double threshold = mask_logit_threshold(lower_embedding.scalar_type());
  auto [logits, next_mask] = prototype_mask_logits(head_rows(lower_embedding, 0, batch), precision.lower(tokens),
                                                   threshold);
  if (two_heads) {
    const Tensor second_logits =
        at::bmm(head_rows(lower_embedding, 1, batch), swap_last_two(precision.lower(*second_tokens)));
    logits = at::cat({logits, second_logits}, -1);
  }
  return {logits, next_mask, hidden_keep, out_keep, hidden, embedding, rows, normed.mean, normed.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> prediction_head_backward(
    const Tensor& grad_logits, const Tensor& prototype, const Tensor& tokens, const optional<Tensor>& second_tokens,
    const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& hidden_weight, const Tensor& output_weight,
    double dropout_p, optional<at::ScalarType> compute_dtype, const Tensor& hidden_keep, const Tensor& out_keep,
    const Tensor& hidden, const Tensor& embedding, const Tensor& normed, const Tensor& norm_mean,
    const Tensor& norm_rstd) {
  const Precision precision{compute_dtype};
  const bool two_heads = given(second_tokens);
  const int64_t batch = prototype.size(0);
  const Tensor lower_embedding = precision.lower(embedding);
  const Tensor grad = cast(grad_logits, lower_embedding.scalar_type());
  // logits = [E T^T, E2 T2^T]: each head's rows of the embedding's gradient written in place.
  Tensor grad_lower_embedding = at::empty_like(lower_embedding);
  const std::vector<Tensor> head_tokens =
      two_heads ? std::vector<Tensor>{tokens, *second_tokens} : std::vector<Tensor>{tokens};
  std::vector<Tensor> grad_head_tokens;
  int64_t start = 0;
  for (size_t head = 0; head < head_tokens.size(); ++head) {
    const Tensor lower_tokens = precision.lower(head_tokens[head]);
    const Tensor grad_head = two_heads ? grad.narrow(-1, start, lower_tokens.size(1)) : grad;
    Tensor grad_head_embedding = head_rows(grad_lower_embedding, head, batch);
    at::bmm_out(grad_head_embedding, grad_head, lower_tokens);
    grad_head_tokens.push_back(at::bmm(swap_last_two(grad_head), head_rows(lower_embedding, head, batch)));
    start += lower_tokens.size(1);
  }
  const Tensor grad_embedding = as_dtype_of(grad_lower_embedding, embedding);
  const Tensor lower_normed = precision.lower(normed);
  const Tensor grad_branch =
      cast(apply_keep(grad_embedding, out_keep, dropout_p), lower_normed.scalar_type()).contiguous();
  auto [grad_normed, grad_hidden_weight, grad_output_weight] = feed_forward_backward(
      grad_branch, lower_normed, precision.lower(hidden_weight), precision.lower(output_weight),
      optional_mask(hidden_keep), present(hidden_keep) ? keep_scale(dropout_p) : 1.0, hidden);
  Tensor grad_rows = grad_embedding + as_dtype_of(grad_normed, embedding);
  // Both heads' rows are LN(P): their gradients add up before the norm's backward.
  if (two_heads) grad_rows = head_rows(grad_rows, 0, batch) + head_rows(grad_rows, 1, batch);
  const ResidualNormGrads norm =
      residual_layer_norm_backward(grad_rows.contiguous(), prototype, precision.norm_input(prototype), norm_mean,
                                   norm_rstd, Tensor(), 0.0, norm_weight, norm_bias, precision);
  return {as_dtype_of(norm.sum, prototype),
          as_dtype_of(grad_head_tokens[0], tokens),
          optional_grad(two_heads ? grad_head_tokens[1] : Tensor(), second_tokens, grad_logits),
          as_dtype_of(norm.weight, norm_weight),
          as_dtype_of(norm.bias, norm_bias),
          as_dtype_of(grad_hidden_weight, hidden_weight),
          as_dtype_of(grad_output_weight, output_weight)};
}

// ---------------------------------------------------------------------------------------------
// deformable_self_attention_block: LN(T + Drop(deformable_self_attention(T + pos, T, ...)))
// The query T + pos is not kept for backward: one add recomputes it there, the same bits.
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
deformable_self_attention_block(const Tensor& tokens, const Tensor& pos, const Tensor& padding_mask,
                                const Tensor& reference_points, const Tensor& offset_normalizer, int64_t height,
                                int64_t width, const Tensor& value_weight, const Tensor& value_bias,
                                const Tensor& offset_weight, const Tensor& offset_bias, const Tensor& attention_weight,
                                const Tensor& attention_bias, const Tensor& output_weight, const Tensor& output_bias,
                                int64_t heads, int64_t points, bool fused_coordinate, const Tensor& norm_weight,
                                const Tensor& norm_bias, double norm_eps, double dropout_p, bool train,
                                optional<at::ScalarType> compute_dtype) {
  const Precision precision{compute_dtype};
  const Tensor query = tokens + pos;
  auto [out, value, locations, weights, sampled] = deformable_self_attention(
      precision.lower(query), precision.lower(tokens), padding_mask, reference_points, offset_normalizer, height,
      width, precision.lower(value_weight), precision.lower(value_bias), precision.lower(offset_weight),
      precision.lower(offset_bias), precision.lower(attention_weight), precision.lower(attention_bias),
      precision.lower(output_weight), precision.lower(output_bias), heads, points, fused_coordinate);
  const Tensor keep = draw_keep(tokens, out.sizes(), dropout_p, train);
  const Normed normed = residual_layer_norm(tokens, out, keep, dropout_p, norm_weight, norm_bias, norm_eps, precision);
  return {normed.out, value, locations, weights, sampled, keep, normed.source, normed.mean, normed.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
deformable_self_attention_block_backward(
    const Tensor& grad_out, const Tensor& tokens, const Tensor& pos, const Tensor& padding_mask,
    const Tensor& offset_normalizer, int64_t height, int64_t width, const Tensor& value_weight,
    const Tensor& value_bias, const Tensor& offset_weight, const Tensor& offset_bias, const Tensor& attention_weight,
    const Tensor& attention_bias, const Tensor& output_weight, const Tensor& output_bias, int64_t heads,
    int64_t points, bool fused_coordinate, const Tensor& norm_weight, const Tensor& norm_bias, double dropout_p,
    optional<at::ScalarType> compute_dtype, const Tensor& value, const Tensor& locations, const Tensor& weights,
    const Tensor& sampled, const Tensor& keep, const Tensor& norm_source, const Tensor& norm_mean,
    const Tensor& norm_rstd) {
  const Precision precision{compute_dtype};
  const ResidualNormGrads norm = residual_layer_norm_backward(grad_out, tokens, norm_source, norm_mean, norm_rstd, keep,
                                                              dropout_p, norm_weight, norm_bias, precision);
  const Tensor lower_query = precision.lower(tokens + pos);
  const Tensor grad_branch = cast(norm.branch, lower_query.scalar_type()).contiguous();
  auto grads = deformable_self_attention_backward(
      grad_branch, lower_query, precision.lower(tokens), padding_mask, offset_normalizer, height, width,
      precision.lower(value_weight), precision.lower(offset_weight), precision.lower(attention_weight),
      precision.lower(output_weight), heads, points, fused_coordinate, value, locations, weights, sampled);
  const Tensor& grad_query = std::get<0>(grads);
  // In place: the layer norm's backward made norm.sum (grad_branch, which may be it, is used up).
  Tensor grad_tokens = as_dtype_of(norm.sum, tokens);
  grad_tokens.add_(std::get<1>(grads)).add_(grad_query);
  // pos may be broadcast over the batch: its gradient sums over it then.
  const Tensor grad_pos = grad_query.sizes() == pos.sizes() ? grad_query : grad_query.sum_to_size(pos.sizes());
  return {grad_tokens,
          as_dtype_of(grad_pos, pos),
          as_dtype_of(std::get<2>(grads), value_weight),
          as_dtype_of(std::get<3>(grads), value_bias),
          as_dtype_of(std::get<4>(grads), offset_weight),
          as_dtype_of(std::get<5>(grads), offset_bias),
          as_dtype_of(std::get<6>(grads), attention_weight),
          as_dtype_of(std::get<7>(grads), attention_bias),
          as_dtype_of(std::get<8>(grads), output_weight),
          as_dtype_of(std::get<9>(grads), output_bias),
          as_dtype_of(norm.weight, norm_weight),
          as_dtype_of(norm.bias, norm_bias)};
}

// ---------------------------------------------------------------------------------------------
// query_update_block: U = prototype_query_update(Q, P); U + ReLU(conv(ReLU(conv(U)))) on the map
// ---------------------------------------------------------------------------------------------

namespace {

// (B, h*w, C) tokens as a channels-last (B, C, h, w) view, and back.
Tensor tokens_to_map(const Tensor& tokens, int64_t height, int64_t width) {
  return tokens.view({tokens.size(0), height, width, tokens.size(2)}).permute({0, 3, 1, 2});
}

Tensor map_to_tokens(const Tensor& map) {
  return map.permute({0, 2, 3, 1}).reshape({map.size(0), -1, map.size(1)});
}

// "Same" padding of a square, odd-sized kernel.
int64_t same_padding(const Tensor& weight) { return weight.size(-1) / 2; }

Tensor conv_relu(const Tensor& input, const Tensor& weight) {
  const Tensor out = patch_conv_applies(input, weight) ? patch_conv(input, weight)
                                                       : at::conv2d(input, weight, {}, 1, same_padding(weight));
  return out.relu_();
}

// Gradients of (input, weight) of the convolution in conv_relu from the gradient of its result
// before the ReLU.
std::tuple<Tensor, Tensor> conv_backward(const Tensor& grad_pre, const Tensor& input, const Tensor& weight) {
  if (patch_conv_applies(input, weight)) return patch_conv_backward(grad_pre, input, weight);
  const int64_t pad = same_padding(weight);
  auto [grad_input, grad_weight, unused_bias] = at::convolution_backward(
      grad_pre, input, weight, c10::nullopt, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1, {true, true, false});
  return {grad_input, grad_weight};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> query_update_block(const Tensor& query, const Tensor& prototype,
                                                              const Tensor& update_weight,
                                                              const Tensor& conv1_weight, const Tensor& conv2_weight,
                                                              int64_t height, int64_t width,
                                                              optional<at::ScalarType> compute_dtype) {
  const Precision precision{compute_dtype};
  const Tensor updated =
      prototype_query_update(precision.lower(query), precision.lower(prototype), precision.lower(update_weight));
  // One memory layout whatever the update returned (convolution algorithms, and so their rounding,
  // depend on it): channels-last, also the fast one for cuDNN.
  const Tensor map = tokens_to_map(updated, height, width).contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor conv1_out = conv_relu(map, precision.lower(conv1_weight));
  const Tensor conv2_out = conv_relu(conv1_out, precision.lower(conv2_weight));
  // Backward needs of the second ReLU's output only where it passed: kept as bools, not values.
  return {map_to_tokens(map + conv2_out), updated, conv1_out, conv2_out.gt(0)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> query_update_block_backward(
    const Tensor& grad_out, const Tensor& query, const Tensor& prototype, const Tensor& update_weight,
    const Tensor& conv1_weight, const Tensor& conv2_weight, int64_t height, int64_t width,
    optional<at::ScalarType> compute_dtype, const Tensor& updated, const Tensor& conv1_out,
    const Tensor& conv2_passed) {
  const Precision precision{compute_dtype};
  const Tensor grad_map = tokens_to_map(cast(grad_out, updated.scalar_type()), height, width);
  const Tensor map = tokens_to_map(updated, height, width).contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor lower_conv1 = precision.lower(conv1_weight), lower_conv2 = precision.lower(conv2_weight);
  auto [grad_conv1_out, grad_conv2_weight] =
      conv_backward(where_else_zero(conv2_passed, grad_map), conv1_out, lower_conv2);
  auto [grad_map_conv, grad_conv1_weight] =
      conv_backward(at::threshold_backward(grad_conv1_out, conv1_out, 0), map, lower_conv1);
  const Tensor grad_updated = map_to_tokens(grad_map + grad_map_conv).contiguous();
  auto [grad_query, grad_prototype, grad_update_weight] = prototype_query_update_backward(
      grad_updated, updated, precision.lower(query), precision.lower(prototype), precision.lower(update_weight));
  // Contiguous weight gradients (a channels-last input gives channels-last ones), as declared.
  return {as_dtype_of(grad_query, query), as_dtype_of(grad_prototype, prototype),
          as_dtype_of(grad_update_weight, update_weight), as_dtype_of(grad_conv1_weight, conv1_weight).contiguous(),
          as_dtype_of(grad_conv2_weight, conv2_weight).contiguous()};
}

}  // namespace ipmt

#define IPMT_REGISTER_BLOCK_OPS(m)                                                                      \
  m.impl("prototype_attention_block", &ipmt::prototype_attention_block);                              \
  m.impl("prototype_attention_block_backward", &ipmt::prototype_attention_block_backward);            \
  m.impl("feed_forward_block", &ipmt::feed_forward_block);                                            \
  m.impl("feed_forward_block_backward", &ipmt::feed_forward_block_backward);                          \
  m.impl("prediction_head", &ipmt::prediction_head);                                                  \
  m.impl("prediction_head_backward", &ipmt::prediction_head_backward);                                \
  m.impl("deformable_self_attention_block", &ipmt::deformable_self_attention_block);                  \
  m.impl("deformable_self_attention_block_backward", &ipmt::deformable_self_attention_block_backward);\
  m.impl("query_update_block", &ipmt::query_update_block);                                            \
  m.impl("query_update_block_backward", &ipmt::query_update_block_backward);

TORCH_LIBRARY_IMPL(ipmt_fast, CPU, m) { IPMT_REGISTER_BLOCK_OPS(m) }
TORCH_LIBRARY_IMPL(ipmt_fast, CUDA, m) { IPMT_REGISTER_BLOCK_OPS(m) }
