// Dropout masks drawn in one loop (dropout_draws.h).
#include "dropout_draws.h"

#include "cpu_loops.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/core/MT19937RNGEngine.h>

#include <cmath>
#include <cstdint>
#include <mutex>

namespace ipmt {
namespace {

// The bits of a 64-bit draw that make a double uniform in [0, 1): its 53-bit mantissa's worth.
constexpr int kUniformBits = 53;
constexpr uint64_t kUniformMask = (uint64_t{1} << kUniformBits) - 1;
// The check at first use: elements drawn both ways, probability and seed (IPMT's dropout is 0.1).
constexpr int64_t kCheckElements = 4096;
constexpr double kCheckKeepProbability = 0.9;
constexpr uint64_t kCheckSeed = 20221107;

// Writes `kept` or `dropped` per element, kept where the generator's next uniform double
// (two 32-bit words, the first the high half; the low 53 bits over 2^53) is below
// keep_probability, as at::bernoulli_distribution<double> decides. In integers: u < p with
// u = k / 2^53 exactly is k < p 2^53, i.e. k < ceil(p 2^53).
template <typename T>
void draw(at::Generator generator, T* out, int64_t n, double keep_probability, T kept, T dropped) {
  const uint64_t threshold = static_cast<uint64_t>(std::ceil(std::ldexp(keep_probability, kUniformBits)));
  std::lock_guard<std::mutex> lock(generator.mutex());
  auto* cpu = at::check_generator<at::CPUGeneratorImpl>(generator);
  at::mt19937 engine = cpu->engine();
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t high = engine();
    const uint64_t low = engine();
    out[i] = (((high << 32) | low) & kUniformMask) < threshold ? kept : dropped;
  }
  cpu->set_engine(engine);
}

at::Tensor keep_mask(at::Generator generator, at::IntArrayRef shape, double keep_probability) {
  at::Tensor mask = at::empty(shape, at::TensorOptions().dtype(at::kBool));
  draw<bool>(generator, mask.data_ptr<bool>(), mask.numel(), keep_probability, true, false);
  return mask;
}

// Whether the loop and at::bernoulli_ draw the same mask from one seed and leave the generator in
// the same state (private generators: the default one is not touched).
bool loop_matches_aten() {
  at::Generator aten_generator = at::detail::createCPUGenerator(kCheckSeed);
  at::Generator loop_generator = at::detail::createCPUGenerator(kCheckSeed);
  const at::Tensor expected = at::empty({kCheckElements}, at::TensorOptions().dtype(at::kBool))
                                  .bernoulli_(kCheckKeepProbability, aten_generator);
  const at::Tensor drawn = keep_mask(loop_generator, {kCheckElements}, kCheckKeepProbability);
  const auto next = [](const at::Generator& generator) {
    return at::check_generator<at::CPUGeneratorImpl>(generator)->random();
  };
  return at::equal(expected, drawn) && next(aten_generator) == next(loop_generator);
}

}  // namespace

bool dropout_draw_loop_applies(const at::Tensor& like) {
  if (!like.is_cpu() || !cpu_paths_enabled()) return false;
  static const bool matches = loop_matches_aten();
  return matches;
}

at::Tensor draw_keep_mask(at::IntArrayRef shape, double keep_probability) {
  return keep_mask(at::detail::getDefaultCPUGenerator(), shape, keep_probability);
}

at::Tensor draw_keep_multiplier(at::IntArrayRef shape, at::ScalarType dtype, double keep_probability, double scale) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "draw_keep_multiplier: float32 or float64, got ", dtype);
  at::Tensor multiplier = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "draw_keep_multiplier", [&] {
    // bernoulli_ writes 1 and mul_(scale) multiplies by the scale rounded to the tensor's dtype.
    draw<scalar_t>(at::detail::getDefaultCPUGenerator(), multiplier.data_ptr<scalar_t>(), multiplier.numel(),
                   keep_probability, static_cast<scalar_t>(scale), scalar_t(0));
  });
  return multiplier;
}

}  // namespace ipmt
