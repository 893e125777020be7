// CUDA kernels of ipmt_fast::ms_deform_sample, registered for CUDA tensors. Built only where PyTorch
// has CUDA (its CUDA headers): the device guard and the current stream are taken here, so the
// launches follow torch.cuda.stream(...) contexts and CUDA-graph capture like any ATen op. Only c10's
// CUDA headers are needed (ATen's CUDA context also pulls in the CUDA math libraries' headers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "ms_deform_sample_binding.h"
#include "ms_deform_sample_cuda.h"

namespace {

ipmt::CudaDtype cuda_dtype(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return ipmt::CudaDtype::kFloat32;
    case torch::kDouble: return ipmt::CudaDtype::kFloat64;
    case torch::kHalf: return ipmt::CudaDtype::kFloat16;
    case torch::kBFloat16: return ipmt::CudaDtype::kBFloat16;
    default: TORCH_CHECK(false, "ms_deform_sample: unsupported dtype ", dtype);
  }
}

void check_launch(int error) {
  TORCH_CHECK(error == 0, "ms_deform_sample CUDA kernel failed: ", ipmt::cuda_error_string(error));
}

torch::Tensor ms_deform_sample_cuda(const torch::Tensor& value, c10::IntArrayRef spatial_shapes,
                                    const torch::Tensor& sampling_locations, const torch::Tensor& attention_weights,
                                    bool fused_coordinate) {
  const c10::cuda::CUDAGuard guard(value.device());
  const auto dtype = value.scalar_type();
  const auto in = ipmt::prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, dtype);
  const auto& s = in.sizes;
  auto output = torch::empty({s.batch, s.queries, s.heads * s.channels}, in.value.options());
  check_launch(ipmt::ms_deform_sample_cuda_forward(
      cuda_dtype(dtype), s, in.layout, fused_coordinate, in.value.data_ptr(), in.sampling_locations.data_ptr(),
      in.attention_weights.data_ptr(), output.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return output;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> ms_deform_sample_backward_cuda(
    const torch::Tensor& grad_output, const torch::Tensor& value, c10::IntArrayRef spatial_shapes,
    const torch::Tensor& sampling_locations, const torch::Tensor& attention_weights, bool fused_coordinate) {
  const c10::cuda::CUDAGuard guard(value.device());
  const auto dtype = value.scalar_type();
  const auto in = ipmt::prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, dtype);
  const auto& s = in.sizes;
  const auto grad = ipmt::cast(grad_output, dtype).contiguous();
  // grad_value is scattered with atomics into an fp32 (fp64) buffer, cast at the end.
  const auto accumulator = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto grad_value = torch::zeros(in.value.sizes(), in.value.options().dtype(accumulator));
  auto grad_locations = torch::empty_like(in.sampling_locations);
  auto grad_weights = torch::empty_like(in.attention_weights);
  check_launch(ipmt::ms_deform_sample_cuda_backward(
      cuda_dtype(dtype), s, in.layout, fused_coordinate, in.value.data_ptr(), in.sampling_locations.data_ptr(),
      in.attention_weights.data_ptr(), grad.data_ptr(), grad_value.data_ptr(), grad_locations.data_ptr(),
      grad_weights.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {ipmt::cast(grad_value, dtype), grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(ipmt_fast, CUDA, m) {
  m.impl("ms_deform_sample", &ms_deform_sample_cuda);
  m.impl("ms_deform_sample_backward", &ms_deform_sample_backward_cuda);
}
