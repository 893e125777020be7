// The ipmt_fast operator library: every op's schema, and the CPU kernels of multi-scale deformable
// bilinear sampling (the other ops' kernels are in fused_ops.cpp and blocks.cpp). The CUDA kernels
// register themselves from ms_deform_sample_cuda_ops.cpp (built only where PyTorch has CUDA);
// autograd and autocast are registered in C++ (autograd.cpp), the shape-only (fake)
// implementations from Python (ipmt_fast/ops/), so torch.compile and torch.library.opcheck see them.
#include <torch/extension.h>

#include <tuple>

#include "ms_deform_sample_binding.h"

namespace {

// The CPU kernels compute in float or double; half precision inputs are upcast to float.
torch::ScalarType cpu_compute_dtype(torch::ScalarType dtype) {
  return dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
}

torch::Tensor ms_deform_sample_cpu(const torch::Tensor& value, c10::IntArrayRef spatial_shapes,
                                   const torch::Tensor& sampling_locations, const torch::Tensor& attention_weights,
                                   bool fused_coordinate) {
  const auto dtype = cpu_compute_dtype(value.scalar_type());
  const auto in = ipmt::prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, dtype);
  const auto& s = in.sizes;
  auto output = torch::empty({s.batch, s.queries, s.heads * s.channels}, in.value.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_sample_cpu_forward", [&] {
    ipmt::ms_deform_sample_cpu_forward<scalar_t>(s, in.layout, fused_coordinate, in.value.data_ptr<scalar_t>(),
                                                 in.sampling_locations.data_ptr<scalar_t>(),
                                                 in.attention_weights.data_ptr<scalar_t>(),
                                                 output.data_ptr<scalar_t>());
  });
  return ipmt::cast(output, value.scalar_type());
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> ms_deform_sample_backward_cpu(
    const torch::Tensor& grad_output, const torch::Tensor& value, c10::IntArrayRef spatial_shapes,
    const torch::Tensor& sampling_locations, const torch::Tensor& attention_weights, bool fused_coordinate) {
  const auto dtype = cpu_compute_dtype(value.scalar_type());
  const auto in = ipmt::prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, dtype);
  const auto& s = in.sizes;
  const auto grad = ipmt::cast(grad_output, dtype).contiguous();
  auto grad_value = torch::zeros_like(in.value);
  auto grad_locations = torch::empty_like(in.sampling_locations);
  auto grad_weights = torch::empty_like(in.attention_weights);
  AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_sample_cpu_backward", [&] {
    ipmt::ms_deform_sample_cpu_backward<scalar_t>(
        s, in.layout, fused_coordinate, in.value.data_ptr<scalar_t>(), in.sampling_locations.data_ptr<scalar_t>(),
        in.attention_weights.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
        grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>());
  });
  return {ipmt::cast(grad_value, value.scalar_type()), ipmt::cast(grad_locations, sampling_locations.scalar_type()),
          ipmt::cast(grad_weights, attention_weights.scalar_type())};
}

}  // namespace

// Every op's schema. A forward returns its result first, then what its backward reads; a backward
// op `<name>_backward` takes the result's gradient first, then forward arguments and outputs by
// their names, and returns `grad_<argument>` for each differentiable argument: autograd.cpp derives
// the autograd formula from these names. Ops that draw dropout masks carry the
// nondeterministic_seeded tag (no compiler may merge or reorder them as pure functions).
TORCH_LIBRARY(ipmt_fast, m) {
  // spatial_shapes: (H_0, W_0, H_1, W_1, ...) of the levels concatenated along value's S.
  // fused_coordinate: whether grid_sample rounds its source coordinate as one fused multiply-add
  // on this device (see source_coordinate in ms_deform_sample.h).
  m.def("ms_deform_sample(Tensor value, int[] spatial_shapes, Tensor sampling_locations, "
        "Tensor attention_weights, bool fused_coordinate) -> Tensor out");
  m.def("ms_deform_sample_backward(Tensor grad_out, Tensor value, int[] spatial_shapes, "
        "Tensor sampling_locations, Tensor attention_weights, bool fused_coordinate) "
        "-> (Tensor grad_value, Tensor grad_sampling_locations, Tensor grad_attention_weights)");
  // Whole-op forwards and backwards (fused_ops.cpp).
  m.def("masked_prototype_attention(Tensor prototype, Tensor tokens, Tensor token_mask, Tensor q_weight, "
        "Tensor k_weight, Tensor v_weight, Tensor proj_weight, Tensor? attn_keep, float scale, float masked_bias) "
        "-> (Tensor out, Tensor query, Tensor query_key, Tensor attention, Tensor pooled, Tensor value)");
  m.def("masked_prototype_attention_backward(Tensor grad_out, Tensor prototype, Tensor tokens, Tensor q_weight, "
        "Tensor k_weight, Tensor v_weight, Tensor proj_weight, Tensor? attn_keep, float scale, Tensor query, "
        "Tensor query_key, Tensor attention, Tensor pooled, Tensor value) "
        "-> (Tensor grad_prototype, Tensor grad_tokens, Tensor grad_q_weight, Tensor grad_k_weight, "
        "Tensor grad_v_weight, Tensor grad_proj_weight)");
  m.def("prototype_mask_logits(Tensor embedding, Tensor tokens, float threshold) -> (Tensor logits, Tensor next_mask)");
  m.def("prototype_mask_logits_backward(Tensor grad_logits, Tensor embedding, Tensor tokens) "
        "-> (Tensor grad_embedding, Tensor grad_tokens)");
  m.def("prototype_query_update(Tensor query, Tensor prototype, Tensor weight) -> Tensor out");
  m.def("prototype_query_update_backward(Tensor grad_out, Tensor out, Tensor query, Tensor prototype, "
        "Tensor weight) -> (Tensor grad_query, Tensor grad_prototype, Tensor grad_weight)");
  m.def("feed_forward(Tensor x, Tensor hidden_weight, Tensor output_weight, Tensor? hidden_keep, float keep_scale, "
        "bool recompute_hidden) -> (Tensor out, Tensor hidden)");
  m.def("feed_forward_backward(Tensor grad_out, Tensor x, Tensor hidden_weight, Tensor output_weight, "
        "Tensor? hidden_keep, float keep_scale, Tensor hidden) "
        "-> (Tensor grad_x, Tensor grad_hidden_weight, Tensor grad_output_weight)");
  m.def("deformable_self_attention(Tensor query, Tensor values, Tensor padding_mask, Tensor reference_points, "
        "Tensor offset_normalizer, int height, int width, "
        "Tensor value_weight, Tensor value_bias, Tensor offset_weight, Tensor offset_bias, Tensor attention_weight, "
        "Tensor attention_bias, Tensor output_weight, Tensor output_bias, int heads, int points, "
        "bool fused_coordinate) -> (Tensor out, Tensor value, Tensor locations, Tensor weights, Tensor sampled)");
  m.def("deformable_self_attention_backward(Tensor grad_out, Tensor query, Tensor values, Tensor padding_mask, "
        "Tensor offset_normalizer, int height, int width, Tensor value_weight, Tensor offset_weight, "
        "Tensor attention_weight, Tensor output_weight, int heads, int points, bool fused_coordinate, "
        "Tensor value, Tensor locations, Tensor weights, Tensor sampled) "
        "-> (Tensor grad_query, Tensor grad_values, Tensor grad_value_weight, Tensor grad_value_bias, "
        "Tensor grad_offset_weight, Tensor grad_offset_bias, Tensor grad_attention_weight, "
        "Tensor grad_attention_bias, Tensor grad_output_weight, Tensor grad_output_bias)");
  // Sub-layer ops (blocks.cpp): a fused op with its dropouts, residual and layer norm.
  // compute_dtype: the dtype of the matrix products, set by the autocast rule.
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  m.def("prototype_attention_block(Tensor prototype, Tensor tokens, Tensor token_mask, Tensor q_weight, "
        "Tensor k_weight, Tensor v_weight, Tensor proj_weight, Tensor? norm_weight, Tensor? norm_bias, "
        "float norm_eps, float scale, float masked_bias, float dropout_p, bool train, "
        "ScalarType? compute_dtype=None) -> (Tensor out, Tensor attn_keep, Tensor proj_keep, Tensor query, "
        "Tensor query_key, Tensor attention, Tensor pooled, Tensor value, Tensor norm_source, Tensor norm_mean, "
        "Tensor norm_rstd)", seeded);
  m.def("prototype_attention_block_backward(Tensor grad_out, Tensor prototype, Tensor tokens, Tensor q_weight, "
        "Tensor k_weight, Tensor v_weight, Tensor proj_weight, Tensor? norm_weight, Tensor? norm_bias, float scale, "
        "float dropout_p, ScalarType? compute_dtype, Tensor attn_keep, Tensor proj_keep, Tensor query, "
        "Tensor query_key, Tensor attention, Tensor pooled, Tensor value, Tensor norm_source, Tensor norm_mean, "
        "Tensor norm_rstd) -> (Tensor grad_prototype, Tensor grad_tokens, Tensor grad_q_weight, "
        "Tensor grad_k_weight, Tensor grad_v_weight, Tensor grad_proj_weight, Tensor grad_norm_weight, "
        "Tensor grad_norm_bias)");
  m.def("feed_forward_block(Tensor x, Tensor hidden_weight, Tensor output_weight, Tensor? norm_weight, "
        "Tensor? norm_bias, float norm_eps, float dropout_p, bool train, bool recompute_hidden, "
        "ScalarType? compute_dtype=None) -> (Tensor out, Tensor hidden_keep, Tensor out_keep, Tensor hidden, "
        "Tensor norm_source, Tensor norm_mean, Tensor norm_rstd)", seeded);
  m.def("feed_forward_block_backward(Tensor grad_out, Tensor x, Tensor hidden_weight, Tensor output_weight, "
        "Tensor? norm_weight, Tensor? norm_bias, float dropout_p, ScalarType? compute_dtype, Tensor hidden_keep, "
        "Tensor out_keep, Tensor hidden, Tensor norm_source, Tensor norm_mean, Tensor norm_rstd) "
        "-> (Tensor grad_x, Tensor grad_hidden_weight, Tensor grad_output_weight, Tensor grad_norm_weight, "
        "Tensor grad_norm_bias)");
  m.def("prediction_head(Tensor prototype, Tensor tokens, Tensor? second_tokens, Tensor norm_weight, "
        "Tensor norm_bias, float norm_eps, Tensor hidden_weight, Tensor output_weight, float dropout_p, bool train, "
        "ScalarType? compute_dtype=None) "
        "-> (Tensor logits, Tensor next_mask, Tensor hidden_keep, Tensor out_keep, Tensor hidden, "
        "Tensor embedding, Tensor normed, Tensor norm_mean, Tensor norm_rstd)", seeded);
  m.def("prediction_head_backward(Tensor grad_logits, Tensor prototype, Tensor tokens, Tensor? second_tokens, "
        "Tensor norm_weight, Tensor norm_bias, Tensor hidden_weight, Tensor output_weight, float dropout_p, "
        "ScalarType? compute_dtype, Tensor hidden_keep, Tensor out_keep, Tensor hidden, Tensor embedding, "
        "Tensor normed, Tensor norm_mean, Tensor norm_rstd) -> (Tensor grad_prototype, Tensor grad_tokens, "
        "Tensor grad_second_tokens, Tensor grad_norm_weight, Tensor grad_norm_bias, Tensor grad_hidden_weight, "
        "Tensor grad_output_weight)");
  m.def("deformable_self_attention_block(Tensor tokens, Tensor pos, Tensor padding_mask, Tensor reference_points, "
        "Tensor offset_normalizer, int height, int width, Tensor value_weight, Tensor value_bias, "
        "Tensor offset_weight, Tensor offset_bias, Tensor attention_weight, Tensor attention_bias, "
        "Tensor output_weight, Tensor output_bias, int heads, int points, bool fused_coordinate, "
        "Tensor norm_weight, Tensor norm_bias, float norm_eps, float dropout_p, bool train, "
        "ScalarType? compute_dtype=None) -> (Tensor out, Tensor value, Tensor locations, "
        "Tensor weights, Tensor sampled, Tensor keep, Tensor norm_source, Tensor norm_mean, Tensor norm_rstd)",
        seeded);
  m.def("deformable_self_attention_block_backward(Tensor grad_out, Tensor tokens, Tensor pos, "
        "Tensor padding_mask, Tensor offset_normalizer, int height, int width, Tensor value_weight, "
        "Tensor value_bias, Tensor offset_weight, Tensor offset_bias, Tensor attention_weight, "
        "Tensor attention_bias, Tensor output_weight, Tensor output_bias, int heads, int points, "
        "bool fused_coordinate, Tensor norm_weight, Tensor norm_bias, float dropout_p, "
        "ScalarType? compute_dtype, Tensor value, Tensor locations, Tensor weights, Tensor sampled, "
        "Tensor keep, Tensor norm_source, Tensor norm_mean, Tensor norm_rstd) -> (Tensor grad_tokens, "
        "Tensor grad_pos, Tensor grad_value_weight, Tensor grad_value_bias, Tensor grad_offset_weight, "
        "Tensor grad_offset_bias, Tensor grad_attention_weight, Tensor grad_attention_bias, "
        "Tensor grad_output_weight, Tensor grad_output_bias, Tensor grad_norm_weight, Tensor grad_norm_bias)");
  m.def("query_update_block(Tensor query, Tensor prototype, Tensor update_weight, Tensor conv1_weight, "
        "Tensor conv2_weight, int height, int width, ScalarType? compute_dtype=None) "
        "-> (Tensor out, Tensor updated, Tensor conv1_out, Tensor conv2_passed)");
  m.def("query_update_block_backward(Tensor grad_out, Tensor query, Tensor prototype, Tensor update_weight, "
        "Tensor conv1_weight, Tensor conv2_weight, int height, int width, ScalarType? compute_dtype, "
        "Tensor updated, Tensor conv1_out, Tensor conv2_passed) -> (Tensor grad_query, Tensor grad_prototype, "
        "Tensor grad_update_weight, Tensor grad_conv1_weight, Tensor grad_conv2_weight)");
}

TORCH_LIBRARY_IMPL(ipmt_fast, CPU, m) {
  m.impl("ms_deform_sample", &ms_deform_sample_cpu);
  m.impl("ms_deform_sample_backward", &ms_deform_sample_backward_cpu);
}
