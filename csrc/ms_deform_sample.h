// Multi-scale deformable bilinear sampling: sizes, level layout, the per-point corner computation
// shared by the CPU and CUDA kernels, and the CPU kernel declarations. No PyTorch and no CUDA
// headers here.
//
// Layouts (all contiguous): value (B, S, heads, D); sampling_locations (B, Nq, heads, L, P, 2) =
// (x, y) in [0, 1]; attention_weights (B, Nq, heads, L, P); output (B, Nq, heads, D). The level
// shapes travel by value (host integers, no device tensor to read). Pixel coordinates are
// grid_sample's for align_corners=False, computed with its own roundings (see source_coordinate);
// a corner off the map reads zero.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define IPMT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IPMT_HOST_DEVICE inline
#endif

namespace ipmt {

// Levels a launch can take by value (Deformable-DETR uses 4, IPMT 1); the Triton kernels take as many.
constexpr int kMaxLevels = 4;

struct MsDeformSampleSizes {
  int64_t batch, tokens, heads, channels, queries, levels, points;

  // Number of (b, q, h, l, p) sampling points, the length of attention_weights.
  int64_t sampling_points() const { return batch * queries * heads * levels * points; }
};

// (H, W) and first token of every level, passed to kernels by value.
struct LevelLayout {
  int64_t height[kMaxLevels];
  int64_t width[kMaxLevels];
  int64_t start[kMaxLevels];
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

// a * b + c rounded once (an explicit fma is never split), and rounded twice: the product never
// contracted into an fma (host code is compiled with -ffp-contract=off; in device code the
// round-to-nearest product intrinsics are never fused by nvcc).
template <typename acc_t>
IPMT_HOST_DEVICE acc_t fused_multiply_add(acc_t a, acc_t b, acc_t c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
template <typename acc_t>
IPMT_HOST_DEVICE acc_t rounded_product(acc_t a, acc_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// The pixel coordinate grid_sample (align_corners=False) samples for a location in [0, 1], with
// its roundings: the grid value g = 2 * loc - 1 (the caller's op), then (g + 1) * (size / 2) - 0.5,
// either as one fused multiply-add (what grid_sample's kernels compute where the compiler
// contracted them: AVX2/AVX-512 CPU builds, CUDA) or as a rounded product and a rounded
// difference. At the published initialisation every sampling point lies exactly on a pixel
// centre, a kink of bilinear sampling, so the last bit decides which one-sided derivative is taken.
template <typename acc_t>
IPMT_HOST_DEVICE acc_t source_coordinate(acc_t loc, int64_t size, bool fused) {
  const acc_t grid = acc_t(2) * loc - acc_t(1);
  const acc_t half_size = static_cast<acc_t>(size) / acc_t(2);
  return fused ? fused_multiply_add(grid + acc_t(1), half_size, acc_t(-0.5))
               : rounded_product(grid + acc_t(1), half_size) - acc_t(0.5);
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
                                                         int64_t level_start, bool fused_coordinate) {
  const acc_t x = source_coordinate(loc_x, width, fused_coordinate);
  const acc_t y = source_coordinate(loc_y, height, fused_coordinate);
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
void ms_deform_sample_cpu_forward(const MsDeformSampleSizes& sizes, const LevelLayout& layout,
                                  bool fused_coordinate, const scalar_t* value, const scalar_t* sampling_locations,
                                  const scalar_t* attention_weights, scalar_t* output);

// grad_value must be zero on entry; grad_locations and grad_weights are overwritten.
template <typename scalar_t>
void ms_deform_sample_cpu_backward(const MsDeformSampleSizes& sizes, const LevelLayout& layout,
                                   bool fused_coordinate, const scalar_t* value, const scalar_t* sampling_locations,
                                   const scalar_t* attention_weights, const scalar_t* grad_output,
                                   scalar_t* grad_value, scalar_t* grad_locations, scalar_t* grad_weights);

}  // namespace ipmt
