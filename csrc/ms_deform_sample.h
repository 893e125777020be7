// Multi-scale deformable bilinear sampling: sizes, the per-point corner computation shared by the
// CPU and CUDA kernels, and the CPU kernel declarations. No PyTorch and no CUDA headers here.
//
// Layouts (all contiguous): value (B, S, heads, D); spatial_shapes (L, 2) = (H, W); level_start
// (L,); sampling_locations (B, Nq, heads, L, P, 2) = (x, y) in [0, 1]; attention_weights
// (B, Nq, heads, L, P); output (B, Nq, heads, D). Pixel coordinates follow align_corners=False
// (x = loc_x * W - 0.5); a corner off the map reads zero.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define IPMT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IPMT_HOST_DEVICE inline
#endif

namespace ipmt {

struct MsDeformSampleSizes {
  int64_t batch, tokens, heads, channels, queries, levels, points;

  // Number of (b, q, h, l, p) sampling points, the length of attention_weights.
  int64_t sampling_points() const { return batch * queries * heads * levels * points; }
};

constexpr int kCorners = 4;

template <typename acc_t>
IPMT_HOST_DEVICE acc_t floor_of(acc_t x) {
#if defined(__CUDA_ARCH__)
  return floor(x);
#else
  return std::floor(x);
#endif
}

// The four bilinear corners of one sampling point; corner c is (x0 + (c & 1), y0 + (c >> 1)).
template <typename acc_t>
struct BilinearCorners {
  int64_t token[kCorners];  // token index in S (level start included), or -1 when off the map
  acc_t weight[kCorners];   // bilinear weight
  acc_t dweight_dx[kCorners];  // its derivative w.r.t. the pixel x coordinate
  acc_t dweight_dy[kCorners];  // ... and w.r.t. the pixel y coordinate
};

template <typename acc_t>
IPMT_HOST_DEVICE BilinearCorners<acc_t> bilinear_corners(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width,
                                                         int64_t level_start) {
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  const acc_t x0 = floor_of(x);
  const acc_t y0 = floor_of(y);
  const acc_t fx = x - x0;
  const acc_t fy = y - y0;
  BilinearCorners<acc_t> corners;
  for (int c = 0; c < kCorners; ++c) {
    const int dx = c & 1;
    const int dy = c >> 1;
    const acc_t cx = x0 + dx;
    const acc_t cy = y0 + dy;
    // Compared as floats: far-outside locations must not overflow an integer cast.
    const bool on_map = cx >= 0 && cx <= static_cast<acc_t>(width - 1) && cy >= 0 &&
                        cy <= static_cast<acc_t>(height - 1);
    corners.token[c] = on_map ? level_start + static_cast<int64_t>(cy) * width + static_cast<int64_t>(cx) : -1;
    const acc_t wx = dx ? fx : acc_t(1) - fx;
    const acc_t wy = dy ? fy : acc_t(1) - fy;
    corners.weight[c] = wx * wy;
    corners.dweight_dx[c] = dx ? wy : -wy;
    corners.dweight_dy[c] = dy ? wx : -wx;
  }
  return corners;
}

// CPU kernels (ms_deform_sample_cpu.cpp), instantiated for float and double.
template <typename scalar_t>
void ms_deform_sample_cpu_forward(const MsDeformSampleSizes& sizes, const scalar_t* value,
                                  const int64_t* spatial_shapes, const int64_t* level_start_index,
                                  const scalar_t* sampling_locations, const scalar_t* attention_weights,
                                  scalar_t* output);

// grad_value must be zero on entry; grad_locations and grad_weights are overwritten.
template <typename scalar_t>
void ms_deform_sample_cpu_backward(const MsDeformSampleSizes& sizes, const scalar_t* value,
                                   const int64_t* spatial_shapes, const int64_t* level_start_index,
                                   const scalar_t* sampling_locations, const scalar_t* attention_weights,
                                   const scalar_t* grad_output, scalar_t* grad_value, scalar_t* grad_locations,
                                   scalar_t* grad_weights);

}  // namespace ipmt
