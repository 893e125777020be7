// The whole-op ATen composites of fused_ops.cpp (each op's forward returns its result, then what
// its backward reads), for the sub-layer ops of blocks.cpp to call directly, without a dispatcher
// round trip per op.
#pragma once

#include <torch/extension.h>

#include "tensor_utils.h"

#include <tuple>

namespace ipmt {

using torch::Tensor;

// Returns (out, query, query_key, attention, pooled, value).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> masked_prototype_attention(
    const Tensor& prototype, const Tensor& tokens, const Tensor& token_mask, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& v_weight, const Tensor& proj_weight,
    const c10::optional<Tensor>& attn_keep, double scale, double masked_bias);

// Returns the gradients of (prototype, tokens, q_weight, k_weight, v_weight, proj_weight).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> masked_prototype_attention_backward(
    const Tensor& grad_out, const Tensor& prototype, const Tensor& tokens, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& v_weight, const Tensor& proj_weight,
    const c10::optional<Tensor>& attn_keep, double scale, const Tensor& query, const Tensor& query_key,
    const Tensor& attention, const Tensor& pooled, const Tensor& value);

// Returns (logits, next_mask = logits >= threshold).
std::tuple<Tensor, Tensor> prototype_mask_logits(const Tensor& embedding, const Tensor& tokens, double threshold);

// Returns the gradients of (embedding, tokens).
std::tuple<Tensor, Tensor> prototype_mask_logits_backward(const Tensor& grad_logits, const Tensor& embedding,
                                                          const Tensor& tokens);

Tensor prototype_query_update(const Tensor& query, const Tensor& prototype, const Tensor& weight);

// Returns the gradients of (query, prototype, weight) from the update's output.
std::tuple<Tensor, Tensor, Tensor> prototype_query_update_backward(const Tensor& grad_out, const Tensor& output,
                                                                   const Tensor& query, const Tensor& prototype,
                                                                   const Tensor& weight);

// Returns (out, hidden); hidden is empty when it is to be recomputed in backward.
std::tuple<Tensor, Tensor> feed_forward(const Tensor& x, const Tensor& hidden_weight, const Tensor& output_weight,
                                        const c10::optional<Tensor>& hidden_keep, double keep_scale,
                                        bool recompute_hidden);

// Returns the gradients of (x, hidden_weight, output_weight).
std::tuple<Tensor, Tensor, Tensor> feed_forward_backward(const Tensor& grad_out, const Tensor& x,
                                                         const Tensor& hidden_weight, const Tensor& output_weight,
                                                         const c10::optional<Tensor>& hidden_keep, double keep_scale,
                                                         const Tensor& saved_hidden);

// Returns (out, value, locations, weights, sampled).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> deformable_self_attention(
    const Tensor& query, const Tensor& values, const Tensor& padding_mask, const Tensor& reference_points,
    const Tensor& offset_normalizer, int64_t height, int64_t width, const Tensor& value_weight,
    const Tensor& value_bias, const Tensor& offset_weight, const Tensor& offset_bias, const Tensor& attention_weight,
    const Tensor& attention_bias, const Tensor& output_weight, const Tensor& output_bias, int64_t heads,
    int64_t points, bool fused_coordinate);

// Returns the gradients of (query, values, value weight, value bias, offset weight, offset bias,
// attention weight, attention bias, output weight, output bias).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
deformable_self_attention_backward(const Tensor& grad_out, const Tensor& query, const Tensor& values,
                                   const Tensor& padding_mask, const Tensor& offset_normalizer, int64_t height,
                                   int64_t width, const Tensor& value_weight, const Tensor& offset_weight,
                                   const Tensor& attention_weight, const Tensor& output_weight, int64_t heads,
                                   int64_t points, bool fused_coordinate, const Tensor& value, const Tensor& locations,
                                   const Tensor& weights, const Tensor& sampled);

}  // namespace ipmt
