// Rotary position embeddings, computed exactly as transformers does (fp32 inverse frequencies,
// cos/sin of fp32 angles, rotate-half layout) for every supported rope_scaling type.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace duo {

struct RopeFrequencies {
  std::vector<float> inv_freq;     // [head_dim / 2]
  float attention_scaling = 1.0f;  // multiplies cos and sin (yarn)
};

// Inverse frequencies for a forward pass whose largest position + 1 is seq_len. Only the dynamic
// type depends on seq_len (transformers recomputes its base when seq_len >
// max_position_embeddings).
RopeFrequencies compute_rope_frequencies(const ModelConfig& c, int64_t seq_len);

// Tracks transformers' dynamic-NTK state across forward calls (grow when a call reaches past the
// largest length seen, reset below the original length); static for every other type.
class RopeState {
 public:
  explicit RopeState(const ModelConfig& c);
  // Frequencies for a call whose largest position is max_position.
  const RopeFrequencies& for_call(int64_t max_position);

 private:
  const ModelConfig* config_;
  RopeFrequencies original_;
  RopeFrequencies current_;
  int64_t max_seq_len_cached_;
};

// cos/sin for one position: out arrays of length head_dim / 2.
void rope_cos_sin(const RopeFrequencies& f, int64_t position, float* cos_out, float* sin_out);

// Rotates one head vector x[head_dim] in place (rotate_half: pairs (i, i + d/2)).
void rope_rotate(float* x, int64_t head_dim, const float* cos, const float* sin);

}  // namespace duo
