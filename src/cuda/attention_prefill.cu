// Prefill attention (any n >= 1): FlashAttention-2 style, one launch per layer for both head types.
//
// Grid (query tiles, query heads); a block of WARPS warps owns BM = 16 * WARPS query rows of one
// query head; each warp owns 16 rows. Keys are walked in tiles of BN = 64 positions over the
// candidate ranges of the tile's queries (retrieval: 0..t1; streaming: sinks, then the window), so
// a streaming head costs O(n * (S + R)). Each key row is gathered (cp.async, 16 bytes, zero-filled
// past the range end) from wherever its position lives (retrieval store row j, streaming store slot
// streaming_slot(j), or the new-token tensors), double-buffered in shared memory. Scores and P*V
// use mma.sync m16n8k16 bf16 -> fp32 (sm_80 and sm_90); ldmatrix(.trans) feeds the fragments; rows
// are padded by 16 bytes so ldmatrix is bank-conflict free. Masks are evaluated per element only on
// tiles that need them (causal diagonal / range end for retrieval; always for streaming tiles).
// On Hopper (sm_90a builds, compute capability 9.x), head_dim 128 and n >= 1024 go to the wgmma
// kernel in attention_prefill_sm90.cu instead (same semantics; DUO_ATTN_SM90=0|1 forces the
// choice).
#include <cuda_bf16.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "core/error.h"
#include "cuda/async_copy.cuh"
#include "cuda/attention_internal.cuh"
#include "cuda/cuda_check.h"
#include "cuda/mma_bf16.cuh"

namespace duo::cuda::detail {
namespace {

constexpr int kBN = 64;

template <int D, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) prefill_kernel(const KArgs a) {
  constexpr int BM = 16 * WARPS;
  constexpr int LDS = D + 8;   // padded row (elements)
  constexpr int NT = kBN / 8;  // score n-tiles per warp
  constexpr int KD = D / 16;   // k-steps over head_dim
  constexpr int THREADS = WARPS * 32;
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + BM * LDS;       // [2][kBN][LDS]
  bf16* sV = sK + 2 * kBN * LDS;  // [2][kBN][LDS]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t p0 = load_p0(a);
  const int64_t n = a.n;
  const int num_qt = static_cast<int>((n + BM - 1) / BM);
  const int qt = num_qt - 1 - static_cast<int>(blockIdx.x);  // longest tiles first
  const int h = blockIdx.y;
  const int g = h / a.group;
  const bool retrieval = g < a.num_retrieval;
  const int64_t i0 = static_cast<int64_t>(qt) * BM;
  const int64_t i1 = i0 + BM < n ? i0 + BM : n;
  const int64_t t0 = p0 + i0, t1 = p0 + i1 - 1;

  int64_t rb[2], re[2];
  const int nr = candidate_ranges(a, retrieval, t0, t1, p0, rb, re);
  int nt_r[2];
  nt_r[0] = nr > 0 ? static_cast<int>((re[0] - rb[0] + kBN - 1) / kBN) : 0;
  nt_r[1] = nr > 1 ? static_cast<int>((re[1] - rb[1] + kBN - 1) / kBN) : 0;
  const int ntiles = nt_r[0] + nt_r[1];

  const int64_t q_stride = static_cast<int64_t>(a.num_heads) * D;
  // Q tile -> shared (rows >= n zero-filled).
  for (int c = tid; c < BM * CPR; c += THREADS) {
    const int row = c / CPR, col = (c % CPR) * 8;
    const int64_t i = i0 + row;
    const bool ok = i < n;
    const bf16* src = a.q + (ok ? i : 0) * q_stride + static_cast<int64_t>(h) * D + col;
    cp_async16(sQ + row * LDS + col, src, ok);
  }

  auto tile_base = [&](int k, int64_t& base, int64_t& end) {
    if (k < nt_r[0]) {
      base = rb[0] + static_cast<int64_t>(k) * kBN;
      end = re[0];
    } else {
      base = rb[1] + static_cast<int64_t>(k - nt_r[0]) * kBN;
      end = re[1];
    }
  };
  auto load_tile = [&](int k, int buf) {
    int64_t base, end;
    tile_base(k, base, end);
    bf16* dk = sK + buf * kBN * LDS;
    bf16* dv = sV + buf * kBN * LDS;
    for (int c = tid; c < kBN * CPR; c += THREADS) {
      const int row = c / CPR, col = (c % CPR) * 8;
      const int64_t j = base + row;
      const bool ok = j < end;
      const int64_t jj = ok ? j : 0;
      const bf16* ks = ok ? key_row<D>(a, g, retrieval, jj, p0, false) + col : a.q;
      const bf16* vs = ok ? key_row<D>(a, g, retrieval, jj, p0, true) + col : a.q;
      cp_async16(dk + row * LDS + col, ks, ok);
      cp_async16(dv + row * LDS + col, vs, ok);
    }
  };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  uint32_t qf[KD][4];

  if (ntiles > 0) load_tile(0, 0);
  cp_async_commit();  // group 0: Q (+ tile 0)

  const int64_t ta = p0 + i0 + warp * 16 + lane / 4;  // query position of this thread's row a
  const int64_t tb = ta + 8;

  for (int k = 0; k < ntiles; ++k) {
    const int buf = k & 1;
    if (k + 1 < ntiles) {
      load_tile(k + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (k == 0) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk)
        ldmatrix_x4(qf[kk], sQ + (warp * 16 + lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
    }
    const bf16* cK = sK + buf * kBN * LDS;
    const bf16* cV = sV + buf * kBN * LDS;

    // S = Q K^T (16 x 64 per warp)
    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        const int key = np * 16 + (lane % 8) + (lane / 16) * 8;
        const int dim = kk * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(b, cK + key * LDS + dim);
        mma_bf16(s[2 * np], qf[kk], b[0], b[1]);
        mma_bf16(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }

    int64_t base, end;
    tile_base(k, base, end);
    const bool need_mask = !retrieval || base + kBN > end || base + kBN - 1 > t0;
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = base + nt * 8 + (lane % 4) * 2 + e;
          const bool in = j < end;
          if (!(in && key_visible(a, retrieval, ta, j, p0))) s[nt][e] = -INFINITY;
          if (!(in && key_visible(a, retrieval, tb, j, p0))) s[nt][2 + e] = -INFINITY;
        }
      }
    }

    // Online softmax (base-2, scale folded in).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][0] *= a.scale_log2;
      s[nt][1] *= a.scale_log2;
      s[nt][2] *= a.scale_log2;
      s[nt][3] *= a.scale_log2;
    }
    online_softmax_step(s, o, m_a, m_b, l_a, l_b);

    p_times_v<D, kBN, LDS>(o, s, cV);  // O += P V
    __syncthreads();
  }
  if (ntiles == 0) cp_async_wait<0>();

  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;
  const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  const int64_t ia = i0 + warp * 16 + lane / 4, ib = ia + 8;
  bf16* out_h = a.out + static_cast<int64_t>(h) * D + (lane % 4) * 2;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    if (ia < n)
      *reinterpret_cast<uint32_t*>(out_h + ia * q_stride + nt * 8) =
          pack_bf16(o[nt][0] * inv_a, o[nt][1] * inv_a);
    if (ib < n)
      *reinterpret_cast<uint32_t*>(out_h + ib * q_stride + nt * 8) =
          pack_bf16(o[nt][2] * inv_b, o[nt][3] * inv_b);
  }
}

template <int D, int WARPS>
void launch(const KArgs& a, cudaStream_t stream) {
  constexpr int BM = 16 * WARPS;
  constexpr int smem = (BM + 4 * kBN) * (D + 8) * static_cast<int>(sizeof(bf16));
  static std::atomic<bool> attr_set{false};  // per instantiation (setting it twice is harmless)
  if (!attr_set) {
    DUO_CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel<D, WARPS>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    attr_set = true;
  }
  const int64_t qt = (a.n + BM - 1) / BM;
  check(qt <= 0x7fffffff, "attention: n too large");
  dim3 grid(static_cast<unsigned>(qt), static_cast<unsigned>(a.num_heads));
  prefill_kernel<D, WARPS><<<grid, WARPS * 32, smem, stream>>>(a);
  DUO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// Query-tile height: 128 rows (8 warps) for long chunks (halves K/V tile traffic per query),
// 64 rows (4 warps) for short ones (more blocks). DUO_ATTN_BM=64|128 forces one (tuning/tests).
static int forced_bm() {
  static const int v = [] {
    const char* e = std::getenv("DUO_ATTN_BM");
    return e == nullptr ? 0 : std::atoi(e);
  }();
  return v;
}

void launch_prefill(const KArgs& a, int head_dim, cudaStream_t stream) {
  if (a.n <= 0) return;
  if (prefill_sm90_eligible(a.n, head_dim)) {
    launch_prefill_sm90(a, stream);
    return;
  }
  const int f = forced_bm();
  const bool big = f == 128 || (f != 64 && a.n >= 1024);
  if (head_dim == 128) {
    if (big)
      launch<128, 8>(a, stream);
    else
      launch<128, 4>(a, stream);
  } else if (head_dim == 64) {
    if (big)
      launch<64, 8>(a, stream);
    else
      launch<64, 4>(a, stream);
  } else {
    fail("attention: head_dim ", head_dim, " unsupported (64 or 128)");
  }
}

}  // namespace duo::cuda::detail
