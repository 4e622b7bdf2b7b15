#include "core/error.h"
#include "engine/backend.h"
#include "model/config.h"

namespace duo {

void validate_cache_spec(const CacheSpec& spec) {
  check(spec.num_layers > 0 && spec.num_kv_heads > 0 && spec.head_dim > 0 && spec.capacity > 0,
        "kv cache: layers, KV heads, head_dim and capacity must be positive");
  check(spec.capacity <= kMaxContext, "context of ", spec.capacity,
        " tokens is beyond duo's limit of ", kMaxContext, " (2^31)");
  check(spec.sink <= kMaxContext && spec.recent <= kMaxContext, "kv cache: sink (", spec.sink,
        ") and recent (", spec.recent, ") must be at most ", kMaxContext);
  check(static_cast<int64_t>(spec.num_retrieval.size()) == spec.num_layers,
        "kv cache: num_retrieval has ", spec.num_retrieval.size(), " entries, expected ",
        spec.num_layers);
  check(spec.sink >= 0 && spec.recent >= 0, "kv cache: sink and recent must be >= 0");
  bool any_streaming = false;
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    const int64_t r = spec.num_retrieval[l];
    check(r >= 0 && r <= spec.num_kv_heads, "kv cache: layer ", l, " has ", r,
          " retrieval heads, expected 0..", spec.num_kv_heads);
    any_streaming |= r < spec.num_kv_heads;
  }
  check(!any_streaming || spec.sink + spec.recent > 0,
        "kv cache: streaming heads need sink + recent >= 1 (both are 0)");
}

}  // namespace duo
