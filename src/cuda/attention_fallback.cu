// TEMPORARY: the contract's functions (cuda/attention.h) forwarded to the naive kernels, so the
// backend links and runs before the fast kernels (attention_prefill.cu / attention_decode.cu)
// land. Delete this file when merging them.
#include "cuda/attention.h"
#include "cuda/attention_naive.h"

namespace duo::cuda {

int64_t attention_workspace_bytes(int64_t, int, int, int64_t, int) { return 0; }

void attention(const AttentionParams& p, cudaStream_t stream) { attention_naive(p, stream); }

void append_retrieval(const AttentionParams& p, __nv_bfloat16* retrieval_k,
                      __nv_bfloat16* retrieval_v, cudaStream_t stream) {
  append_retrieval_naive(p, retrieval_k, retrieval_v, stream);
}

void append_streaming(const AttentionParams& p, __nv_bfloat16* streaming_k,
                      __nv_bfloat16* streaming_v, cudaStream_t stream) {
  append_streaming_naive(p, streaming_k, streaming_v, stream);
}

}  // namespace duo::cuda
