// A "same" convolution (square odd kernel, stride 1, no bias) on channels-last maps as one matrix
// product over patch rows (patch_conv.cpp), for the query update's 3 x 3 convolutions on small
// maps: there a library convolution's fixed cost per call (oneDNN's primitive set-up, layout
// conversions of the weight and its gradient) is most of the call, and a gather, a product and a
// scatter cost a fraction of it. The blocks use it on the CPU in float32/float64 up to
// kPatchConvMaxPixels output pixels, a library convolution elsewhere.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace ipmt {

// The largest B * h * w for which the patch-row convolution is used: the query update block's
// forward + backward with it against oneDNN's convolutions, on this project's 2-core CPU at 32 and
// 256 channels, one thread (NOTES.md, "Host cost, third pass"): 0.44x / 0.33x the time at 36
// pixels, 0.6x at 100, even at 256, slower beyond (1.2x at 484, 1.3x-3.5x at 900-3600).
constexpr int64_t kPatchConvMaxPixels = 256;

// Whether the patch-row convolution takes `input` (B, C, h, w) and `weight` (C', C, k, k): the CPU
// paths enabled (cpu_loops.h), CPU, float32 or float64 in one dtype, `input` channels-last
// contiguous, `weight` contiguous, at most kPatchConvMaxPixels output pixels.
bool patch_conv_applies(const at::Tensor& input, const at::Tensor& weight);

// conv2d(input, weight, padding = k // 2) as a channels-last (B, C', h, w) tensor.
at::Tensor patch_conv(const at::Tensor& input, const at::Tensor& weight);

// Gradients of (input, weight) from the output's gradient (any strides): the input's
// channels-last, the weight's contiguous.
std::tuple<at::Tensor, at::Tensor> patch_conv_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                                       const at::Tensor& weight);

}  // namespace ipmt
