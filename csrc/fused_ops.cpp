// Whole-op forward and backward of IPMT's transformer ops as single dispatcher calls: the fused
// algebra of each op's torch form (ipmt_fast/ops/<op>.py), written against ATen so one op call
// from Python replaces the dozens an autograd-recorded composition dispatches (the host issuing
// ops, not the kernels, bounds IPMT's step at its batch sizes). Device-generic: the same code is
// registered for CPU and CUDA tensors. Each forward returns the tensors its backward needs after
// the result; the Python side saves them (register_autograd) and declares fake implementations.
#include <torch/extension.h>

#include <tuple>

namespace {

using torch::Tensor;

// (B, R, C) -> (B*R, C) rows, for the weight gradients: sum over every row of a^T b.
Tensor rows_t_mm(const Tensor& a, const Tensor& b) { return a.flatten(0, 1).t().mm(b.flatten(0, 1)); }

// ---------------------------------------------------------------------------------------------
// masked_prototype_attention: out = (sum_n softmax_n(scale * q'.T_n + bias_n) keep_n T_n) Wv^T Wo^T
// with q' = (P Wq^T) Wk (ipmt_fast/ops/prototype_attention.py, torch form).
// ---------------------------------------------------------------------------------------------

// Returns (out, query, query_key, attention, pooled, value).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> masked_prototype_attention(
    const Tensor& prototype, const Tensor& tokens, const Tensor& token_mask, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& v_weight, const Tensor& proj_weight,
    const c10::optional<Tensor>& attn_keep, double scale, double masked_bias) {
  const Tensor query = at::matmul(prototype, q_weight.t());
  const Tensor query_key = at::matmul(query, k_weight);
  Tensor bias = at::logical_not(token_mask).to(query_key.scalar_type()).mul_(masked_bias);
  // A row with no allowed token has a uniform bias: a plain softmax without it (see the torch form).
  bias.sub_(bias.amax(1, true));
  // Tokens-major (B, N, M) logits, as the torch form.
  const Tensor logits = at::bmm(tokens, query_key.transpose(1, 2)).mul_(scale).add_(bias.unsqueeze(2));
  const Tensor attention = at::_softmax(logits, 1, false);
  const Tensor kept = attn_keep.has_value() ? attention * attn_keep->transpose(1, 2) : attention;
  const Tensor pooled = at::bmm(kept.transpose(1, 2), tokens);
  const Tensor value = at::matmul(pooled, v_weight.t());
  return {at::matmul(value, proj_weight.t()), query, query_key, attention, pooled, value};
}

// Returns the gradients of (prototype, tokens, q_weight, k_weight, v_weight, proj_weight).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> masked_prototype_attention_backward(
    const Tensor& grad_out, const Tensor& prototype, const Tensor& tokens, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& v_weight, const Tensor& proj_weight,
    const c10::optional<Tensor>& attn_keep, double scale, const Tensor& query, const Tensor& query_key,
    const Tensor& attention, const Tensor& pooled, const Tensor& value) {
  const Tensor grad_value = at::matmul(grad_out, proj_weight);
  const Tensor grad_proj = rows_t_mm(grad_out, value);
  const Tensor grad_pooled = at::matmul(grad_value, v_weight);
  const Tensor grad_v = rows_t_mm(grad_value, pooled);
  const Tensor keep_t = attn_keep.has_value() ? attn_keep->transpose(1, 2) : Tensor();
  const Tensor kept = attn_keep.has_value() ? attention * keep_t : attention;
  // pooled = kept^T T
  Tensor grad_attention = at::bmm(tokens, grad_pooled.transpose(1, 2));
  if (attn_keep.has_value()) grad_attention.mul_(keep_t);
  const Tensor grad_logits = at::_softmax_backward_data(grad_attention, attention, 1, attention.scalar_type());
  // dT = kept dpooled + scale * dlogits q': one (B, N, 2M) x (B, 2M, C) product.
  const Tensor grad_tokens =
      at::bmm(at::cat({kept, grad_logits * scale}, 2), at::cat({grad_pooled, query_key}, 1));
  const Tensor grad_query_key = at::bmm(grad_logits.transpose(1, 2), tokens).mul_(scale);
  const Tensor grad_query = at::matmul(grad_query_key, k_weight.t());
  const Tensor grad_k = rows_t_mm(query, grad_query_key);
  const Tensor grad_prototype = at::matmul(grad_query, q_weight);
  const Tensor grad_q = rows_t_mm(grad_query, prototype);
  return {grad_prototype, grad_tokens, grad_q, grad_k, grad_v, grad_proj};
}

// ---------------------------------------------------------------------------------------------
// prototype_mask_logits: logits = E T^T and the mask logits >= threshold (query_activation.py).
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> prototype_mask_logits(const Tensor& embedding, const Tensor& tokens, double threshold) {
  Tensor logits = at::bmm(embedding, tokens.transpose(1, 2));
  Tensor next_mask = at::ge(logits, threshold);
  return {logits, next_mask};
}

std::tuple<Tensor, Tensor> prototype_mask_logits_backward(const Tensor& grad_logits, const Tensor& embedding,
                                                          const Tensor& tokens) {
  return {at::bmm(grad_logits, tokens), at::bmm(grad_logits.transpose(1, 2), embedding)};
}

// ---------------------------------------------------------------------------------------------
// prototype_query_update: ReLU(Q Wq^T + P Wp^T) with the 1x1 conv weight split as [Wq | Wp].
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> split_update_weight(const Tensor& weight, at::ScalarType dtype) {
  const int64_t channels = weight.size(0);
  const Tensor matrix = weight.select(3, 0).select(2, 0).to(dtype);
  return {matrix.narrow(1, 0, channels), matrix.narrow(1, channels, channels)};
}

Tensor prototype_query_update(const Tensor& query, const Tensor& prototype, const Tensor& weight) {
  const auto [query_weight, prototype_weight] = split_update_weight(weight, query.scalar_type());
  const Tensor bias = at::linear(prototype, prototype_weight);  // (B, 1, C), broadcast over the tokens
  const int64_t b = query.size(0), c = query.size(2);
  return at::baddbmm(bias, query, query_weight.t().expand({b, c, c})).relu_();
}

// Returns the gradients of (query, prototype, weight) from the update's output.
std::tuple<Tensor, Tensor, Tensor> prototype_query_update_backward(const Tensor& grad_out, const Tensor& output,
                                                                   const Tensor& query, const Tensor& prototype,
                                                                   const Tensor& weight) {
  const auto [query_weight, prototype_weight] = split_update_weight(weight, query.scalar_type());
  const Tensor grad_pre = at::threshold_backward(grad_out, output, 0);
  const Tensor grad_bias = grad_pre.sum(1, true);  // (B, 1, C)
  const Tensor grad_query = at::matmul(grad_pre, query_weight);
  const Tensor grad_prototype = at::matmul(grad_bias, prototype_weight);
  const Tensor grad_weight =
      at::cat({rows_t_mm(grad_pre, query), rows_t_mm(grad_bias, prototype)}, 1).to(weight.scalar_type());
  return {grad_query, grad_prototype, grad_weight.unsqueeze(2).unsqueeze(3)};
}

// ---------------------------------------------------------------------------------------------
// feed_forward: Lin2(keep * scale * ReLU(Lin1(x))), keeping h (or only the keep mask) (ffn.py).
// ---------------------------------------------------------------------------------------------

Tensor hidden_activation(const Tensor& x, const Tensor& hidden_weight, const c10::optional<Tensor>& hidden_keep,
                         double keep_scale) {
  Tensor hidden = at::linear(x, hidden_weight).relu_();
  if (hidden_keep.has_value()) hidden.mul_(*hidden_keep).mul_(keep_scale);
  return hidden;
}

// Returns (out, hidden); hidden is empty when it is to be recomputed in backward.
std::tuple<Tensor, Tensor> feed_forward(const Tensor& x, const Tensor& hidden_weight, const Tensor& output_weight,
                                        const c10::optional<Tensor>& hidden_keep, double keep_scale,
                                        bool recompute_hidden) {
  Tensor hidden = hidden_activation(x, hidden_weight, hidden_keep, keep_scale);
  Tensor out = at::linear(hidden, output_weight);
  return {out, recompute_hidden ? hidden.new_empty({0}) : hidden};
}

// Returns the gradients of (x, hidden_weight, output_weight).
std::tuple<Tensor, Tensor, Tensor> feed_forward_backward(const Tensor& grad_out, const Tensor& x,
                                                         const Tensor& hidden_weight, const Tensor& output_weight,
                                                         const c10::optional<Tensor>& hidden_keep, double keep_scale,
                                                         const Tensor& saved_hidden) {
  const Tensor hidden =
      saved_hidden.numel() > 0 ? saved_hidden : hidden_activation(x, hidden_weight, hidden_keep, keep_scale);
  const Tensor grad_rows = grad_out.reshape({-1, grad_out.size(-1)});
  const Tensor hidden_rows = hidden.reshape({-1, hidden.size(-1)});
  const Tensor grad_output_weight = grad_rows.t().mm(hidden_rows);
  // Through the dropout (x scale on kept units) and the ReLU: h > 0 exactly where both pass.
  Tensor grad_hidden = grad_rows.mm(output_weight);
  if (keep_scale != 1.0) grad_hidden.mul_(keep_scale);
  const Tensor grad_pre = at::threshold_backward(grad_hidden, hidden_rows, 0);
  const Tensor grad_hidden_weight = grad_pre.t().mm(x.reshape({-1, x.size(-1)}));
  const Tensor grad_x = grad_pre.mm(hidden_weight).view(x.sizes());
  return {grad_x, grad_hidden_weight, grad_output_weight};
}

// ---------------------------------------------------------------------------------------------
// deformable_self_attention: IPMT's query self-attention layer over one h x w map
// (ipmt_fast/ops/deform_attention.py): projections, offsets, softmax, locations, sampling.
// ---------------------------------------------------------------------------------------------

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

// Returns (out, value, locations, weights, sampled): value (B, N, heads, D), locations
// (B, N, heads, 1, P, 2), weights (B, N, heads, 1, P) and sampled (B, N, C) in the dtype of the
// reference points (at least float32).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> deformable_self_attention(
    const Tensor& query, const Tensor& values, const Tensor& padding_mask, const Tensor& reference_points,
    const Tensor& offset_normalizer, int64_t height, int64_t width, const Tensor& value_weight,
    const Tensor& value_bias, const Tensor& offset_weight, const Tensor& offset_bias, const Tensor& attention_weight,
    const Tensor& attention_bias, const Tensor& output_weight, const Tensor& output_bias, int64_t heads,
    int64_t points, bool fused_coordinate) {
  const int64_t b = query.size(0), n = query.size(1);
  const auto coordinate = reference_points.scalar_type();
  const Tensor value = at::linear(values, value_weight, value_bias)
                           .masked_fill(padding_mask.unsqueeze(-1), 0.0)
                           .view({b, n, heads, -1})
                           .to(coordinate);
  const Tensor offsets = at::linear(query, offset_weight, offset_bias).to(coordinate).view({b, n, heads, 1, points, 2});
  const Tensor logits = at::linear(query, attention_weight, attention_bias).to(coordinate).view({b, n, heads, points});
  const Tensor weights = at::_softmax(logits, -1, false).view({b, n, heads, 1, points});
  // The Python layer's reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :].
  const Tensor locations = reference_points.view({1, n, 1, 1, 1, 2}) + offsets / offset_normalizer.view({1, 1, 1, 1, 1, 2});
  const Tensor sampled = ms_deform_sample(value, {height, width}, locations, weights, fused_coordinate);
  const Tensor out = at::linear(sampled.to(query.scalar_type()), output_weight, output_bias);
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
  // out = sampled W_out^T + b_out
  const Tensor grad_output_weight = rows_t_mm(grad_out, sampled.to(dtype));
  const Tensor grad_output_bias = grad_out.sum({0, 1});
  const Tensor grad_sampled = at::matmul(grad_out, output_weight).to(coordinate).contiguous();
  const auto [grad_value, grad_locations, grad_weights] =
      ms_deform_sample_backward(grad_sampled, value, {height, width}, locations, weights, fused_coordinate);
  // weights = softmax over the points of the attention logits
  const Tensor grad_logits =
      at::_softmax_backward_data(grad_weights.view({b, n, heads, points}), weights.view({b, n, heads, points}), -1,
                                 coordinate)
          .to(dtype)
          .view({b, n, heads * points});
  // locations = pixel centres + offsets / (W, H)
  const Tensor grad_offsets =
      (grad_locations / offset_normalizer.view({1, 1, 1, 1, 1, 2})).to(dtype).view({b, n, -1});
  const Tensor grad_query = at::matmul(grad_offsets, offset_weight) + at::matmul(grad_logits, attention_weight);
  // value = (values W_v^T + b_v) zeroed at the padded tokens
  const Tensor grad_value_rows = grad_value.to(dtype).view({b, n, c}).masked_fill(padding_mask.unsqueeze(-1), 0.0);
  return {grad_query,
          at::matmul(grad_value_rows, value_weight),
          rows_t_mm(grad_value_rows, values),
          grad_value_rows.sum({0, 1}),
          rows_t_mm(grad_offsets, query),
          grad_offsets.sum({0, 1}),
          rows_t_mm(grad_logits, query),
          grad_logits.sum({0, 1}),
          grad_output_weight,
          grad_output_bias};
}

}  // namespace

#define IPMT_REGISTER_FUSED_OPS(m)                                                              \
  m.impl("masked_prototype_attention", &masked_prototype_attention);                          \
  m.impl("masked_prototype_attention_backward", &masked_prototype_attention_backward);        \
  m.impl("prototype_mask_logits", &prototype_mask_logits);                                    \
  m.impl("prototype_mask_logits_backward", &prototype_mask_logits_backward);                  \
  m.impl("prototype_query_update", &prototype_query_update);                                  \
  m.impl("prototype_query_update_backward", &prototype_query_update_backward);                \
  m.impl("feed_forward", &feed_forward);                                                      \
  m.impl("feed_forward_backward", &feed_forward_backward);                                    \
  m.impl("deformable_self_attention", &deformable_self_attention);                            \
  m.impl("deformable_self_attention_backward", &deformable_self_attention_backward);

TORCH_LIBRARY_IMPL(ipmt_fast, CPU, m) { IPMT_REGISTER_FUSED_OPS(m) }
TORCH_LIBRARY_IMPL(ipmt_fast, CUDA, m) { IPMT_REGISTER_FUSED_OPS(m) }
