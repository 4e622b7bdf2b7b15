// Perplexity of a model on a text, and how far a head pattern moves the next-token distribution
// from full attention: KL(full || pattern) per token and top-token agreement (llama.cpp's
// perplexity --kl-divergence, with the full-attention model run beside the pattern in one pass).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/model.h"

namespace duo {

// How a text is cut into windows. Each window is the prefix (BOS, if the tokenizer adds one)
// followed by `body` text tokens, `ctx` tokens in all; windows do not overlap and each starts with
// an empty cache. Window positions first_target .. ctx-1 are scored, each predicted by the logits
// of the position before it, so the model has seen at least first_target tokens of context.
//
// Worked example: 10000 text tokens, BOS prefix (1 token), ctx 4096, first_target 2048:
// body 4095, windows 2 (text tokens 0..8189; the last 1810 are unused), 2048 scored per window
// (positions 2048..4095, predicted by positions 2047..4094); the forward pass runs positions
// 0..4094 (position 4095 is only a target).
struct PerplexityPlan {
  int64_t ctx = 0;
  int64_t prefix = 0;
  int64_t body = 0;
  int64_t windows = 0;
  int64_t first_target = 0;
  int64_t scored_per_window() const { return ctx - first_target; }
  // Text token index of window w's position p (p >= prefix).
  int64_t text_index(int64_t w, int64_t p) const { return w * body + p - prefix; }
};

// Throws Error naming the flag when ctx, first_target or the text length cannot make one window.
// max_windows = 0 takes every window the text holds.
PerplexityPlan plan_perplexity(int64_t text_tokens, int64_t prefix_tokens, int64_t ctx,
                               int64_t first_target, int64_t max_windows);

// One scored position: NLL of the target under the test logits and under the base logits,
// KL(base || test) of the two next-token distributions, and whether their argmax agrees (lowest id
// among equal logits). With test == base: kl == 0 and same_top.
struct TokenComparison {
  double nll_test = 0;
  double nll_base = 0;
  double kl = 0;
  bool same_top = false;
};
TokenComparison compare_next_token(const float* base, const float* test, int64_t vocab,
                                   int32_t target);

struct PerplexityWindow {
  int64_t index = 0;
  double nll = 0;       // mean over the window's scored tokens (test model)
  double base_nll = 0;  // with a base model
  double kl = 0;
  double same_top = 0;
};

struct PerplexityResult {
  PerplexityPlan plan;
  bool compared = false;  // a base model was given
  int64_t tokens = 0;     // scored tokens in all
  double nll = 0, nll_stderr = 0;
  double base_nll = 0, base_nll_stderr = 0;
  double kl = 0, kl_stderr = 0, kl_median = 0, kl_p99 = 0, kl_max = 0;
  double same_top = 0, same_top_stderr = 0;
  std::vector<PerplexityWindow> windows;
  double perplexity() const;
  double base_perplexity() const;
};

struct PerplexityOptions {
  int64_t ctx = 4096;
  int64_t first_target = -1;  // -1: ctx / 2 (the second half of each window is scored)
  int64_t max_windows = 0;    // 0: all
  int64_t chunk = 1024;       // prefill chunk (tokens per forward call)
  int64_t sink = 0, recent = 0;
  StreamingPrefill prefill = StreamingPrefill::kExact;
};

// Scores `text` (token ids, no BOS) with `test`; with `base` (the same checkpoint, full attention)
// also compares the two per token. `prefix` is prepended to every window (BOS or nothing).
// `progress(done, total)` is called after each window.
PerplexityResult evaluate_perplexity(Model& test, Model* base, const std::vector<int32_t>& text,
                                     const std::vector<int32_t>& prefix, const PerplexityOptions& o,
                                     const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace duo
