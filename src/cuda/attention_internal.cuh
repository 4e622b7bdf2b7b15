// Internal to the attention kernels (attention_*.cu): the kernel-side argument block, the key
// sources (which store row / new-token row holds position j of a KV head), candidate key ranges
// and the visibility rule, all shared by the prefill, decode and append kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention.h"
#include "duo/streaming_window.h"

namespace duo::cuda::detail {

using bf16 = __nv_bfloat16;

// Trivially copyable kernel argument (passed by value).
struct KArgs {
  const bf16* q;
  const bf16* k_new;
  const bf16* v_new;
  bf16* out;
  int64_t n;
  int64_t p0;
  const int64_t* p0_ptr;  // optional: p0 read from device memory (graph replay)
  int num_heads;
  int num_kv_heads;
  int num_retrieval;
  int group;         // num_heads / num_kv_heads
  float scale_log2;  // scale * log2(e)
  const bf16* rk;
  const bf16* rv;
  int64_t capacity;
  const bf16* sk;
  const bf16* sv;
  int64_t slots;
  int64_t S;
  int64_t R;
  int chunk_mode;  // StreamingMode::kChunk
};

KArgs make_kargs(const AttentionParams& p);
// Host-side validation shared by attention() and the append functions; throws duo::Error.
void validate(const AttentionParams& p, bool for_attention);
int device_num_sms();
void launch_prefill(const KArgs& a, int head_dim, cudaStream_t stream);
// Hopper wgmma prefill (attention_prefill_sm90.cu): whether it handles this call (sm_90a build,
// compute capability 9.x device, head_dim 128, n large enough or DUO_ATTN_SM90=1), and its launch.
bool prefill_sm90_eligible(int64_t n, int head_dim);
void launch_prefill_sm90(const KArgs& a, cudaStream_t stream);

__device__ __forceinline__ int64_t load_p0(const KArgs& a) {
  return a.p0_ptr != nullptr ? *a.p0_ptr : a.p0;
}

// Row of position j for KV head g (K if !is_v else V). Retrieval heads read the retrieval store
// (the new tokens are already appended there); streaming heads read the streaming store for
// j < p0 and the new-token tensors for j >= p0.
template <int D>
__device__ __forceinline__ const bf16* key_row(const KArgs& a, int g, bool retrieval, int64_t j,
                                               int64_t p0, bool is_v) {
  if (retrieval) return (is_v ? a.rv : a.rk) + (static_cast<int64_t>(g) * a.capacity + j) * D;
  if (j >= p0) {
    return (is_v ? a.v_new : a.k_new) + (j - p0) * static_cast<int64_t>(a.num_kv_heads) * D +
           static_cast<int64_t>(g) * D;
  }
  const int64_t slot = ::duo::streaming_slot(j, a.S, a.R);
  return (is_v ? a.sv : a.sk) + (static_cast<int64_t>(g - a.num_retrieval) * a.slots + slot) * D;
}

__device__ __forceinline__ bool key_visible(const KArgs& a, bool retrieval, int64_t t, int64_t j,
                                            int64_t p0) {
  if (retrieval) return j >= 0 && j <= t;
  if (a.chunk_mode) return ::duo::chunk_mode_visible(t, j, p0, a.S, a.R);
  return ::duo::streaming_visible(t, j, a.S, a.R);
}

// Candidate key positions for queries t0..t1 (a superset of what each may see), as at most two
// ascending, disjoint half-open ranges [b[i], e[i]). Mirrors cpu_backend.cpp candidate_ranges.
// Returns the number of ranges.
__device__ __forceinline__ int candidate_ranges(const KArgs& a, bool retrieval, int64_t t0,
                                                int64_t t1, int64_t p0, int64_t* b, int64_t* e) {
  if (retrieval || (a.chunk_mode && p0 == 0)) {
    b[0] = 0;
    e[0] = t1 + 1;
    return 1;
  }
  const int64_t sink_end = a.S < t1 + 1 ? a.S : t1 + 1;
  int64_t win_begin = a.chunk_mode ? p0 - a.R : t0 - a.R + 1;
  if (win_begin < sink_end) win_begin = sink_end;
  // Constant indices only (keeps b / e in registers).
  const bool has_sink = sink_end > 0, has_win = win_begin <= t1;
  b[0] = has_sink ? 0 : win_begin;
  e[0] = has_sink ? sink_end : t1 + 1;
  b[1] = win_begin;
  e[1] = t1 + 1;
  const int nr = (has_sink ? 1 : 0) + (has_win ? 1 : 0);
  return nr;
}

}  // namespace duo::cuda::detail
