// append_retrieval / append_streaming: copy the n new tokens' K/V (16-byte chunks) into the stores.
// Retrieval heads: all n tokens, rows p0 .. p0+n-1. Streaming heads: only tokens that stay held
// after the chunk (j < S, or j >= p0 + n - R), at streaming_slot(j, S, R); so no two written tokens
// share a slot and the result does not depend on write order. p0 may come from device memory.
#include <cuda_bf16.h>

#include <cstdint>

#include "core/error.h"
#include "cuda/attention_internal.cuh"
#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"

namespace duo::cuda {
namespace detail {
namespace {

// grid.x covers n * heads * (D/8) chunks; `streaming` selects which heads / rows.
__global__ void append_kernel(const KArgs a, int head_dim, bool streaming, bf16* dk, bf16* dv) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  const int cpr = head_dim / 8;
  const int first = streaming ? a.num_retrieval : 0;
  const int heads = streaming ? a.num_kv_heads - a.num_retrieval : a.num_retrieval;
  const int64_t total = a.n * heads * cpr;
  const int64_t p0 = load_p0(a);
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < total;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>(c % cpr) * 8;
    const int hh = static_cast<int>((c / cpr) % heads);
    const int64_t i = c / (static_cast<int64_t>(cpr) * heads);
    const int64_t j = p0 + i;
    int64_t row;
    if (streaming) {
      if (j >= a.S && j < p0 + a.n - a.R) continue;  // overwritten within this chunk anyway
      row = ::duo::streaming_slot(j, a.S, a.R);
      if (row < 0 || row >= a.slots) continue;
      row += static_cast<int64_t>(hh) * a.slots;
    } else {
      row = static_cast<int64_t>(hh) * a.capacity + j;
    }
    const int64_t src = i * static_cast<int64_t>(a.num_kv_heads) * head_dim +
                        static_cast<int64_t>(first + hh) * head_dim + col;
    *reinterpret_cast<uint4*>(dk + row * head_dim + col) =
        *reinterpret_cast<const uint4*>(a.k_new + src);
    *reinterpret_cast<uint4*>(dv + row * head_dim + col) =
        *reinterpret_cast<const uint4*>(a.v_new + src);
  }
}

void launch_append(const AttentionParams& p, bool streaming, bf16* dk, bf16* dv,
                   cudaStream_t stream) {
  validate(p, false);
  const int heads = streaming ? p.num_kv_heads - p.num_retrieval : p.num_retrieval;
  if (p.n == 0 || heads == 0) return;
  if (streaming && p.slots == 0) return;
  check(dk != nullptr && dv != nullptr && (reinterpret_cast<uintptr_t>(dk) & 15u) == 0 &&
            (reinterpret_cast<uintptr_t>(dv) & 15u) == 0,
        "append: destination store null or not 16-byte aligned");
  const int64_t total = p.n * heads * (p.head_dim / 8);
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  launch_pdl(append_kernel, static_cast<unsigned>(blocks), threads, 0, stream, make_kargs(p),
             p.head_dim, streaming, dk, dv);
}

}  // namespace
}  // namespace detail

void append_retrieval(const AttentionParams& p, __nv_bfloat16* retrieval_k,
                      __nv_bfloat16* retrieval_v, cudaStream_t stream) {
  detail::launch_append(p, false, retrieval_k, retrieval_v, stream);
}

void append_streaming(const AttentionParams& p, __nv_bfloat16* streaming_k,
                      __nv_bfloat16* streaming_v, cudaStream_t stream) {
  detail::launch_append(p, true, streaming_k, streaming_v, stream);
}

}  // namespace duo::cuda
