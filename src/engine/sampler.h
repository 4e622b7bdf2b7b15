// Next-token choice from logits: greedy, or temperature -> top-k -> top-p -> draw (transformers'
// order), with a seeded generator so runs repeat.
#pragma once

#include <cstdint>
#include <random>
#include <span>

namespace duo {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int64_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  uint64_t seed = 0;
};

// Throws duo::Error for absurd values (negative temperature, top_p outside (0, 1], top_k < 0).
void validate(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int32_t sample(std::span<const float> logits);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

}  // namespace duo
