// Argument handling shared by the CPU (ops.cpp) and CUDA (ms_deform_sample_cuda_ops.cpp) kernels of
// ipmt_fast::ms_deform_sample: the level layout from the flattened (H, W) list and contiguous
// inputs in the compute dtype. The public Python function has already checked shapes and devices;
// these checks guard direct calls of the op.
#pragma once

#include <torch/extension.h>

#include "ms_deform_sample.h"
#include "tensor_utils.h"

namespace ipmt {

struct MsDeformSampleInputs {
  torch::Tensor value, sampling_locations, attention_weights;
  MsDeformSampleSizes sizes;
  LevelLayout layout;
};

// spatial_shapes is (H_0, W_0, H_1, W_1, ...); the levels' tokens, in order, make up value's S.
inline LevelLayout level_layout(c10::IntArrayRef spatial_shapes, int64_t levels, int64_t tokens) {
  TORCH_CHECK(static_cast<int64_t>(spatial_shapes.size()) == 2 * levels,
              "ms_deform_sample: spatial_shapes must hold (H, W) for each of the ", levels, " levels, got ",
              spatial_shapes.size(), " integers");
  TORCH_CHECK(levels <= kMaxLevels, "ms_deform_sample: at most ", kMaxLevels, " levels, got ", levels);
  LevelLayout layout{};
  int64_t start = 0;
  for (int64_t l = 0; l < levels; ++l) {
    layout.height[l] = spatial_shapes[2 * l];
    layout.width[l] = spatial_shapes[2 * l + 1];
    TORCH_CHECK(layout.height[l] > 0 && layout.width[l] > 0, "ms_deform_sample: level ", l,
                " must have a positive size, got ", layout.height[l], " x ", layout.width[l]);
    layout.start[l] = start;
    start += layout.height[l] * layout.width[l];
  }
  TORCH_CHECK(start == tokens, "ms_deform_sample: the levels hold ", start, " tokens but value has S = ", tokens);
  return layout;
}

// Contiguous inputs in `dtype`.
inline MsDeformSampleInputs prepare_inputs(const torch::Tensor& value, c10::IntArrayRef spatial_shapes,
                                           const torch::Tensor& sampling_locations,
                                           const torch::Tensor& attention_weights, torch::ScalarType dtype) {
  TORCH_CHECK(value.dim() == 4 && sampling_locations.dim() == 6 && attention_weights.dim() == 5,
              "ms_deform_sample: expected value (B, S, heads, D), sampling_locations (B, Nq, heads, L, P, 2) and "
              "attention_weights (B, Nq, heads, L, P)");
  MsDeformSampleInputs in{cast(value, dtype).contiguous(), cast(sampling_locations, dtype).contiguous(),
                          cast(attention_weights, dtype).contiguous(), {}, {}};
  in.sizes = MsDeformSampleSizes{value.size(0), value.size(1), value.size(2), value.size(3),
                                 sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  in.layout = level_layout(spatial_shapes, in.sizes.levels, in.sizes.tokens);
  return in;
}

}  // namespace ipmt
