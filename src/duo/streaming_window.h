// Sink + ring index maths for streaming heads: the one place it is written.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DUO_HOST_DEVICE __host__ __device__
#else
#define DUO_HOST_DEVICE
#endif

namespace duo {

// Slot of absolute position j in a streaming store of S sinks + a ring of R: j < S -> j;
// j >= S -> S + (j - S) % R; -1 when R == 0 and j >= S (not stored).
DUO_HOST_DEVICE inline int64_t streaming_slot(int64_t j, int64_t S, int64_t R) {
  if (j < S) return j;
  if (R == 0) return -1;
  return S + (j - S) % R;
}

// Token-exact: query at t sees key j iff j <= t and (j < S or j > t - R).
DUO_HOST_DEVICE inline bool streaming_visible(int64_t t, int64_t j, int64_t S, int64_t R) {
  return j <= t && (j < S || j > t - R);
}

// The release's chunk mode: first chunk (chunk_start == 0) dense causal; later chunks see sinks,
// the last R cached tokens before the chunk, and the chunk itself causally.
DUO_HOST_DEVICE inline bool chunk_mode_visible(int64_t t, int64_t j, int64_t chunk_start, int64_t S,
                                               int64_t R) {
  if (j > t) return false;
  if (chunk_start == 0 || j >= chunk_start) return true;
  return j < S || j >= chunk_start - R;
}

}  // namespace duo
