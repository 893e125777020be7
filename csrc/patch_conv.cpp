// The patch-row convolution (patch_conv.h). A patch row holds, for one output pixel, the input
// values under the kernel in the weight's own order (channel, kernel row, kernel column), zero
// where the kernel hangs over the border: the (C', C, k, k) weight is then a (C', C k k) matrix
// as it lies, and out = patches W^T, grad W = grad_out^T patches, grad patches = grad_out W.
#include "patch_conv.h"

#include "cpu_loops.h"
#include "tensor_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace ipmt {
namespace {

struct Geometry {
  int64_t batch, channels, height, width, kernel, pad;
  int64_t pixels() const { return batch * height * width; }
  int64_t patch() const { return channels * kernel * kernel; }
};

Geometry geometry(const at::Tensor& input, const at::Tensor& weight) {
  const int64_t kernel = weight.size(-1);
  return {input.size(0), input.size(1), input.size(2), input.size(3), kernel, kernel / 2};
}

// Pixels per parallel task: about ATen's grain of elements.
int64_t pixels_per_task(const Geometry& g) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / g.patch()); }

// Calls visit(tap, neighbour) for each kernel tap (i, j) of pixel `p` (an index into the
// (B, h, w) pixels), with neighbour the pixel at p + direction * (i - pad, j - pad) or -1 where
// that falls off the map: direction +1 reads a patch, -1 finds the patches that read `p`.
template <typename Visit>
inline void for_each_tap(const Geometry& g, int64_t p, int64_t direction, Visit&& visit) {
  const int64_t x = p % g.width, y = (p / g.width) % g.height, image_start = p - (y * g.width + x);
  for (int64_t i = 0; i < g.kernel; ++i) {
    const int64_t yy = y + direction * (i - g.pad);
    for (int64_t j = 0; j < g.kernel; ++j) {
      const int64_t xx = x + direction * (j - g.pad);
      const bool on_map = yy >= 0 && yy < g.height && xx >= 0 && xx < g.width;
      visit(i * g.kernel + j, on_map ? image_start + yy * g.width + xx : -1);
    }
  }
}

// patches[p, (c k + i) k + j] = input[b, c, y + i - pad, x + j - pad], 0 outside the map, for the
// output pixel p = (b h + y) w + x; `input` is channels-last, i.e. (B, h, w, C) in memory.
template <typename T>
void gather_patches(const T* input, T* patches, const Geometry& g) {
  const int64_t kk = g.kernel * g.kernel;
  at::parallel_for(0, g.pixels(), pixels_per_task(g), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* row = patches + p * g.patch();
      for_each_tap(g, p, 1, [&](int64_t tap, int64_t source) {
        const T* pixel = source >= 0 ? input + source * g.channels : nullptr;
        for (int64_t c = 0; c < g.channels; ++c) row[c * kk + tap] = pixel != nullptr ? pixel[c] : T(0);
      });
    }
  });
}

// The adjoint of gather_patches: grad_input[b, c, Y, X] = the sum, over the taps (i, j) in order,
// of grad_patches[pixel (Y - i + pad, X - j + pad), (c k + i) k + j] where that pixel is on the map
// (a gather over the taps: no two threads write one pixel).
template <typename T>
void scatter_patches(const T* grad_patches, T* grad_input, const Geometry& g) {
  const int64_t kk = g.kernel * g.kernel;
  at::parallel_for(0, g.pixels(), pixels_per_task(g), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      T* pixel = grad_input + q * g.channels;
      for (int64_t c = 0; c < g.channels; ++c) pixel[c] = T(0);
      for_each_tap(g, q, -1, [&](int64_t tap, int64_t reader) {
        if (reader < 0) return;
        const T* row = grad_patches + reader * g.patch();
        for (int64_t c = 0; c < g.channels; ++c) pixel[c] += row[c * kk + tap];
      });
    }
  });
}

at::Tensor patches_of(const at::Tensor& input, const Geometry& g) {
  at::Tensor patches = at::empty({g.pixels(), g.patch()}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gather_patches", [&] {
    gather_patches<scalar_t>(input.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(), g);
  });
  return patches;
}

// (P, C') rows as the channels-last (B, C', h, w) map they are.
at::Tensor rows_as_map(const at::Tensor& rows, const Geometry& g) {
  return rows.view({g.batch, g.height, g.width, rows.size(1)}).permute({0, 3, 1, 2});
}

}  // namespace

bool patch_conv_applies(const at::Tensor& input, const at::Tensor& weight) {
  const auto dtype = input.scalar_type();
  if (!cpu_paths_enabled() || !input.is_cpu() || (dtype != at::kFloat && dtype != at::kDouble) ||
      weight.scalar_type() != dtype) {
    return false;
  }
  if (input.dim() != 4 || weight.dim() != 4 || !weight.is_contiguous() || weight.size(1) != input.size(1)) {
    return false;
  }
  const int64_t kernel = weight.size(-1);
  if (weight.size(-2) != kernel || kernel % 2 != 1) return false;
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         input.size(0) * input.size(2) * input.size(3) <= kPatchConvMaxPixels;
}

at::Tensor patch_conv(const at::Tensor& input, const at::Tensor& weight) {
  const Geometry g = geometry(input, weight);
  const at::Tensor patches = patches_of(input, g);
  return rows_as_map(at::mm(patches, swap_last_two(weight.view({weight.size(0), g.patch()}))), g);
}

std::tuple<at::Tensor, at::Tensor> patch_conv_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                                       const at::Tensor& weight) {
  const Geometry g = geometry(input, weight);
  const int64_t outputs = weight.size(0);
  // The output's gradient as (P, C') rows: a view when it is channels-last.
  const at::Tensor grad_rows = grad_out.permute({0, 2, 3, 1}).reshape({g.pixels(), outputs});
  const at::Tensor patches = patches_of(input, g);  // recomputed: a gather costs less than keeping it
  const at::Tensor grad_weight = at::mm(swap_last_two(grad_rows), patches).view(weight.sizes());
  const at::Tensor grad_patches = at::mm(grad_rows, weight.view({outputs, g.patch()}));
  at::Tensor grad_input = at::empty({g.pixels(), g.channels}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "scatter_patches", [&] {
    scatter_patches<scalar_t>(grad_patches.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), g);
  });
  return {rows_as_map(grad_input, g), grad_weight};
}

}  // namespace ipmt
