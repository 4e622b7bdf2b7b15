#include <cmath>

#include "core/error.h"
#include "cuda/attention_naive.h"
#include "cuda/cuda_check.h"
#include "duo/streaming_window.h"

namespace duo::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kMaxPerLane = 8;  // head_dim <= 32 * 8

struct KeyAddr {
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
};

// Where key j of KV head g lives during this call (the CPU's KeySource).
__device__ KeyAddr key_addr(const AttentionParams& p, int g, int64_t j) {
  const int64_t d = p.head_dim;
  if (j >= p.p0) {
    const int64_t off = (j - p.p0) * static_cast<int64_t>(p.num_kv_heads) * d + g * d;
    return {p.k_new + off, p.v_new + off};
  }
  if (g < p.num_retrieval) {
    const int64_t off = (static_cast<int64_t>(g) * p.capacity + j) * d;
    return {p.retrieval_k + off, p.retrieval_v + off};
  }
  const int64_t slot = streaming_slot(j, p.sink, p.recent);
  const int64_t off = (static_cast<int64_t>(g - p.num_retrieval) * p.slots + slot) * d;
  return {p.streaming_k + off, p.streaming_v + off};
}

__device__ bool key_visible(const AttentionParams& p, bool retrieval, int64_t t, int64_t j) {
  if (retrieval) return j >= 0 && j <= t;
  if (p.mode == StreamingMode::kExact) return streaming_visible(t, j, p.sink, p.recent);
  return chunk_mode_visible(t, j, p.p0, p.sink, p.recent);
}

// p0 from device memory when p.p0_device is set (graph replay): the kernels take p by value and
// overwrite their copy's p0 first.
__device__ void load_p0(AttentionParams& p) {
  if (p.p0_device != nullptr) p.p0 = *p.p0_device;
}

__global__ void attention_naive_kernel(AttentionParams p) {
  load_p0(p);
  const int64_t i = blockIdx.x;  // query row
  const int h = blockIdx.y;      // query head
  const int group = p.num_heads / p.num_kv_heads;
  const int g = h / group;
  const bool retrieval = g < p.num_retrieval;
  const int64_t t = p.p0 + i;
  const int d = p.head_dim;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  __shared__ float q_s[32 * kMaxPerLane];
  __shared__ float m_s[kWarps], l_s[kWarps];
  __shared__ float acc_s[kWarps][32 * kMaxPerLane];

  const __nv_bfloat16* q =
      p.q + i * static_cast<int64_t>(p.num_heads) * d + static_cast<int64_t>(h) * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) q_s[c] = __bfloat162float(q[c]);
  __syncthreads();

  // Candidate key ranges (a superset of the visible keys), as in the CPU's candidate_ranges.
  int64_t r0b = 0, r0e = t + 1, r1b = 0, r1e = 0;
  if (!retrieval && !(p.mode == StreamingMode::kChunk && p.p0 == 0)) {
    const int64_t sink_end = p.sink < t + 1 ? p.sink : t + 1;
    int64_t wb = p.mode == StreamingMode::kExact ? t - p.recent + 1 : p.p0 - p.recent;
    if (wb < sink_end) wb = sink_end;
    r0b = 0;
    r0e = sink_end;
    r1b = wb;
    r1e = wb <= t ? t + 1 : wb;
  }

  float m = -INFINITY, l = 0.0f;
  float acc[kMaxPerLane];
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) acc[e] = 0.0f;

  for (int range = 0; range < 2; ++range) {
    const int64_t b = range == 0 ? r0b : r1b, en = range == 0 ? r0e : r1e;
    for (int64_t j = b + warp; j < en; j += kWarps) {
      if (!key_visible(p, retrieval, t, j)) continue;  // uniform across the warp
      const KeyAddr a = key_addr(p, g, j);
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int c = lane + 32 * e;
        if (c < d) dot += q_s[c] * __bfloat162float(a.k[c]);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      const float s = dot * p.scale;
      const float m_new = fmaxf(m, s);
      const float corr = m == -INFINITY ? 0.0f : expf(m - m_new);
      const float pr = expf(s - m_new);
      l = l * corr + pr;
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int c = lane + 32 * e;
        if (c < d) acc[e] = acc[e] * corr + pr * __bfloat162float(a.v[c]);
      }
      m = m_new;
    }
  }
  if (lane == 0) {
    m_s[warp] = m;
    l_s[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int c = lane + 32 * e;
    if (c < d) acc_s[warp][c] = acc[e];
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w]);
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w)
    if (m_s[w] != -INFINITY) total += l_s[w] * expf(m_s[w] - mx);
  __nv_bfloat16* o =
      p.out + i * static_cast<int64_t>(p.num_heads) * d + static_cast<int64_t>(h) * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float v = 0.0f;
    for (int w = 0; w < kWarps; ++w)
      if (m_s[w] != -INFINITY) v += acc_s[w][c] * expf(m_s[w] - mx);
    o[c] = __float2bfloat16(total > 0.0f ? v / total : 0.0f);
  }
}

__global__ void append_retrieval_kernel(AttentionParams p, __nv_bfloat16* rk, __nv_bfloat16* rv) {
  load_p0(p);
  const int64_t i = blockIdx.x;
  const int g = blockIdx.y;  // < num_retrieval
  const int d = p.head_dim;
  const int64_t src = i * static_cast<int64_t>(p.num_kv_heads) * d + static_cast<int64_t>(g) * d;
  const int64_t dst = (static_cast<int64_t>(g) * p.capacity + p.p0 + i) * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    rk[dst + c] = p.k_new[src + c];
    rv[dst + c] = p.v_new[src + c];
  }
}

__global__ void append_streaming_kernel(AttentionParams p, __nv_bfloat16* sk, __nv_bfloat16* sv) {
  load_p0(p);
  const int64_t i = blockIdx.x;
  const int gs = blockIdx.y;  // streaming head index
  const int g = p.num_retrieval + gs;
  const int64_t j = p.p0 + i;
  // Only the tokens that stay held: sinks and the last `recent` of this call (others would be
  // overwritten within the call; skipping them also keeps every slot written by one block).
  if (j >= p.sink && j < p.p0 + p.n - p.recent) return;
  const int64_t slot = streaming_slot(j, p.sink, p.recent);
  if (slot < 0 || slot >= p.slots) return;
  const int d = p.head_dim;
  const int64_t src = i * static_cast<int64_t>(p.num_kv_heads) * d + static_cast<int64_t>(g) * d;
  const int64_t dst = (static_cast<int64_t>(gs) * p.slots + slot) * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    sk[dst + c] = p.k_new[src + c];
    sv[dst + c] = p.v_new[src + c];
  }
}

void check_params(const AttentionParams& p) {
  check(p.n >= 0 && p.p0 >= 0, "attention_naive: bad n ", p.n, " or p0 ", p.p0);
  check(p.head_dim > 0 && p.head_dim <= 32 * kMaxPerLane, "attention_naive: head_dim ", p.head_dim,
        " outside 1..", 32 * kMaxPerLane);
  check(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0, "attention_naive: ", p.num_heads,
        " query heads are not a multiple of ", p.num_kv_heads, " KV heads");
  check(p.num_retrieval >= 0 && p.num_retrieval <= p.num_kv_heads,
        "attention_naive: num_retrieval ", p.num_retrieval, " outside 0..", p.num_kv_heads);
  check(p.p0_device != nullptr || p.p0 + p.n <= p.capacity, "attention_naive: positions up to ",
        p.p0 + p.n, " exceed the capacity ", p.capacity);
  check(p.n <= 0x7fffffff && p.num_heads <= 65535, "attention_naive: grid too large");
}

}  // namespace

void attention_naive(const AttentionParams& p, cudaStream_t stream) {
  check_params(p);
  if (p.n == 0) return;
  dim3 grid(static_cast<unsigned>(p.n), static_cast<unsigned>(p.num_heads));
  attention_naive_kernel<<<grid, 32 * kWarps, 0, stream>>>(p);
  DUO_CUDA_CHECK(cudaGetLastError());
}

void append_retrieval_naive(const AttentionParams& p, __nv_bfloat16* retrieval_k,
                            __nv_bfloat16* retrieval_v, cudaStream_t stream) {
  check_params(p);
  if (p.n == 0 || p.num_retrieval == 0) return;
  dim3 grid(static_cast<unsigned>(p.n), static_cast<unsigned>(p.num_retrieval));
  append_retrieval_kernel<<<grid, 128, 0, stream>>>(p, retrieval_k, retrieval_v);
  DUO_CUDA_CHECK(cudaGetLastError());
}

void append_streaming_naive(const AttentionParams& p, __nv_bfloat16* streaming_k,
                            __nv_bfloat16* streaming_v, cudaStream_t stream) {
  check_params(p);
  const int num_streaming = p.num_kv_heads - p.num_retrieval;
  if (p.n == 0 || num_streaming == 0) return;
  dim3 grid(static_cast<unsigned>(p.n), static_cast<unsigned>(num_streaming));
  append_streaming_kernel<<<grid, 128, 0, stream>>>(p, streaming_k, streaming_v);
  DUO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace duo::cuda
