// The ipmt_fast operator library: every op's schema, and the CPU kernels of multi-scale deformable
// bilinear sampling (the other ops' kernels are in fused_ops.cpp). The CUDA kernels register themselves from ms_deform_sample_cuda_ops.cpp (built
// only where PyTorch has CUDA); shape-only (fake) implementations, autograd and autocast rules are
// registered from Python (ipmt_fast/ops/), so torch.compile and torch.library.opcheck see them all.
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
  return output.to(value.scalar_type());
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> ms_deform_sample_backward_cpu(
    const torch::Tensor& grad_output, const torch::Tensor& value, c10::IntArrayRef spatial_shapes,
    const torch::Tensor& sampling_locations, const torch::Tensor& attention_weights, bool fused_coordinate) {
  const auto dtype = cpu_compute_dtype(value.scalar_type());
  const auto in = ipmt::prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, dtype);
  const auto& s = in.sizes;
  const auto grad = grad_output.to(dtype).contiguous();
  auto grad_value = torch::zeros_like(in.value);
  auto grad_locations = torch::empty_like(in.sampling_locations);
  auto grad_weights = torch::empty_like(in.attention_weights);
  AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_sample_cpu_backward", [&] {
    ipmt::ms_deform_sample_cpu_backward<scalar_t>(
        s, in.layout, fused_coordinate, in.value.data_ptr<scalar_t>(), in.sampling_locations.data_ptr<scalar_t>(),
        in.attention_weights.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
        grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>());
  });
  return {grad_value.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(ipmt_fast, m) {
  // spatial_shapes: (H_0, W_0, H_1, W_1, ...) of the levels concatenated along value's S.
  // fused_coordinate: whether grid_sample rounds its source coordinate as one fused multiply-add
  // on this device (see source_coordinate in ms_deform_sample.h).
  m.def("ms_deform_sample(Tensor value, int[] spatial_shapes, Tensor sampling_locations, "
        "Tensor attention_weights, bool fused_coordinate) -> Tensor");
  m.def("ms_deform_sample_backward(Tensor grad_output, Tensor value, int[] spatial_shapes, "
        "Tensor sampling_locations, Tensor attention_weights, bool fused_coordinate) -> (Tensor, Tensor, Tensor)");
  // Whole-op forwards and backwards (fused_ops.cpp). A forward returns its result, then what its
  // backward reads.
  m.def("masked_prototype_attention(Tensor prototype, Tensor tokens, Tensor token_mask, Tensor q_weight, "
        "Tensor k_weight, Tensor v_weight, Tensor proj_weight, Tensor? attn_keep, float scale, float masked_bias) "
        "-> (Tensor out, Tensor query, Tensor query_key, Tensor attention, Tensor pooled, Tensor value)");
  m.def("masked_prototype_attention_backward(Tensor grad_out, Tensor prototype, Tensor tokens, Tensor q_weight, "
        "Tensor k_weight, Tensor v_weight, Tensor proj_weight, Tensor? attn_keep, float scale, Tensor query, "
        "Tensor query_key, Tensor attention, Tensor pooled, Tensor value) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("prototype_mask_logits(Tensor embedding, Tensor tokens, float threshold) -> (Tensor logits, Tensor next_mask)");
  m.def("prototype_mask_logits_backward(Tensor grad_logits, Tensor embedding, Tensor tokens) -> (Tensor, Tensor)");
  m.def("prototype_query_update(Tensor query, Tensor prototype, Tensor weight) -> Tensor");
  m.def("prototype_query_update_backward(Tensor grad_out, Tensor output, Tensor query, Tensor prototype, "
        "Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.def("feed_forward(Tensor x, Tensor hidden_weight, Tensor output_weight, Tensor? hidden_keep, float keep_scale, "
        "bool recompute_hidden) -> (Tensor out, Tensor hidden)");
  m.def("feed_forward_backward(Tensor grad_out, Tensor x, Tensor hidden_weight, Tensor output_weight, "
        "Tensor? hidden_keep, float keep_scale, Tensor hidden) -> (Tensor, Tensor, Tensor)");
  m.def("deformable_self_attention(Tensor query, Tensor values, Tensor padding_mask, Tensor reference_points, "
        "Tensor offset_normalizer, int height, int width, "
        "Tensor value_weight, Tensor value_bias, Tensor offset_weight, Tensor offset_bias, Tensor attention_weight, "
        "Tensor attention_bias, Tensor output_weight, Tensor output_bias, int heads, int points, "
        "bool fused_coordinate) -> (Tensor out, Tensor value, Tensor locations, Tensor weights, Tensor sampled)");
  m.def("deformable_self_attention_backward(Tensor grad_out, Tensor query, Tensor values, Tensor padding_mask, "
        "Tensor offset_normalizer, int height, int width, Tensor value_weight, Tensor offset_weight, Tensor attention_weight, "
        "Tensor output_weight, int heads, int points, bool fused_coordinate, Tensor value, Tensor locations, "
        "Tensor weights, Tensor sampled) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
}

TORCH_LIBRARY_IMPL(ipmt_fast, CPU, m) {
  m.impl("ms_deform_sample", &ms_deform_sample_cpu);
  m.impl("ms_deform_sample_backward", &ms_deform_sample_backward_cpu);
}
