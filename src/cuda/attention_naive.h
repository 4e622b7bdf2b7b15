// Simple, obviously-correct DuoAttention kernels with the contract of cuda/attention.h: the test
// oracle for the fast kernels, and the fallback the backend uses until those are linked
// (attention_fallback.cu forwards the contract's functions here). fp32 throughout; one block per
// (query, head); each warp walks a strided share of the visible keys with an online softmax, lanes
// split the head dimension; the warps are merged at the end. Any head_dim <= 256.
#pragma once

#include "cuda/attention.h"

namespace duo::cuda {

void attention_naive(const AttentionParams& p, cudaStream_t stream);
void append_retrieval_naive(const AttentionParams& p, __nv_bfloat16* retrieval_k,
                            __nv_bfloat16* retrieval_v, cudaStream_t stream);
void append_streaming_naive(const AttentionParams& p, __nv_bfloat16* streaming_k,
                            __nv_bfloat16* streaming_v, cudaStream_t stream);

}  // namespace duo::cuda
