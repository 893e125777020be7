// PyTorch binding of multi-scale deformable bilinear sampling: CPU kernels always, CUDA kernels when
// built with IPMT_WITH_CUDA. The CUDA stream comes from Python as an integer handle, so this file
// needs no ATen CUDA header (a CPU-only PyTorch does not ship them).
#include <torch/extension.h>

#include <tuple>

#include "ms_deform_sample.h"
#ifdef IPMT_WITH_CUDA
#include "ms_deform_sample_cuda.h"
#endif

namespace {

using ipmt::MsDeformSampleSizes;

struct Inputs {
  torch::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  MsDeformSampleSizes sizes;
};

// Contiguous inputs in `dtype` (the public Python function has already checked shapes and devices).
Inputs prepare(const torch::Tensor& value, const torch::Tensor& spatial_shapes, const torch::Tensor& level_start_index,
               const torch::Tensor& sampling_locations, const torch::Tensor& attention_weights,
               torch::ScalarType dtype) {
  TORCH_CHECK(value.dim() == 4 && sampling_locations.dim() == 6 && attention_weights.dim() == 5,
              "ms_deform_sample: expected value (B, S, heads, D), sampling_locations (B, Nq, heads, L, P, 2) and "
              "attention_weights (B, Nq, heads, L, P)");
  Inputs in{value.to(dtype).contiguous(),
            spatial_shapes.to(torch::kInt64).contiguous(),
            level_start_index.to(torch::kInt64).contiguous(),
            sampling_locations.to(dtype).contiguous(),
            attention_weights.to(dtype).contiguous(),
            {}};
  in.sizes = MsDeformSampleSizes{value.size(0), value.size(1), value.size(2), value.size(3),
                                 sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  return in;
}

// The CPU kernels compute in float or double; half precision inputs are upcast to float.
torch::ScalarType cpu_compute_dtype(torch::ScalarType dtype) {
  return dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
}

#ifdef IPMT_WITH_CUDA
ipmt::CudaDtype cuda_dtype(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return ipmt::CudaDtype::kFloat32;
    case torch::kDouble: return ipmt::CudaDtype::kFloat64;
    case torch::kHalf: return ipmt::CudaDtype::kFloat16;
    case torch::kBFloat16: return ipmt::CudaDtype::kBFloat16;
    default: TORCH_CHECK(false, "ms_deform_sample: unsupported dtype ", dtype);
  }
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void check_cuda(int error) {
  TORCH_CHECK(error == 0, "ms_deform_sample CUDA kernel failed: ", ipmt::cuda_error_string(error));
}
#endif

void check_cuda_built(const torch::Tensor& value) {
#ifndef IPMT_WITH_CUDA
  TORCH_CHECK(!value.is_cuda(), "ms_deform_sample: this build of the extension has no CUDA kernels");
#endif
}

torch::Tensor forward(const torch::Tensor& value, const torch::Tensor& spatial_shapes,
                      const torch::Tensor& level_start_index, const torch::Tensor& sampling_locations,
                      const torch::Tensor& attention_weights, int64_t cuda_stream) {
  check_cuda_built(value);
  const bool on_cuda = value.is_cuda();
  const auto dtype = on_cuda ? value.scalar_type() : cpu_compute_dtype(value.scalar_type());
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, dtype);
  const auto& s = in.sizes;
  auto output = torch::empty({s.batch, s.queries, s.heads * s.channels}, in.value.options());
#ifdef IPMT_WITH_CUDA
  if (on_cuda) {
    check_cuda(ipmt::ms_deform_sample_cuda_forward(
        cuda_dtype(dtype), s, in.value.data_ptr(), in.spatial_shapes.data_ptr<int64_t>(),
        in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr(),
        in.attention_weights.data_ptr(), output.data_ptr(), as_stream(cuda_stream)));
    return output;
  }
#endif
  (void)cuda_stream;
  AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_sample_cpu_forward", [&] {
    ipmt::ms_deform_sample_cpu_forward<scalar_t>(
        s, in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
        in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<scalar_t>(),
        in.attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
  });
  return output.to(value.scalar_type());
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> backward(
    const torch::Tensor& grad_output, const torch::Tensor& value, const torch::Tensor& spatial_shapes,
    const torch::Tensor& level_start_index, const torch::Tensor& sampling_locations,
    const torch::Tensor& attention_weights, int64_t cuda_stream) {
  check_cuda_built(value);
  const bool on_cuda = value.is_cuda();
  const auto dtype = on_cuda ? value.scalar_type() : cpu_compute_dtype(value.scalar_type());
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, dtype);
  const auto& s = in.sizes;
  const auto grad = grad_output.to(dtype).contiguous();
  auto grad_locations = torch::empty_like(in.sampling_locations);
  auto grad_weights = torch::empty_like(in.attention_weights);
#ifdef IPMT_WITH_CUDA
  if (on_cuda) {
    // grad_value is scattered with atomics into an fp32 (fp64) buffer, cast at the end.
    const auto accumulator = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
    auto grad_value = torch::zeros(in.value.sizes(), in.value.options().dtype(accumulator));
    check_cuda(ipmt::ms_deform_sample_cuda_backward(
        cuda_dtype(dtype), s, in.value.data_ptr(), in.spatial_shapes.data_ptr<int64_t>(),
        in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr(),
        in.attention_weights.data_ptr(), grad.data_ptr(), grad_value.data_ptr(), grad_locations.data_ptr(),
        grad_weights.data_ptr(), as_stream(cuda_stream)));
    return {grad_value.to(dtype), grad_locations, grad_weights};
  }
#endif
  (void)cuda_stream;
  auto grad_value = torch::zeros_like(in.value);
  AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_sample_cpu_backward", [&] {
    ipmt::ms_deform_sample_cpu_backward<scalar_t>(
        s, in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
        in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<scalar_t>(),
        in.attention_weights.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
        grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>());
  });
  return {grad_value.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

bool built_with_cuda() {
#ifdef IPMT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable bilinear sampling: C++ (OpenMP) and CUDA kernels";
  m.def("ms_deform_sample_forward", &forward, "Forward: (B, Nq, heads * D) weighted bilinear samples",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("cuda_stream") = 0);
  m.def("ms_deform_sample_backward", &backward, "Backward: (grad_value, grad_locations, grad_weights)",
        py::arg("grad_output"), py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("cuda_stream") = 0);
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in");
}
