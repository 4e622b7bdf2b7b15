// mma.sync (sm_80+) helpers shared by the attention kernels: ldmatrix fragment loads from shared
// memory and the m16n8k16 bf16 -> fp32 tensor-core product.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/async_copy.cuh"

namespace duo::cuda {

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// B fragments of two n-tiles (n0..n0+15) x 16 k from a shared-memory tile stored [k][n] with a row
// stride of LDS elements (ldmatrix .trans).
template <int LDS>
__device__ __forceinline__ void load_b_kn(uint32_t* b, const __nv_bfloat16* s, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(b, s + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + n0 + (lane / 16) * 8);
}

// acc[16 x D] += P[16 x K] V[K][D]: P in accumulator-fragment form (p[K/8][4], as scores come out
// of mma), rounded to bf16 as the A operand; V a shared-memory tile with a row stride of LDS.
template <int D, int K, int LDS>
__device__ __forceinline__ void p_times_v(float (*acc)[4], const float (*p)[4],
                                          const __nv_bfloat16* v) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    a[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
    a[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
    a[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      load_b_kn<LDS>(b, v, kk * 16, dp * 16);
      mma_bf16(acc[2 * dp], a, b[0], b[1]);
      mma_bf16(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// One step of the base-2 online softmax for the two rows a thread holds in an m16 accumulator
// tile (FlashAttention-2): s[NT][4] holds this key tile's scores in log2 units (masked ones -inf),
// elements 0-1 of row a = lane / 4 and 2-3 of row b = a + 8. Updates the running row maxima m and
// sums l (this thread's share of l; the quad's shares are added at the end), turns s into
// unnormalised probabilities and rescales the output accumulator o[DT][4] by exp2(m_old - m_new).
template <int NT, int DT>
__device__ __forceinline__ void online_softmax_step(float (&s)[NT][4], float (&o)[DT][4],
                                                    float& m_a, float& m_b, float& l_a,
                                                    float& l_b) {
  float mx_a = m_a, mx_b = m_b;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
    mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
  }
  // Row maxima over the quad of lanes that shares a row.
  mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
  mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
  mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
  mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
  // A row with nothing visible yet keeps m = -inf; subtract 0 instead (exp2(-inf) = 0).
  const float base_a = mx_a == -INFINITY ? 0.0f : mx_a;
  const float base_b = mx_b == -INFINITY ? 0.0f : mx_b;
  const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
  m_a = mx_a;
  m_b = mx_b;
  float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    s[nt][0] = exp2f(s[nt][0] - base_a);
    s[nt][1] = exp2f(s[nt][1] - base_a);
    s[nt][2] = exp2f(s[nt][2] - base_b);
    s[nt][3] = exp2f(s[nt][3] - base_b);
    sum_a += s[nt][0] + s[nt][1];
    sum_b += s[nt][2] + s[nt][3];
  }
  l_a = l_a * alpha_a + sum_a;
  l_b = l_b * alpha_b + sum_b;
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    o[i][0] *= alpha_a;
    o[i][1] *= alpha_a;
    o[i][2] *= alpha_b;
    o[i][3] *= alpha_b;
  }
}

}  // namespace duo::cuda
