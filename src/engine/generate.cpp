#include "engine/generate.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace duo {

std::span<const int32_t> prefill_to_last_chunk(
    Model& model, KVCache& cache, std::span<const int32_t> prompt, int64_t chunk,
    const std::function<void(int64_t, int64_t)>& on_prefill) {
  const int64_t n = static_cast<int64_t>(prompt.size());
  check(n > 0, "empty prompt: nothing to run");
  check(chunk > 0, "--chunk must be positive, got ", chunk);
  const int64_t last = (n - 1) / chunk * chunk;  // start of the last chunk
  for (int64_t p = 0; p < last; p += chunk) {
    model.forward(prompt.subspan(static_cast<size_t>(p), static_cast<size_t>(chunk)), cache, 0);
    if (on_prefill) on_prefill(p + chunk, n);
  }
  return prompt.subspan(static_cast<size_t>(last));
}

GenerateResult generate(Model& model, KVCache& cache, std::span<const int32_t> prompt,
                        const GenerateOptions& opt, const GenerateCallbacks& cb) {
  using clock = std::chrono::steady_clock;
  const int64_t n = static_cast<int64_t>(prompt.size());
  check(n > 0, "empty prompt: nothing to run");
  check(opt.chunk > 0, "--chunk must be positive, got ", opt.chunk);
  check(opt.max_new_tokens >= 0, "-n must be >= 0, got ", opt.max_new_tokens);
  check(cache.length() == 0, "generate: the cache must start empty");
  const int64_t ctx = cache.spec().capacity;
  check(n <= ctx, "prompt is ", n, " tokens, longer than the context length -c ", ctx);
  check(n + opt.max_new_tokens <= ctx, "prompt (", n, " tokens) + -n ", opt.max_new_tokens,
        " exceeds the context length -c ", ctx);
  Sampler sampler(opt.sampling);
  // Greedy decoding takes the argmax on the backend (only the id is downloaded); sampling
  // downloads the logits row and draws on the host.
  const bool greedy = opt.sampling.temperature == 0.0f;
  auto step = [&](std::span<const int32_t> tokens) -> int32_t {
    if (greedy) return model.forward_greedy(tokens, cache);
    return sampler.sample(model.forward(tokens, cache, 1));
  };
  GenerateResult r;
  r.prompt_tokens = n;
  const auto t0 = clock::now();
  int32_t next = -1;
  const auto last = prefill_to_last_chunk(model, cache, prompt, opt.chunk, cb.on_prefill);
  if (opt.max_new_tokens > 0) {
    next = step(last);
  } else {
    model.forward(last, cache, 0);  // nothing to generate: no logits needed
  }
  if (cb.on_prefill) cb.on_prefill(n, n);
  const auto t1 = clock::now();
  r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  for (int64_t i = 0; i < opt.max_new_tokens; ++i) {
    r.tokens.push_back(next);
    if (cb.on_token) cb.on_token(next);
    if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), next) != opt.stop_ids.end()) {
      r.stopped = true;
      break;
    }
    if (i + 1 == opt.max_new_tokens || (cb.stop && cb.stop())) break;
    next = step(std::span<const int32_t>(&next, 1));
  }
  r.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  return r;
}

}  // namespace duo
