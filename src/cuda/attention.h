// DuoAttention kernels on the GPU: the contract between the CUDA backend (cuda_backend.cu) and
// the attention kernels (attention_prefill.cu, attention_decode.cu). Semantics are exactly the CPU
// reference's (engine/cpu_backend.cpp, duo/streaming_window.h):
//   - retrieval KV head, query at absolute position t: keys 0..t
//   - streaming KV head, token-exact: keys {j < S} U {t - R < j <= t}
//   - streaming KV head, chunk mode (release compat), chunk starting at p0: if p0 == 0 keys 0..t;
//     else {j < S} U {p0 - R <= j < p0} U {p0 <= j <= t}
// Layout per layer (after head reordering): KV heads [0, num_retrieval) are retrieval heads,
// [num_retrieval, num_kv_heads) streaming; query head h belongs to KV head h / group.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace duo::cuda {

enum class StreamingMode : int { kExact = 0, kChunk = 1 };

struct AttentionParams {
  // New tokens of this call: n tokens at absolute positions p0 .. p0 + n - 1.
  const __nv_bfloat16* q;      // [n, num_heads * head_dim], RoPE applied
  const __nv_bfloat16* k_new;  // [n, num_kv_heads * head_dim], RoPE applied
  const __nv_bfloat16* v_new;  // [n, num_kv_heads * head_dim]
  __nv_bfloat16* out;          // [n, num_heads * head_dim]
  int64_t n;
  int64_t p0;
  int num_heads;
  int num_kv_heads;
  int num_retrieval;  // KV heads [0, num_retrieval) are retrieval heads
  int head_dim;       // 64 or 128 (kernels may require one of these; the backend checks)
  float scale;        // 1 / sqrt(head_dim)
  // Retrieval store: K/V [num_retrieval][capacity][head_dim]; position j at row j. The backend
  // appends the n new tokens BEFORE calling attention, so rows 0 .. p0 + n - 1 are valid.
  const __nv_bfloat16* retrieval_k;
  const __nv_bfloat16* retrieval_v;
  int64_t capacity;
  // Streaming store: K/V [num_kv_heads - num_retrieval][slots][head_dim], slots = min(capacity,
  // sink + recent); position j at streaming_slot(j, sink, recent). Holds positions < p0 only (the
  // backend appends the new tokens AFTER attention); the new tokens are read from k_new / v_new.
  const __nv_bfloat16* streaming_k;
  const __nv_bfloat16* streaming_v;
  int64_t slots;
  int64_t sink;
  int64_t recent;
  StreamingMode mode;
  // Scratch for split-KV decode (may be null for prefill): floats, see attention_workspace_bytes.
  float* workspace;
  int64_t workspace_bytes;
  // Optional (added at the end, backward compatible): when non-null, every kernel of attention()
  // and of the append functions reads the chunk start p0 from this device address instead of
  // from `p0` above, so a captured CUDA graph can be replayed while p0 advances. Launch
  // configurations never depend on p0 (decode: grid fixed by capacity, workspace and SM count;
  // empty splits exit early), so the captured graph stays valid. With it set, the host-side check
  // p0 + n <= capacity is skipped: the caller guarantees it.
  const int64_t* p0_device = nullptr;
};

// Bytes of workspace attention() needs for these shapes (0 if none). Implementation: the size for
// the split-KV decode path (n == 1) whatever n is, so one buffer serves prefill and decode:
// splits * num_heads * (head_dim + 2) floats, splits = min(num_sms, ceil(max_context / 256)).
// attention() with n == 1 runs the split-KV decode kernels with min(splits that fit the given
// workspace, that number, one wave of blocks over the retrieval heads) splits; with no or too small
// a workspace it falls back to the prefill kernel (correct, slower). Also warms the kernels'
// occupancy cache, so call it before capturing a graph.
int64_t attention_workspace_bytes(int64_t n, int num_heads, int head_dim, int64_t max_context,
                                  int num_sms);

// One launch (or a fixed small number) per layer covering both head types. Checks arguments and
// throws duo::Error on unsupported shapes. Asynchronous on `stream`.
void attention(const AttentionParams& p, cudaStream_t stream);

// attention() then append_streaming() (the streaming store is read before it is written): on the
// split-KV decode path (n == 1) the append runs inside the merge kernel, one launch fewer.
// Bitwise the same as the two calls.
void attention_append_streaming(const AttentionParams& p, __nv_bfloat16* streaming_k,
                                __nv_bfloat16* streaming_v, cudaStream_t stream);

// Copies the n new tokens' K/V of retrieval heads into the retrieval store at rows p0 .. p0+n-1.
void append_retrieval(const AttentionParams& p, __nv_bfloat16* retrieval_k,
                      __nv_bfloat16* retrieval_v, cudaStream_t stream);
// Copies the new tokens that stay held (sinks and the last `recent`) of streaming heads into
// their streaming store slots.
void append_streaming(const AttentionParams& p, __nv_bfloat16* streaming_k,
                      __nv_bfloat16* streaming_v, cudaStream_t stream);

}  // namespace duo::cuda
