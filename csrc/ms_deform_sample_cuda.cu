// CUDA kernels of multi-scale deformable bilinear sampling (plain CUDA: no PyTorch headers).
//
// One thread block per (batch, query, head). The block first computes the 4 corners of each of its
// L*P sampling points into shared memory, then its threads walk the channels (value rows are D
// contiguous elements, so loads are coalesced) over all corners.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ms_deform_sample_cuda.h"

namespace ipmt {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr unsigned kFullWarp = 0xffffffffu;

template <typename scalar_t>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};

// Explicit conversions: PyTorch builds .cu files with the implicit half/bfloat16 conversions off.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(typename Accumulator<scalar_t>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullWarp, v, offset);
  return v;
}

// Threads per block: the fewest warps that cover D in as few passes as kMaxThreads allows.
int threads_for(int64_t channels) {
  const int64_t passes = (channels + kMaxThreads - 1) / kMaxThreads;
  const int64_t per_pass = (channels + passes - 1) / passes;
  return static_cast<int>((per_pass + kWarpSize - 1) / kWarpSize * kWarpSize);
}

// Shared memory per block: per corner, `values_per_corner` acc_t arrays (forward: weights;
// backward: weights and dots) followed by the int64 token indices. The table has a multiple of 4
// corners, so the int64 array stays 8-byte aligned after float arrays. At most 48 KiB by default:
// L * P up to 1024 (fp32 forward) / 512 (fp64 backward) points per query.
template <typename acc_t>
size_t corner_table_bytes(const MsDeformSampleSizes& sizes, int values_per_corner) {
  const size_t corners = static_cast<size_t>(sizes.levels * sizes.points * kCorners);
  return corners * (values_per_corner * sizeof(acc_t) + sizeof(int64_t));
}

// Fills tokens[k * 4 + c] (-1 when off the map) and weights[k * 4 + c] = bilinear weight times
// attention weight, for the block's points k = (l, p).
template <typename scalar_t, typename acc_t>
__device__ void fill_corner_table(const MsDeformSampleSizes& sizes, int64_t bqh, const LevelLayout& layout,
                                  bool fused_coordinate, const scalar_t* sampling_locations,
                                  const scalar_t* attention_weights, int64_t* tokens, acc_t* weights) {
  const int64_t points_per_query = sizes.levels * sizes.points;
  for (int64_t k = threadIdx.x; k < points_per_query; k += blockDim.x) {
    const int64_t l = k / sizes.points;
    const int64_t point = bqh * points_per_query + k;
    const auto corners = bilinear_corners<acc_t>(to_acc(sampling_locations[2 * point]),
                                                 to_acc(sampling_locations[2 * point + 1]), layout.height[l],
                                                 layout.width[l], layout.start[l], fused_coordinate);
    const acc_t weight = to_acc(attention_weights[point]);
    for (int c = 0; c < kCorners; ++c) {
      tokens[k * kCorners + c] = corners.token[c];
      weights[k * kCorners + c] = weight * corners.weight[c];
    }
  }
}

template <typename scalar_t>
__global__ void forward_kernel(MsDeformSampleSizes sizes, LevelLayout layout, bool fused_coordinate,
                               const scalar_t* __restrict__ value, const scalar_t* __restrict__ sampling_locations,
                               const scalar_t* __restrict__ attention_weights, scalar_t* __restrict__ output) {
  using acc_t = typename Accumulator<scalar_t>::type;
  extern __shared__ unsigned char shared[];
  const int64_t table_size = sizes.levels * sizes.points * kCorners;
  acc_t* weights = reinterpret_cast<acc_t*>(shared);
  int64_t* tokens = reinterpret_cast<int64_t*>(weights + table_size);

  const int64_t bqh = blockIdx.x;  // ((b * Nq) + q) * heads + h
  const int64_t b = bqh / (sizes.queries * sizes.heads);
  const int64_t h = bqh % sizes.heads;
  fill_corner_table(sizes, bqh, layout, fused_coordinate, sampling_locations, attention_weights, tokens, weights);
  __syncthreads();

  const int64_t token_stride = sizes.heads * sizes.channels;
  const scalar_t* value_bh = value + (b * sizes.tokens * sizes.heads + h) * sizes.channels;
  for (int64_t d = threadIdx.x; d < sizes.channels; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t j = 0; j < table_size; ++j) {
      if (tokens[j] >= 0) acc += weights[j] * to_acc(value_bh[tokens[j] * token_stride + d]);
    }
    output[bqh * sizes.channels + d] = from_acc<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(MsDeformSampleSizes sizes, LevelLayout layout, bool fused_coordinate,
                                const scalar_t* __restrict__ value, const scalar_t* __restrict__ sampling_locations,
                                const scalar_t* __restrict__ attention_weights,
                                const scalar_t* __restrict__ grad_output,
                                typename Accumulator<scalar_t>::type* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_locations, scalar_t* __restrict__ grad_weights) {
  using acc_t = typename Accumulator<scalar_t>::type;
  extern __shared__ unsigned char shared[];
  const int64_t points_per_query = sizes.levels * sizes.points;
  const int64_t table_size = points_per_query * kCorners;
  acc_t* weights = reinterpret_cast<acc_t*>(shared);
  acc_t* dots = weights + table_size;  // sum over channels of grad_output * corner value
  int64_t* tokens = reinterpret_cast<int64_t*>(dots + table_size);

  const int64_t bqh = blockIdx.x;
  const int64_t b = bqh / (sizes.queries * sizes.heads);
  const int64_t h = bqh % sizes.heads;
  fill_corner_table(sizes, bqh, layout, fused_coordinate, sampling_locations, attention_weights, tokens, weights);
  for (int64_t j = threadIdx.x; j < table_size; j += blockDim.x) dots[j] = 0;
  __syncthreads();

  const int64_t token_stride = sizes.heads * sizes.channels;
  const int64_t value_offset = (b * sizes.tokens * sizes.heads + h) * sizes.channels;
  const int lane = threadIdx.x % kWarpSize;
  // Every thread runs every pass (idle lanes contribute zeros) so the warp sums see full warps.
  for (int64_t d0 = 0; d0 < sizes.channels; d0 += blockDim.x) {
    const int64_t d = d0 + threadIdx.x;
    const bool active = d < sizes.channels;
    const acc_t grad = active ? to_acc(grad_output[bqh * sizes.channels + d]) : acc_t(0);
    for (int64_t j = 0; j < table_size; ++j) {
      if (tokens[j] < 0) continue;
      const int64_t offset = value_offset + tokens[j] * token_stride + d;
      const acc_t sample = active ? to_acc(value[offset]) : acc_t(0);
      if (active) atomicAdd(grad_value + offset, weights[j] * grad);
      const acc_t dot = warp_sum(grad * sample);
      if (lane == 0) atomicAdd(dots + j, dot);
    }
  }
  __syncthreads();

  for (int64_t k = threadIdx.x; k < points_per_query; k += blockDim.x) {
    const int64_t l = k / sizes.points;
    const int64_t point = bqh * points_per_query + k;
    const int64_t height = layout.height[l];
    const int64_t width = layout.width[l];
    const auto corners = bilinear_corners<acc_t>(to_acc(sampling_locations[2 * point]),
                                                 to_acc(sampling_locations[2 * point + 1]), height, width,
                                                 layout.start[l], fused_coordinate);
    acc_t grad_weight = 0, grad_x = 0, grad_y = 0;
    for (int c = 0; c < kCorners; ++c) {
      if (corners.token[c] < 0) continue;
      const acc_t dot = dots[k * kCorners + c];
      grad_weight += corners.weight[c] * dot;
      grad_x += corners.dweight_dx[c] * dot;
      grad_y += corners.dweight_dy[c] * dot;
    }
    const acc_t weight = to_acc(attention_weights[point]);
    grad_weights[point] = from_acc<scalar_t>(grad_weight);
    grad_locations[2 * point] = from_acc<scalar_t>(grad_x * weight * static_cast<acc_t>(width));
    grad_locations[2 * point + 1] = from_acc<scalar_t>(grad_y * weight * static_cast<acc_t>(height));
  }
}

template <typename scalar_t>
int launch_forward(const MsDeformSampleSizes& sizes, const LevelLayout& layout, bool fused_coordinate,
                   const void* value, const void* sampling_locations, const void* attention_weights, void* output,
                   cudaStream_t stream) {
  using acc_t = typename Accumulator<scalar_t>::type;
  const int64_t blocks = sizes.batch * sizes.queries * sizes.heads;
  if (blocks == 0 || sizes.channels == 0) return cudaSuccess;
  forward_kernel<scalar_t><<<blocks, threads_for(sizes.channels), corner_table_bytes<acc_t>(sizes, 1), stream>>>(
      sizes, layout, fused_coordinate, static_cast<const scalar_t*>(value),
      static_cast<const scalar_t*>(sampling_locations), static_cast<const scalar_t*>(attention_weights),
      static_cast<scalar_t*>(output));
  return cudaGetLastError();
}

template <typename scalar_t>
int launch_backward(const MsDeformSampleSizes& sizes, const LevelLayout& layout, bool fused_coordinate,
                    const void* value, const void* sampling_locations, const void* attention_weights,
                    const void* grad_output, void* grad_value, void* grad_locations, void* grad_weights,
                    cudaStream_t stream) {
  using acc_t = typename Accumulator<scalar_t>::type;
  const int64_t blocks = sizes.batch * sizes.queries * sizes.heads;
  if (blocks == 0) return cudaSuccess;
  backward_kernel<scalar_t><<<blocks, threads_for(sizes.channels), corner_table_bytes<acc_t>(sizes, 2), stream>>>(
      sizes, layout, fused_coordinate, static_cast<const scalar_t*>(value),
      static_cast<const scalar_t*>(sampling_locations), static_cast<const scalar_t*>(attention_weights),
      static_cast<const scalar_t*>(grad_output), static_cast<acc_t*>(grad_value),
      static_cast<scalar_t*>(grad_locations), static_cast<scalar_t*>(grad_weights));
  return cudaGetLastError();
}

}  // namespace

int ms_deform_sample_cuda_forward(CudaDtype dtype, const MsDeformSampleSizes& sizes, const LevelLayout& layout,
                                  bool fused_coordinate, const void* value, const void* sampling_locations,
                                  const void* attention_weights, void* output, cudaStream_t stream) {
  switch (dtype) {
    case CudaDtype::kFloat32:
      return launch_forward<float>(sizes, layout, fused_coordinate, value, sampling_locations, attention_weights,
                                   output, stream);
    case CudaDtype::kFloat64:
      return launch_forward<double>(sizes, layout, fused_coordinate, value, sampling_locations, attention_weights,
                                    output, stream);
    case CudaDtype::kFloat16:
      return launch_forward<__half>(sizes, layout, fused_coordinate, value, sampling_locations, attention_weights,
                                    output, stream);
    case CudaDtype::kBFloat16:
      return launch_forward<__nv_bfloat16>(sizes, layout, fused_coordinate, value, sampling_locations,
                                           attention_weights, output, stream);
  }
  return cudaErrorInvalidValue;
}

int ms_deform_sample_cuda_backward(CudaDtype dtype, const MsDeformSampleSizes& sizes, const LevelLayout& layout,
                                   bool fused_coordinate, const void* value, const void* sampling_locations,
                                   const void* attention_weights, const void* grad_output,
                                   void* grad_value_accumulator, void* grad_locations, void* grad_weights,
                                   cudaStream_t stream) {
  switch (dtype) {
    case CudaDtype::kFloat32:
      return launch_backward<float>(sizes, layout, fused_coordinate, value, sampling_locations, attention_weights,
                                    grad_output, grad_value_accumulator, grad_locations, grad_weights, stream);
    case CudaDtype::kFloat64:
      return launch_backward<double>(sizes, layout, fused_coordinate, value, sampling_locations, attention_weights,
                                     grad_output, grad_value_accumulator, grad_locations, grad_weights, stream);
    case CudaDtype::kFloat16:
      return launch_backward<__half>(sizes, layout, fused_coordinate, value, sampling_locations, attention_weights,
                                     grad_output, grad_value_accumulator, grad_locations, grad_weights, stream);
    case CudaDtype::kBFloat16:
      return launch_backward<__nv_bfloat16>(sizes, layout, fused_coordinate, value, sampling_locations,
                                            attention_weights, grad_output, grad_value_accumulator, grad_locations,
                                            grad_weights, stream);
  }
  return cudaErrorInvalidValue;
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace ipmt
