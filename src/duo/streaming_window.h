// The one place for the index maths of streaming heads: which slot of the constant-size streaming
// store a token lives in, which absolute position a slot holds, and which keys a query may see.
// Header-only, no allocation, plain int64_t arguments: usable from host code and CUDA kernels.
//
// Notation: S = sink size (first S tokens are kept forever), R = recent size (a ring of the last R
// tokens), positions are absolute 0-based token indices, n_tokens = tokens appended so far.
// Callers guarantee S >= 0 and R >= 0 (validated on the host; nothing here throws).
//
// Streaming store layout (capacity S + R slots):
//   position j <  S            -> slot j                      (sink slots 0..S-1)
//   position j >= S, R > 0     -> slot S + (j - S) % R        (ring slots S..S+R-1)
//   position j >= S, R == 0    -> not stored (slot -1)
// After n_tokens appends, slot s holds the most recent position that maps to it, if any.
//
// Token-exact visibility (our default, identical in prefill and decode, chunk-size invariant):
//   a streaming-head query at position t sees key j  iff  j <= t and (j < S or j > t - R).
//   For t < S + R this is simply 0..t. The keys visible at t are exactly the store's contents after
//   t + 1 appends (see streaming_slot / slot_position), so decode reads the whole store.
//
// Chunk-compat visibility (reproduces the authors' release, duoattention.md section 3): prefill
// runs in chunks; a chunk covers positions [chunk_start, chunk_end). For a query at t in that
// chunk:
//   chunk_start == 0 (first chunk): key j visible iff j <= t (dense causal, every head).
//   chunk_start  > 0: for j >= chunk_start: visible iff j <= t (causal inside the chunk, dense);
//                     for j <  chunk_start: visible iff j < S or j >= chunk_start - R
//                     (the sinks plus the last R tokens cached before the chunk).
//   So results depend on the chunk size. Decode (one-token chunks, chunk_start == t > 0) then sees
//   sinks + positions t-R..t, i.e. R+1 recent keys plus the sinks (S + R + 1 keys at most).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DUO_HOST_DEVICE __host__ __device__
#else
#define DUO_HOST_DEVICE
#endif

namespace duo {

// Capacity of a streaming store in slots.
DUO_HOST_DEVICE constexpr int64_t streaming_capacity(int64_t S, int64_t R) {
  return S + R;
}

// Slot that absolute position j occupies, or -1 when j is never stored (j < 0, or j >= S and R ==
// 0).
DUO_HOST_DEVICE constexpr int64_t streaming_slot(int64_t j, int64_t S, int64_t R) {
  if (j < 0) return -1;
  if (j < S) return j;
  if (R <= 0) return -1;
  return S + (j - S) % R;
}

// Slots in use after n_tokens appends: min(n, S + R).
DUO_HOST_DEVICE constexpr int64_t streaming_store_len(int64_t n_tokens, int64_t S, int64_t R) {
  if (n_tokens <= 0) return 0;
  return n_tokens < S + R ? n_tokens : S + R;
}

// Absolute position held by `slot` after n_tokens appends (positions 0..n_tokens-1), or -1 when the
// slot is empty or out of range.
DUO_HOST_DEVICE constexpr int64_t slot_position(int64_t slot, int64_t n_tokens, int64_t S,
                                                int64_t R) {
  if (slot < 0 || slot >= S + R || n_tokens <= 0) return -1;
  if (slot < S) return slot < n_tokens ? slot : -1;
  // Ring slot: offset o = slot - S holds positions S + o, S + o + R, S + o + 2R, ...; the latest
  // one below n_tokens.
  const int64_t o = slot - S;
  const int64_t first = S + o;
  if (first >= n_tokens) return -1;
  const int64_t k = (n_tokens - 1 - first) / R;
  return first + k * R;
}

// Token-exact visibility for a streaming head: query at t sees key j.
DUO_HOST_DEVICE constexpr bool streaming_visible(int64_t t, int64_t j, int64_t S, int64_t R) {
  if (j < 0 || j > t) return false;
  return j < S || j > t - R;
}

// Number of keys a streaming-head query at t sees under streaming_visible.
DUO_HOST_DEVICE constexpr int64_t streaming_visible_count(int64_t t, int64_t S, int64_t R) {
  if (t < 0) return 0;
  const int64_t n = t + 1;
  return n < S + R ? n : S + R;
}

// Chunk-compat visibility (the release's prefill): see the header comment.
DUO_HOST_DEVICE constexpr bool chunk_mode_visible(int64_t t, int64_t j, int64_t chunk_start,
                                                  int64_t S, int64_t R) {
  if (j < 0 || j > t) return false;
  if (chunk_start <= 0) return true;
  if (j >= chunk_start) return true;
  return j < S || j >= chunk_start - R;
}

}  // namespace duo
