// The residual, dropout and layer norm that close each sub-layer, as one pass over the rows
// (residual_norm.cpp): x + keep * scale * branch, then a layer norm over the last dimension, and
// the backward of both. On the CPU, in float32 and float64, one loop each way replaces the five
// to seven ATen calls of the composition (at IPMT's batch sizes the host's cost per call, not
// the arithmetic, sets the pace); the blocks fall back to the composition elsewhere.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ipmt {

// Whether the row loops take these tensors: CPU, float32 or float64, one dtype, contiguous. `keep`
// (a bool mask of `x`'s shape) and the norm's parameters may be undefined.
bool residual_norm_applies(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& keep,
                           const at::Tensor& weight, const at::Tensor& bias);

// Returns (out, sum, mean, rstd): sum = x + keep * scale * branch (x + branch without a mask),
// rounded as the composition rounds it; out = LayerNorm(sum) with the affine `weight` and `bias`
// (bias may be undefined); mean and rstd per row, in the input's dtype as at::native_layer_norm
// returns them. Without a weight there is no norm: out is sum and the statistics are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_norm(const at::Tensor& x,
                                                                        const at::Tensor& branch,
                                                                        const at::Tensor& keep, double scale,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& bias, double eps);

// Returns (grad_sum, grad_branch, grad_weight, grad_bias) from the gradient of `out`: grad_sum is
// the gradient of the sum (that of x), grad_branch = keep * scale * grad_sum; the parameters'
// gradients are undefined where there is no norm (or no bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& sum, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& keep, double scale, const at::Tensor& weight, bool with_bias);

}  // namespace ipmt
