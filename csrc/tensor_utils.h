// Small ATen helpers for the fused ops: at IPMT's batch sizes every dispatched op costs the host
// more than its kernel, so these avoid the dispatches a plain call would make for nothing.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace ipmt {

// `t` with its last two dimensions swapped: one as_strided call, where Tensor::t() dispatches
// three ops and transpose() two for the same view (the fused ops run below autograd, so the view
// needs no record of its own).
inline at::Tensor swap_last_two(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(t.dim() >= 2);
  at::DimVector sizes(t.sizes().begin(), t.sizes().end()), strides(t.strides().begin(), t.strides().end());
  const size_t n = sizes.size();
  std::swap(sizes[n - 1], sizes[n - 2]);
  std::swap(strides[n - 1], strides[n - 2]);
  return t.as_strided(sizes, strides, t.storage_offset());
}

// `t` in `dtype`; no dispatch when it already is (Tensor::to dispatches even then).
inline at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// The rows of `t`: (..., K) -> (R, K) (a view of a contiguous tensor, no dispatch when 2-D).
inline at::Tensor as_rows(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  // A view when contiguous: one dispatch, where reshape makes two.
  return t.is_contiguous() ? t.view({-1, t.size(-1)}) : t.reshape({-1, t.size(-1)});
}

// A 0-dim tensor holding `value` in `like`'s dtype, to multiply or compare `like` with. A Scalar
// operand becomes a float64 tensor that CPU kernels first cast to the other operand's dtype (three
// more dispatches and an allocation per op); a 0-dim CPU operand of the same dtype needs none.
// CUDA kernels read a Scalar operand directly, and half-precision CPU kernels compute with a
// Scalar in float32 (rounding it to the tensor's dtype would change the result): both keep
// the Scalar. The tensors are cached per thread and never written.
inline bool takes_cached_scalar(const at::Tensor& like) {
  return like.is_cpu() && (like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble);
}

inline at::Tensor cached_scalar(double value, at::ScalarType dtype) {
  thread_local std::vector<std::pair<std::pair<double, at::ScalarType>, at::Tensor>> cache;
  for (const auto& entry : cache) {
    if (entry.first.first == value && entry.first.second == dtype) return entry.second;
  }
  cache.emplace_back(std::make_pair(value, dtype), at::scalar_tensor(value, at::TensorOptions().dtype(dtype)));
  return cache.back().second;
}

// x * value.
inline at::Tensor mul_scalar(const at::Tensor& x, double value) {
  return takes_cached_scalar(x) ? at::mul(x, cached_scalar(value, x.scalar_type())) : at::mul(x, value);
}

// x *= value.
inline at::Tensor& mul_scalar_(at::Tensor& x, double value) {
  return takes_cached_scalar(x) ? x.mul_(cached_scalar(value, x.scalar_type())) : x.mul_(value);
}

// x where mask is set, else 0.
inline at::Tensor where_else_zero(const at::Tensor& mask, const at::Tensor& x) {
  return takes_cached_scalar(x) ? at::where(mask, x, cached_scalar(0, x.scalar_type())) : at::where(mask, x, 0);
}

// x >= value.
inline at::Tensor ge_scalar(const at::Tensor& x, double value) {
  return takes_cached_scalar(x) ? at::ge(x, cached_scalar(value, x.scalar_type())) : at::ge(x, value);
}

}  // namespace ipmt
