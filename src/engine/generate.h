// The generation loop: chunked prefill, then decode until max tokens or a stop token.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "engine/model.h"
#include "engine/sampler.h"

namespace duo {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  int64_t chunk = 32768;  // prefill chunk size (tokens per forward)
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // EOS ids
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids (the stop token, if hit, is included)
  int64_t prompt_tokens = 0;
  bool stopped = false;  // hit a stop id
  double prefill_seconds = 0;
  double decode_seconds = 0;  // from the first to the last generated token
};

struct GenerateCallbacks {
  std::function<void(int64_t done, int64_t total)> on_prefill;  // after each prefill chunk
  std::function<void(int32_t token)> on_token;                  // each generated token
  std::function<bool()> stop;                                   // checked after each token
};

// Chunked prefill of all of `prompt` (non-empty) but its last chunk of at most `chunk` tokens,
// which is returned for the caller to run itself and read its logits. on_prefill(done, total)
// follows each chunk run here.
std::span<const int32_t> prefill_to_last_chunk(
    Model& model, KVCache& cache, std::span<const int32_t> prompt, int64_t chunk,
    const std::function<void(int64_t, int64_t)>& on_prefill = {});

// Runs prompt (non-empty) through the model on a cache that must be empty and large enough for
// prompt + max_new_tokens (checked with a clear error).
GenerateResult generate(Model& model, KVCache& cache, std::span<const int32_t> prompt,
                        const GenerateOptions& opt, const GenerateCallbacks& cb = {});

}  // namespace duo
