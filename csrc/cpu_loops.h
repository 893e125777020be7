// Hand-written CPU loops for the pointwise and normalisation work between the fused ops' matrix
// products (cpu_loops.cpp): at IPMT's batch sizes the host's cost per ATen call, not the
// arithmetic, sets the pace, and each loop here replaces two to seven calls of the ATen
// composition it computes. They take CPU tensors in float32 or float64 (cpu_loops_apply says whether);
// the ops fall back to the composition elsewhere (CUDA, half precision, mixed dtypes under
// autocast).
//
// The residual, dropout and layer norm that close each sub-layer: x + keep * scale * branch, then
// a layer norm over the last dimension, and the backward of both.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>

namespace ipmt {

// Whether the CPU-only paths (these loops, the patch-row convolution of patch_conv.h and the
// dropout-draw loop of dropout_draws.h) may be taken. Switched off (ipmt_fast_set_cpu_paths
// below), the ops run the ATen compositions, library convolutions and bernoulli_ calls their CUDA
// kernels run, so the CPU tests the arithmetic a GPU executes. Process-wide, on by default.
bool cpu_paths_enabled();

// Whether the loops take these tensors: the CPU paths enabled, all on the CPU and contiguous, the
// floating ones float32 or float64 in one dtype (the others bool masks); undefined or empty ones
// are left out. The shapes are the caller's to guarantee (as the ops build them).
bool cpu_loops_apply(std::initializer_list<at::Tensor> tensors);

// Returns (out, sum, mean, rstd): sum = x + keep * scale * branch (x + branch without a mask),
// rounded as the composition rounds it; out = LayerNorm(sum) with the affine `weight` and `bias`
// (bias may be undefined); mean and rstd per row, in the input's dtype as at::native_layer_norm
// returns them. Without a weight there is no norm: out is sum and the statistics are empty.
// Without a branch (undefined) the norm takes x itself, and sum is empty.
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

// Dropout with a drawn mask: x * keep * scale, as a new tensor (the Python `x * keep * scale`).
at::Tensor dropout(const at::Tensor& x, const at::Tensor& keep, double scale);

// ReLU then dropout of the FFN's hidden units, in place: h = relu(h) * keep * scale, the values
// of relu_, mul_(keep) and mul_ (no dropout where `keep` is undefined: scale is 1).
void relu_dropout_(at::Tensor& hidden, const at::Tensor& keep, double scale);

// Its backward, in place on the gradient of the pre-activation product's output: g * scale where
// the activation `hidden` (after dropout) is > 0, else 0 (mul_, then threshold_backward).
void relu_dropout_backward_(at::Tensor& grad, const at::Tensor& hidden, double scale);

// The prototype attention's tokens-major logits (B, N, M), in place: logits * scale, and the
// published bias at every token masked in `token_mask` (B, N) of an image with a token allowed
// (mul_, logical_not, any, logical_and_, masked_fill_; see masked_prototype_attention).
void scale_and_mask_logits_(at::Tensor& logits, const at::Tensor& token_mask, double scale, double masked_bias);

// The softmax's backward over the tokens (dim 1) of the prototype attention, in place on the
// attention's gradient `grad` (B, N, M): scale * a * (g k - sum_n g k a) with a the attention and
// k the dropout multiplier `keep` (B, M, N) (1 where undefined) (mul_, _softmax_backward_data,
// mul_; the sum in float64).
void attention_softmax_backward_(at::Tensor& grad, const at::Tensor& attention, const at::Tensor& keep,
                                 double scale);

// Sampling locations of the deformable attention: reference_points (N, 2) + offsets / normalizer
// (2) over offsets (B, N, ..., 2), the two roundings of the broadcast division and sum.
at::Tensor sampling_locations(const at::Tensor& reference_points, const at::Tensor& offsets,
                              const at::Tensor& normalizer);

// grad / normalizer over the last dimension (2) of the locations' gradient.
at::Tensor divide_pairs(const at::Tensor& grad, const at::Tensor& normalizer);

}  // namespace ipmt

// Turns the CPU paths on (non-zero) or off and returns whether they were on: a C symbol, so that
// Python reaches it through ctypes (ipmt_fast.ops.extension.cpu_paths) without an operator.
extern "C" int ipmt_fast_set_cpu_paths(int enabled);
