// CPU kernels of multi-scale deformable bilinear sampling (OpenMP; inner loops vectorise over D).
#include <omp.h>

#include <algorithm>
#include <vector>

#include "ms_deform_sample.h"

namespace ipmt {
namespace {

// The backward splits channels into chunks of a multiple of this many elements (a 64-byte cache
// line of floats), so threads seldom write the same cache line of grad_value.
constexpr int64_t kMinChannelChunk = 16;
// Per sampling point the backward keeps three partial sums: d/d(weight), d/dx and d/dy.
constexpr int64_t kPartials = 3;

// The channel loops get AVX-512 and AVX2 clones chosen when the library loads, so one portable
// build runs at the machine's vector width (forward about 3x faster than SSE2 on
// this project's AVX-512 CPU).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define IPMT_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IPMT_VECTOR_CLONES
#endif

// Channels per backward task: enough chunks that every thread has a (batch, head, chunk) task.
int64_t channel_chunk_size(int64_t channels, int64_t batch_heads) {
  const int64_t max_chunks = std::max<int64_t>(1, channels / kMinChannelChunk);
  const int64_t wanted_chunks = (omp_get_max_threads() + batch_heads - 1) / batch_heads;
  const int64_t chunks = std::min(max_chunks, wanted_chunks);
  const int64_t per_chunk = (channels + chunks - 1) / chunks;
  return std::max<int64_t>(1, (per_chunk + kMinChannelChunk - 1) / kMinChannelChunk * kMinChannelChunk);
}

template <typename scalar_t>
IPMT_VECTOR_CLONES void add_scaled_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ row, scalar_t scale,
                                       int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) out[d] += scale * row[d];
}

// Returns sum(grad * row) and adds scale * grad to grad_row, over n channels.
template <typename scalar_t>
IPMT_VECTOR_CLONES scalar_t dot_and_scatter(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ row,
                                            scalar_t* __restrict__ grad_row, scalar_t scale, int64_t n) {
  scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < n; ++d) {
    dot += grad[d] * row[d];
    grad_row[d] += scale * grad[d];
  }
  return dot;
}

}  // namespace

template <typename scalar_t>
void ms_deform_sample_cpu_forward(const MsDeformSampleSizes& sizes, const LevelLayout& layout,
                                  bool fused_coordinate, const scalar_t* value, const scalar_t* sampling_locations,
                                  const scalar_t* attention_weights, scalar_t* output) {
  const int64_t channels = sizes.channels;
  const int64_t token_stride = sizes.heads * channels;
#pragma omp parallel for schedule(static)
  for (int64_t bq = 0; bq < sizes.batch * sizes.queries; ++bq) {
    const int64_t b = bq / sizes.queries;
    for (int64_t h = 0; h < sizes.heads; ++h) {
      const int64_t bqh = bq * sizes.heads + h;
      const scalar_t* value_bh = value + (b * sizes.tokens * sizes.heads + h) * channels;
      scalar_t* out = output + bqh * channels;
      std::fill(out, out + channels, scalar_t(0));
      for (int64_t l = 0; l < sizes.levels; ++l) {
        for (int64_t p = 0; p < sizes.points; ++p) {
          const int64_t point = (bqh * sizes.levels + l) * sizes.points + p;
          const auto corners = bilinear_corners<scalar_t>(
              sampling_locations[2 * point], sampling_locations[2 * point + 1], layout.height[l], layout.width[l],
              layout.start[l], fused_coordinate);
          const scalar_t weight = attention_weights[point];
          for (int c = 0; c < kCorners; ++c) {
            if (corners.token[c] < 0) continue;
            add_scaled_row(out, value_bh + corners.token[c] * token_stride, weight * corners.weight[c], channels);
          }
        }
      }
    }
  }
}

// Parallel over (batch, head, channel chunk): each task owns a disjoint slice of grad_value, so the
// scatter needs no atomics and the result does not depend on the thread count's timing. The
// per-point sums over channels are kept per chunk and added in chunk order at the end.
template <typename scalar_t>
void ms_deform_sample_cpu_backward(const MsDeformSampleSizes& sizes, const LevelLayout& layout,
                                   bool fused_coordinate, const scalar_t* value, const scalar_t* sampling_locations,
                                   const scalar_t* attention_weights, const scalar_t* grad_output,
                                   scalar_t* grad_value, scalar_t* grad_locations, scalar_t* grad_weights) {
  const int64_t channels = sizes.channels;
  const int64_t token_stride = sizes.heads * channels;
  const int64_t batch_heads = sizes.batch * sizes.heads;
  const int64_t chunk_size = channel_chunk_size(channels, batch_heads);
  const int64_t num_chunks = (channels + chunk_size - 1) / chunk_size;
  const int64_t num_points = sizes.sampling_points();
  std::vector<scalar_t> partials(static_cast<size_t>(num_chunks * num_points * kPartials));

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < batch_heads * num_chunks; ++task) {
    const int64_t bh = task / num_chunks;
    const int64_t chunk = task % num_chunks;
    const int64_t b = bh / sizes.heads;
    const int64_t h = bh % sizes.heads;
    const int64_t d0 = chunk * chunk_size;
    const int64_t n = std::min(channels, d0 + chunk_size) - d0;
    const int64_t value_offset = (b * sizes.tokens * sizes.heads + h) * channels + d0;
    const scalar_t* value_bh = value + value_offset;
    scalar_t* grad_value_bh = grad_value + value_offset;
    scalar_t* chunk_partials = partials.data() + chunk * num_points * kPartials;
    for (int64_t q = 0; q < sizes.queries; ++q) {
      const int64_t bqh = (b * sizes.queries + q) * sizes.heads + h;
      const scalar_t* grad = grad_output + bqh * channels + d0;
      for (int64_t l = 0; l < sizes.levels; ++l) {
        const int64_t height = layout.height[l];
        const int64_t width = layout.width[l];
        for (int64_t p = 0; p < sizes.points; ++p) {
          const int64_t point = (bqh * sizes.levels + l) * sizes.points + p;
          const auto corners = bilinear_corners<scalar_t>(sampling_locations[2 * point],
                                                          sampling_locations[2 * point + 1], height, width,
                                                          layout.start[l], fused_coordinate);
          const scalar_t weight = attention_weights[point];
          scalar_t grad_weight = 0, grad_x = 0, grad_y = 0;
          for (int c = 0; c < kCorners; ++c) {
            if (corners.token[c] < 0) continue;
            const int64_t row = corners.token[c] * token_stride;
            const scalar_t dot = dot_and_scatter(grad, value_bh + row, grad_value_bh + row,
                                                 weight * corners.weight[c], n);
            grad_weight += corners.weight[c] * dot;
            grad_x += corners.dweight_dx[c] * dot;
            grad_y += corners.dweight_dy[c] * dot;
          }
          scalar_t* out = chunk_partials + point * kPartials;
          out[0] = grad_weight;
          out[1] = grad_x * weight * static_cast<scalar_t>(width);
          out[2] = grad_y * weight * static_cast<scalar_t>(height);
        }
      }
    }
  }

#pragma omp parallel for schedule(static)
  for (int64_t point = 0; point < num_points; ++point) {
    scalar_t sums[kPartials] = {0, 0, 0};
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const scalar_t* in = partials.data() + (chunk * num_points + point) * kPartials;
      for (int k = 0; k < kPartials; ++k) sums[k] += in[k];
    }
    grad_weights[point] = sums[0];
    grad_locations[2 * point] = sums[1];
    grad_locations[2 * point + 1] = sums[2];
  }
}

#define IPMT_INSTANTIATE_CPU(scalar_t)                                                                          \
  template void ms_deform_sample_cpu_forward<scalar_t>(const MsDeformSampleSizes&, const LevelLayout&, bool,   \
                                                       const scalar_t*, const scalar_t*, const scalar_t*,      \
                                                       scalar_t*);                                             \
  template void ms_deform_sample_cpu_backward<scalar_t>(const MsDeformSampleSizes&, const LevelLayout&, bool,  \
                                                        const scalar_t*, const scalar_t*, const scalar_t*,     \
                                                        const scalar_t*, scalar_t*, scalar_t*, scalar_t*);
IPMT_INSTANTIATE_CPU(float)
IPMT_INSTANTIATE_CPU(double)
#undef IPMT_INSTANTIATE_CPU

}  // namespace ipmt
