// Dropout masks drawn in one loop (dropout_draws.h).
#include "dropout_draws.h"

#include "cpu_loops.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/core/MT19937RNGEngine.h>

#include <algorithm>
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

// The hot loops below are integer-only, so every instruction set computes the same bits: built by
// GCC 12 or later on x86-64 Linux they are compiled for x86-64-v4 (AVX-512) and v3 (AVX2) besides
// the portable baseline and the loader picks the best the CPU has (4.1M draws: 12 ms one word at a
// time, 5.8 ms in bulk on the baseline, 3.1 ms with AVX-512; NOTES.md, 2026-12-07). Older GCCs
// do not take these names in target_clones; other compilers build the baseline only.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define IPMT_PER_ISA __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IPMT_PER_ISA
#endif

// Elements decided per pass: their words (two each) fit a stack buffer that stays in L1.
constexpr int64_t kChunk = 1024;

// at::mt19937's state update (its next_state), in three loops free of loop-carried dependences
// within a vector's width, so that the compiler vectorises them.
inline uint32_t twist_word(uint32_t u, uint32_t v) {
  return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ ((v & 1) ? at::MATRIX_A : 0);
}

inline void twist(uint32_t* s) {
  constexpr int n = at::MERSENNE_STATE_N, m = at::MERSENNE_STATE_M;
  for (int i = 0; i < n - m; ++i) s[i] = s[i + m] ^ twist_word(s[i], s[i + 1]);
  for (int i = n - m; i < n - 1; ++i) s[i] = s[i + m - n] ^ twist_word(s[i], s[i + 1]);
  s[n - 1] = s[m - 1] ^ twist_word(s[n - 1], s[0]);
}

// at::mt19937's output function over `count` state words.
inline void temper(const uint32_t* __restrict state, uint32_t* __restrict out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t y = state[i];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= (y >> 18);
    out[i] = y;
  }
}

// Writes the `count` words that `count` calls of the engine whose state is `pod` would return, and
// leaves `pod` as they would. The engine twists when a call finds left_ == 1 (after seeding, or
// after the 624th word of a state), then returns state_[0] with left_ = 624, next_ = 1: the same
// as a twist that sets left_ = 625, next_ = 0, followed by taking one word.
inline void next_words(at::mt19937_data_pod& pod, uint32_t* out, int64_t count) {
  while (count > 0) {
    if (pod.left_ == 1) {
      twist(pod.state_.data());
      pod.left_ = at::MERSENNE_STATE_N + 1;
      pod.next_ = 0;
    }
    const int64_t taken = std::min<int64_t>(count, pod.left_ - 1);
    temper(pod.state_.data() + pod.next_, out, taken);
    pod.next_ += taken;
    pod.left_ -= taken;
    out += taken;
    count -= taken;
  }
}

// keep[i] for the next `count` elements: kept where the generator's next uniform double (two
// 32-bit words, the first the high half; the low 53 bits over 2^53) is below the keep probability,
// as at::bernoulli_distribution<double> decides. In integers: u < p with u = k / 2^53 exactly is
// k < p 2^53, i.e. k < threshold = ceil(p 2^53).
IPMT_PER_ISA void draw_keep_flags(at::mt19937_data_pod& pod, bool* keep, int64_t count, uint64_t threshold) {
  uint32_t words[2 * kChunk];
  for (int64_t start = 0; start < count; start += kChunk) {
    const int64_t chunk = std::min(kChunk, count - start);
    next_words(pod, words, 2 * chunk);
    for (int64_t i = 0; i < chunk; ++i) {
      const uint64_t k = ((uint64_t{words[2 * i]} << 32) | words[2 * i + 1]) & kUniformMask;
      keep[start + i] = k < threshold;
    }
  }
}

// Runs draw_with(pod, threshold) on a copy of `generator`'s engine state, under its lock, and
// stores the state back: draw_with draws its elements through draw_keep_flags, which advances the
// state as at::bernoulli_ drawing as many elements would.
template <typename DrawWith>
void draw(at::Generator generator, double keep_probability, DrawWith draw_with) {
  const uint64_t threshold = static_cast<uint64_t>(std::ceil(std::ldexp(keep_probability, kUniformBits)));
  std::lock_guard<std::mutex> lock(generator.mutex());
  auto* cpu = at::check_generator<at::CPUGeneratorImpl>(generator);
  at::mt19937 engine = cpu->engine();
  at::mt19937_data_pod pod = engine.data();
  draw_with(pod, threshold);
  engine.set_data(pod);
  cpu->set_engine(engine);
}

void fill_keep_mask(at::Generator generator, at::Tensor& mask, double keep_probability) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(), "a keep mask is a contiguous bool tensor");
  draw(generator, keep_probability, [&](at::mt19937_data_pod& pod, uint64_t threshold) {
    draw_keep_flags(pod, mask.data_ptr<bool>(), mask.numel(), threshold);
  });
}

// Whether the loop and at::bernoulli_ draw the same mask from one seed and leave the generator in
// the same state (private generators: the default one is not touched).
bool loop_matches_aten() {
  at::Generator aten_generator = at::detail::createCPUGenerator(kCheckSeed);
  at::Generator loop_generator = at::detail::createCPUGenerator(kCheckSeed);
  const at::Tensor expected = at::empty({kCheckElements}, at::TensorOptions().dtype(at::kBool))
                                  .bernoulli_(kCheckKeepProbability, aten_generator);
  at::Tensor drawn = at::empty({kCheckElements}, at::TensorOptions().dtype(at::kBool));
  fill_keep_mask(loop_generator, drawn, kCheckKeepProbability);
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

void draw_keep_mask_into(at::Tensor& mask, double keep_probability) {
  fill_keep_mask(at::detail::getDefaultCPUGenerator(), mask, keep_probability);
}

at::Tensor draw_keep_multiplier(at::IntArrayRef shape, at::ScalarType dtype, double keep_probability, double scale) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "draw_keep_multiplier: float32 or float64, got ", dtype);
  at::Tensor multiplier = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "draw_keep_multiplier", [&] {
    // bernoulli_ writes 1 and mul_(scale) multiplies by the scale rounded to the tensor's dtype.
    const scalar_t kept = static_cast<scalar_t>(scale);
    scalar_t* out = multiplier.data_ptr<scalar_t>();
    const int64_t n = multiplier.numel();
    draw(at::detail::getDefaultCPUGenerator(), keep_probability, [&](at::mt19937_data_pod& pod, uint64_t threshold) {
      bool keep[kChunk];
      for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t chunk = std::min(kChunk, n - start);
        draw_keep_flags(pod, keep, chunk, threshold);
        for (int64_t i = 0; i < chunk; ++i) out[start + i] = keep[i] ? kept : scalar_t(0);
      }
    });
  });
  return multiplier;
}

}  // namespace ipmt
