// Launchers of the CUDA kernels of multi-scale deformable bilinear sampling. They take raw device
// pointers, the sizes, the level layout (by value) and a stream, so this header needs neither CUDA's
// nor PyTorch's CUDA headers. Every launcher returns a cudaError_t value (0 = success).
#pragma once

#include "ms_deform_sample.h"

// The same declaration as CUDA's driver_types.h, so callers need not include CUDA headers.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace ipmt {

// Storage dtype of value, locations, weights, output and gradients. Arithmetic is fp32 (fp64 for
// kFloat64).
enum class CudaDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

int ms_deform_sample_cuda_forward(CudaDtype dtype, const MsDeformSampleSizes& sizes, const LevelLayout& layout,
                                  bool fused_coordinate, const void* value, const void* sampling_locations,
                                  const void* attention_weights, void* output, cudaStream_t stream);

// grad_value_accumulator is float (double for kFloat64) of value's shape and must be zero on entry;
// grad_locations and grad_weights (storage dtype) are overwritten.
int ms_deform_sample_cuda_backward(CudaDtype dtype, const MsDeformSampleSizes& sizes, const LevelLayout& layout,
                                   bool fused_coordinate, const void* value, const void* sampling_locations,
                                   const void* attention_weights, const void* grad_output,
                                   void* grad_value_accumulator, void* grad_locations, void* grad_weights,
                                   cudaStream_t stream);

const char* cuda_error_string(int error);

}  // namespace ipmt
