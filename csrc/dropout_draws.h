// Dropout masks drawn on the CPU in one loop, the same masks at::bernoulli_ draws (dropout_draws.cpp).
//
// The ops draw every dropout mask as the Python compositions do, at::bernoulli_(1 - p) from the
// default generator, so that every backend drops the same units from one seed. On the CPU ATen's
// portable path draws one element at a time through TensorIterator and the generator's
// out-of-line random64(): at IPMT's published size the transformer's draws were half of what it
// spends outside convolutions and matrix products. The loops here take the same two words of the
// generator's mt19937 per element, make the same 53-bit uniform and compare it with the same
// probability, the words produced in bulk (the state update and output function vectorised, per
// instruction set): for IPMT's FFN masks at 473 px about 4x faster than drawing a word at a time
// as the engine does, itself 1.8x at::bernoulli_'s speed (NOTES.md, 2026-12-07). Where
// at::bernoulli_ draws otherwise (with MKL's generator on Intel CPUs), a check at first use finds
// the masks differ and the ops keep calling at::bernoulli_; with the CPU paths off (cpu_loops.h)
// they call it too, as on CUDA.
#pragma once

#include <ATen/ATen.h>

namespace ipmt {

// Whether the loop draws for tensors like `like`: on the CPU, the CPU paths enabled (cpu_loops.h)
// and at::bernoulli_ found to draw the same masks in this process.
bool dropout_draw_loop_applies(const at::Tensor& like);

// mask.bernoulli_(keep_probability) from the default CPU generator, for a contiguous bool tensor
// (a fresh one, or a block of rows of one).
void draw_keep_mask_into(at::Tensor& mask, double keep_probability);

// at::empty(shape, dtype).bernoulli_(keep_probability).mul_(scale) from the default CPU generator,
// `dtype` float32 or float64.
at::Tensor draw_keep_multiplier(at::IntArrayRef shape, at::ScalarType dtype, double keep_probability, double scale);

}  // namespace ipmt
