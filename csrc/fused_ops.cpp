// Whole-op forward and backward of IPMT's transformer ops as single dispatcher calls: the fused
// algebra of each op's torch form (ipmt_fast/ops/<op>.py), written against ATen so one op call
// from Python replaces the dozens an autograd-recorded composition dispatches (the host issuing
// ops, not the kernels, bounds IPMT's step at its batch sizes). Device-generic: the same code is
// registered for CPU and CUDA tensors. Each forward returns the tensors its backward needs after
// the result; autograd.cpp saves them and calls the backward op, all in C++.
#include "fused_ops.h"

#include "cpu_loops.h"

namespace ipmt {

// ---------------------------------------------------------------------------------------------
// masked_prototype_attention: out = (sum_n softmax_n(scale * q'.T_n + bias_n) keep_n T_n) Wv^T Wo^T
// with q' = (P Wq^T) Wk (ipmt_fast/ops/prototype_attention.py, torch form).
// ---------------------------------------------------------------------------------------------

// Returns (out, query, query_key, attention, pooled, value).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> masked_prototype_attention(
    const Tensor& prototype, const Tensor& tokens, const Tensor& token_mask, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& v_weight, const Tensor& proj_weight,
    const c10::optional<Tensor>& attn_keep, double scale, double masked_bias) {
  const int64_t b = prototype.size(0), m = prototype.size(1), c = prototype.size(2);
  const Tensor query = at::mm(as_rows(prototype), swap_last_two(q_weight));
  const Tensor query_key = at::mm(query, k_weight).view({b, m, c});
  // Tokens-major (B, N, M) logits, as the torch form.
  Tensor logits = at::bmm(tokens, swap_last_two(query_key));
  // A masked token's logit gets the published bias added; here it is set to the bias instead:
  // either way its softmax weight underflows to exactly 0 next to any unmasked logit (e^-10000),
  // so the results agree, with one op instead of three. A row with no allowed token has a uniform
  // bias, i.e. a plain softmax: it gets none (see the torch form).
  if (cpu_loops_apply({logits, token_mask})) {
    scale_and_mask_logits_(logits, token_mask, scale, masked_bias);
  } else {
    mul_scalar_(logits, scale);
    // Masked in an image with a token allowed: any(mask) > mask, over bools.
    logits.masked_fill_(at::gt(token_mask.any(1, true), token_mask).unsqueeze(2), masked_bias);
  }
  const Tensor attention = at::_softmax(logits, 1, false);
  const Tensor kept = attn_keep.has_value() ? at::mul(attention, swap_last_two(*attn_keep)) : attention;
  const Tensor pooled = at::bmm(swap_last_two(kept), tokens);
  const Tensor value = at::mm(pooled.view({b * m, c}), swap_last_two(v_weight));
  Tensor out = at::mm(value, swap_last_two(proj_weight)).view({b, m, c});
  return {out, query.view({b, m, c}), query_key, attention, pooled, value.view({b, m, c})};
}

// Returns the gradients of (prototype, tokens, q_weight, k_weight, v_weight, proj_weight).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> masked_prototype_attention_backward(
    const Tensor& grad_out, const Tensor& prototype, const Tensor& tokens, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& v_weight, const Tensor& proj_weight,
    const c10::optional<Tensor>& attn_keep, double scale, const Tensor& query, const Tensor& query_key,
    const Tensor& attention, const Tensor& pooled, const Tensor& value) {
  const int64_t b = prototype.size(0), m = prototype.size(1), c = prototype.size(2);
  const Tensor grad_rows = as_rows(grad_out);
  const Tensor grad_value = at::mm(grad_rows, proj_weight);
  const Tensor grad_proj = at::mm(swap_last_two(grad_rows), value.view({b * m, c}));
  const Tensor grad_pooled = at::mm(grad_value, v_weight).view({b, m, c});
  const Tensor grad_v = at::mm(swap_last_two(grad_value), pooled.view({b * m, c}));
  const Tensor keep_t = attn_keep.has_value() ? swap_last_two(*attn_keep) : Tensor();
  const Tensor kept = attn_keep.has_value() ? at::mul(attention, keep_t) : attention;
  // pooled = kept^T T
  Tensor grad_logits = at::bmm(tokens, swap_last_two(grad_pooled));  // that of the attention, here
  // The logits' gradient times the scale: that of T q'^T.
  if (cpu_loops_apply({grad_logits, attention, attn_keep.value_or(Tensor())})) {
    attention_softmax_backward_(grad_logits, attention, attn_keep.value_or(Tensor()), scale);
  } else {
    if (attn_keep.has_value()) grad_logits.mul_(keep_t);
    grad_logits = at::_softmax_backward_data(grad_logits, attention, 1, attention.scalar_type());
    mul_scalar_(grad_logits, scale);
  }
  // dT = kept dpooled + dlogits q': a product, then one added to it.
  const Tensor grad_tokens = at::baddbmm(at::bmm(kept, grad_pooled), grad_logits, query_key);
  const Tensor grad_query_key = at::bmm(swap_last_two(grad_logits), tokens).view({b * m, c});
  const Tensor grad_query = at::mm(grad_query_key, swap_last_two(k_weight));
  const Tensor grad_k = at::mm(swap_last_two(query.view({b * m, c})), grad_query_key);
  const Tensor grad_prototype = at::mm(grad_query, q_weight).view({b, m, c});
  const Tensor grad_q = at::mm(swap_last_two(grad_query), as_rows(prototype));
  return {grad_prototype, grad_tokens, grad_q, grad_k, grad_v, grad_proj};
}

// ---------------------------------------------------------------------------------------------
// prototype_mask_logits: logits = E T^T and the mask logits >= threshold (query_activation.py).
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> prototype_mask_logits(const Tensor& embedding, const Tensor& tokens, double threshold) {
  Tensor logits = at::bmm(embedding, swap_last_two(tokens));
  Tensor next_mask = ge_scalar(logits, threshold);
  return {logits, next_mask};
}

std::tuple<Tensor, Tensor> prototype_mask_logits_backward(const Tensor& grad_logits, const Tensor& embedding,
                                                          const Tensor& tokens) {
  return {at::bmm(grad_logits, tokens), at::bmm(swap_last_two(grad_logits), embedding)};
}

// ---------------------------------------------------------------------------------------------
// prototype_query_update: ReLU(Q Wq^T + P Wp^T) with the 1x1 conv weight split as [Wq | Wp].
// ---------------------------------------------------------------------------------------------

namespace {

// (Wq, Wp) as (C, C) views of the (C, 2C, 1, 1) weight, in `dtype`.
std::tuple<Tensor, Tensor> split_update_weight(const Tensor& weight, at::ScalarType dtype) {
  const int64_t channels = weight.size(0);
  const Tensor matrix = cast(weight.reshape({channels, 2 * channels}), dtype);
  return {matrix.narrow(1, 0, channels), matrix.narrow(1, channels, channels)};
}

}  // namespace

Tensor prototype_query_update(const Tensor& query, const Tensor& prototype, const Tensor& weight) {
  const auto [query_weight, prototype_weight] = split_update_weight(weight, query.scalar_type());
  const int64_t b = query.size(0), c = query.size(2);
  // (B, 1, C): the prototype half, broadcast over the tokens by baddbmm.
  const Tensor bias = at::mm(as_rows(prototype), swap_last_two(prototype_weight)).view({b, 1, c});
  return at::baddbmm(bias, query, swap_last_two(query_weight).expand({b, c, c})).relu_();
}

// Returns the gradients of (query, prototype, weight) from the update's output.
std::tuple<Tensor, Tensor, Tensor> prototype_query_update_backward(const Tensor& grad_out, const Tensor& output,
                                                                   const Tensor& query, const Tensor& prototype,
                                                                   const Tensor& weight) {
  const auto [query_weight, prototype_weight] = split_update_weight(weight, query.scalar_type());
  const int64_t b = query.size(0), c = query.size(2);
  const Tensor grad_pre = at::threshold_backward(grad_out, output, 0);
  const Tensor grad_bias = grad_pre.sum(1);  // (B, C)
  const Tensor grad_pre_rows = as_rows(grad_pre);
  const Tensor grad_query = at::mm(grad_pre_rows, query_weight).view(query.sizes());
  const Tensor grad_prototype = at::mm(grad_bias, prototype_weight).view({b, 1, c});
  const Tensor grad_weight = at::cat({at::mm(swap_last_two(grad_pre_rows), as_rows(query)),
                                      at::mm(swap_last_two(grad_bias), as_rows(prototype))}, 1);
  return {grad_query, grad_prototype, cast(grad_weight, weight.scalar_type()).view(weight.sizes())};
}

// ---------------------------------------------------------------------------------------------
// feed_forward: Lin2(keep * scale * ReLU(Lin1(x))), keeping h (or only the keep mask) (ffn.py).
// ---------------------------------------------------------------------------------------------

namespace {

// keep * scale * ReLU(x W1^T) as rows (B*N, H).
Tensor hidden_activation(const Tensor& x, const Tensor& hidden_weight, const c10::optional<Tensor>& hidden_keep,
                         double keep_scale) {
  Tensor hidden = at::mm(as_rows(x), swap_last_two(hidden_weight));
  const Tensor keep = hidden_keep.value_or(Tensor());
  if (cpu_loops_apply({hidden, keep})) {
    relu_dropout_(hidden, keep, keep_scale);
    return hidden;
  }
  hidden.relu_();
  if (keep.defined()) {
    hidden.mul_(as_rows(keep));  // x * keep * scale, as dropout: a dropped NaN stays NaN
    mul_scalar_(hidden, keep_scale);
  }
  return hidden;
}

at::DimVector with_last(at::IntArrayRef sizes, int64_t last) {
  at::DimVector shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

}  // namespace

// Returns (out, hidden); hidden is empty when it is to be recomputed in backward.
std::tuple<Tensor, Tensor> feed_forward(const Tensor& x, const Tensor& hidden_weight, const Tensor& output_weight,
                                        const c10::optional<Tensor>& hidden_keep, double keep_scale,
                                        bool recompute_hidden) {
  const Tensor hidden = hidden_activation(x, hidden_weight, hidden_keep, keep_scale);
  Tensor out = at::mm(hidden, swap_last_two(output_weight)).view(with_last(x.sizes(), output_weight.size(0)));
  return {out, recompute_hidden ? hidden.new_empty({0}) : hidden.view(with_last(x.sizes(), hidden.size(1)))};
}

// Returns the gradients of (x, hidden_weight, output_weight).
std::tuple<Tensor, Tensor, Tensor> feed_forward_backward(const Tensor& grad_out, const Tensor& x,
                                                         const Tensor& hidden_weight, const Tensor& output_weight,
                                                         const c10::optional<Tensor>& hidden_keep, double keep_scale,
                                                         const Tensor& saved_hidden) {
  const Tensor hidden_rows = saved_hidden.numel() > 0 ? as_rows(saved_hidden)
                                                      : hidden_activation(x, hidden_weight, hidden_keep, keep_scale);
  const Tensor grad_rows = as_rows(grad_out);
  const Tensor grad_output_weight = at::mm(swap_last_two(grad_rows), hidden_rows);
  // Through the dropout (x scale on kept units) and the ReLU: h > 0 exactly where both pass.
  Tensor grad_pre = at::mm(grad_rows, output_weight);
  if (cpu_loops_apply({grad_pre, hidden_rows})) {
    relu_dropout_backward_(grad_pre, hidden_rows, keep_scale);
  } else {
    if (keep_scale != 1.0) mul_scalar_(grad_pre, keep_scale);
    grad_pre = at::threshold_backward(grad_pre, hidden_rows, 0);
  }
  const Tensor grad_hidden_weight = at::mm(swap_last_two(grad_pre), as_rows(x));
  const Tensor grad_x = at::mm(grad_pre, hidden_weight).view(x.sizes());
  return {grad_x, grad_hidden_weight, grad_output_weight};
}

// ---------------------------------------------------------------------------------------------
// deformable_self_attention: IPMT's query self-attention layer over one h x w map
// (ipmt_fast/ops/deform_attention.py): projections, offsets, softmax, locations, sampling.
// ---------------------------------------------------------------------------------------------

namespace {

// The sampling ops of this library, called through the dispatcher (CPU or CUDA kernels).
Tensor ms_deform_sample(const Tensor& value, c10::IntArrayRef shapes, const Tensor& locations, const Tensor& weights,
                        bool fused_coordinate) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ipmt_fast::ms_deform_sample", "")
                             .typed<Tensor(const Tensor&, c10::IntArrayRef, const Tensor&, const Tensor&, bool)>();
  return op.call(value, shapes, locations, weights, fused_coordinate);
}

std::tuple<Tensor, Tensor, Tensor> ms_deform_sample_backward(const Tensor& grad, const Tensor& value,
                                                             c10::IntArrayRef shapes, const Tensor& locations,
                                                             const Tensor& weights, bool fused_coordinate) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ipmt_fast::ms_deform_sample_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, c10::IntArrayRef, const Tensor&,
                                                    const Tensor&, bool)>();
  return op.call(grad, value, shapes, locations, weights, fused_coordinate);
}

// x W^T + bias over the rows of x, as at::linear computes it (addmm).
Tensor linear_rows(const Tensor& x_rows, const Tensor& weight, const Tensor& bias) {
  return at::addmm(bias, x_rows, swap_last_two(weight));
}

}  // namespace

// Returns (out, value, locations, weights, sampled): value (B, N, heads, D) and sampled (B, N, C)
// in the query's dtype, locations (B, N, heads, 1, P, 2) and weights (B, N, heads, 1, P) in the
// dtype of the reference points (at least float32). Under autocast the sampling runs on the value
// widened to the coordinates' dtype and the output projection reads the sampled features narrowed
// back: kept for backward as the narrow forms (the widening is exact, and the narrowed samples are
// what the output weight's gradient reads), each takes half the bytes of the wide one.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> deformable_self_attention(
    const Tensor& query, const Tensor& values, const Tensor& padding_mask, const Tensor& reference_points,
    const Tensor& offset_normalizer, int64_t height, int64_t width, const Tensor& value_weight,
    const Tensor& value_bias, const Tensor& offset_weight, const Tensor& offset_bias, const Tensor& attention_weight,
    const Tensor& attention_bias, const Tensor& output_weight, const Tensor& output_bias, int64_t heads,
    int64_t points, bool fused_coordinate) {
  const int64_t b = query.size(0), n = query.size(1);
  const auto coordinate = reference_points.scalar_type();
  const Tensor query_rows = as_rows(query);
  Tensor projected = linear_rows(as_rows(values), value_weight, value_bias);
  projected.masked_fill_(padding_mask.view({b * n, 1}), 0);
  const Tensor value = projected.view({b, n, heads, -1});
  const Tensor offsets = cast(linear_rows(query_rows, offset_weight, offset_bias), coordinate)
                             .view({b, n, heads, 1, points, 2});
  const Tensor logits = cast(linear_rows(query_rows, attention_weight, attention_bias), coordinate)
                            .view({b, n, heads, points});
  const Tensor weights = at::_softmax(logits, -1, false).view({b, n, heads, 1, points});
  // The Python layer's reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :],
  // with its two roundings (the sampling's kinks at pixel centres depend on the last bit).
  const Tensor locations =
      cpu_loops_apply({reference_points, offsets, offset_normalizer})
          ? sampling_locations(reference_points, offsets, offset_normalizer)
          : reference_points.view({1, n, 1, 1, 1, 2}) + offsets / offset_normalizer.view({1, 1, 1, 1, 1, 2});
  const Tensor sampled = cast(ms_deform_sample(cast(value, coordinate), {height, width}, locations, weights,
                                               fused_coordinate),
                              query.scalar_type());
  Tensor out = linear_rows(as_rows(sampled), output_weight, output_bias).view({b, n, output_weight.size(0)});
  return {out, value, locations, weights, sampled};
}

// Returns the gradients of (query, values, value weight, value bias, offset weight, offset bias,
// attention weight, attention bias, output weight, output bias).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
deformable_self_attention_backward(const Tensor& grad_out, const Tensor& query, const Tensor& values,
                                   const Tensor& padding_mask, const Tensor& offset_normalizer, int64_t height,
                                   int64_t width, const Tensor& value_weight, const Tensor& offset_weight,
                                   const Tensor& attention_weight, const Tensor& output_weight, int64_t heads,
                                   int64_t points, bool fused_coordinate, const Tensor& value, const Tensor& locations,
                                   const Tensor& weights, const Tensor& sampled) {
  const int64_t b = query.size(0), n = query.size(1), c = query.size(2);
  const auto dtype = query.scalar_type();
  const auto coordinate = locations.scalar_type();
  const Tensor query_rows = as_rows(query);
  // out = sampled W_out^T + b_out
  const Tensor grad_rows = as_rows(grad_out);
  const Tensor grad_output_weight = at::mm(swap_last_two(grad_rows), as_rows(sampled));
  const Tensor grad_output_bias = grad_rows.sum(0);
  const Tensor grad_sampled = cast(at::mm(grad_rows, output_weight), coordinate).view({b, n, -1});
  const auto [grad_value, grad_locations, grad_weights] =
      ms_deform_sample_backward(grad_sampled, cast(value, coordinate), {height, width}, locations, weights,
                                fused_coordinate);
  // weights = softmax over the points of the attention logits
  const Tensor grad_logits = cast(at::_softmax_backward_data(grad_weights.view({b, n, heads, points}),
                                                             weights.view({b, n, heads, points}), -1, coordinate),
                                  dtype)
                                 .view({b * n, heads * points});
  // locations = pixel centres + offsets / (W, H)
  const Tensor grad_offsets =
      cast(cpu_loops_apply({grad_locations, offset_normalizer})
               ? divide_pairs(grad_locations, offset_normalizer)
               : grad_locations / offset_normalizer.view({1, 1, 1, 1, 1, 2}),
           dtype)
          .view({b * n, heads * points * 2});
  Tensor grad_query_rows = at::mm(grad_offsets, offset_weight);
  grad_query_rows.addmm_(grad_logits, attention_weight);
  // value = (values W_v^T + b_v) zeroed at the padded tokens
  // In place: grad_value is this function's own temporary.
  Tensor grad_value_rows = cast(grad_value, dtype).reshape({b * n, c});
  grad_value_rows.masked_fill_(padding_mask.view({b * n, 1}), 0);
  return {grad_query_rows.view({b, n, c}),
          at::mm(grad_value_rows, value_weight).view({b, n, c}),
          at::mm(swap_last_two(grad_value_rows), as_rows(values)),
          grad_value_rows.sum(0),
          at::mm(swap_last_two(grad_offsets), query_rows),
          grad_offsets.sum(0),
          at::mm(swap_last_two(grad_logits), query_rows),
          grad_logits.sum(0),
          grad_output_weight,
          grad_output_bias};
}

}  // namespace ipmt

#define IPMT_REGISTER_FUSED_OPS(m)                                                              \
  m.impl("masked_prototype_attention", &ipmt::masked_prototype_attention);                    \
  m.impl("masked_prototype_attention_backward", &ipmt::masked_prototype_attention_backward);  \
  m.impl("prototype_mask_logits", &ipmt::prototype_mask_logits);                              \
  m.impl("prototype_mask_logits_backward", &ipmt::prototype_mask_logits_backward);            \
  m.impl("prototype_query_update", &ipmt::prototype_query_update);                            \
  m.impl("prototype_query_update_backward", &ipmt::prototype_query_update_backward);          \
  m.impl("feed_forward", &ipmt::feed_forward);                                                \
  m.impl("feed_forward_backward", &ipmt::feed_forward_backward);                              \
  m.impl("deformable_self_attention", &ipmt::deformable_self_attention);                      \
  m.impl("deformable_self_attention_backward", &ipmt::deformable_self_attention_backward);

TORCH_LIBRARY_IMPL(ipmt_fast, CPU, m) { IPMT_REGISTER_FUSED_OPS(m) }
TORCH_LIBRARY_IMPL(ipmt_fast, CUDA, m) { IPMT_REGISTER_FUSED_OPS(m) }
