// Decode attention (n == 1): split-KV ("flash-decoding") over the retrieval and streaming stores in
// one launch per layer, then a small merge kernel; plus attention()'s dispatch and validation.
//
// Split kernel: grid (splits, num_kv_heads * head_tiles), 128 threads. A block takes one KV head
// and G query heads of its group (G = the largest of 8, 4, 2, 1 dividing the group; head_tiles =
// group / G), so every K/V row loaded is used by G query heads. The KV head's visible keys are
// numbered e = 0 .. count-1 (retrieval: positions 0..p0; streaming: sinks, then the window, the
// newest token read from k_new / v_new) and cut into `splits` equal pieces rounded up to whole
// iterations; a split past the end exits at once (the merge kernel does not read it). Inside a
// block, D/8 lanes own one key (16-byte loads), each lane-group takes 4 keys per iteration (8
// independent 16-byte loads in flight per thread), fp32 online softmax per lane-group, then the
// block combines its lane-groups and writes (o unnormalised, m, l) per query head to the workspace.
// For GQA groups of 4 or more a tensor-core split kernel (decode_mma_split_kernel, below) takes
// the place of this SIMT one; both write the same per-split (o, m, l).
// Merge kernel: one block per query head, 4 x head_dim threads; log-sum-exp over the used splits.
// attention_append_streaming() folds the streaming-store append of the new token into the merge
// kernel (the split kernel, the only reader of that store, has completed by then).
// Both kernels start with programmatic dependent launch (cuda/pdl.cuh).
//
// CUDA graphs: p0 may be read from device memory (AttentionParams::p0_device); the grid depends on
// (capacity, SM count, workspace size, heads, kernel occupancy) only, never on p0, and no host
// sync or allocation happens inside attention(). Split count: enough blocks for one full wave
// over the retrieval heads (occupancy * SMs / (retrieval heads * head tiles)), capped by the
// workspace and by preferred_splits; DUO_ATTN_SPLITS=N overrides (tuning).
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/error.h"
#include "cuda/async_copy.cuh"
#include "cuda/attention_internal.cuh"
#include "cuda/cuda_check.h"
#include "cuda/mma_bf16.cuh"
#include "cuda/pdl.cuh"

namespace duo::cuda {
namespace detail {
namespace {

constexpr int kDecodeThreads = 128;
constexpr int kUnroll = 4;  // keys per lane-group per iteration
constexpr int kMaxSplits = 1024;

int64_t preferred_splits(int64_t max_context, int num_sms) {
  const int64_t by_len = std::max<int64_t>(1, (max_context + 255) / 256);
  const int64_t sms = std::min(std::max(num_sms, 1), kMaxSplits);
  return std::max<int64_t>(1, std::min<int64_t>(sms, by_len));
}

// Visible keys of the decode query (t = p0) for KV head g, as e -> position: e < a_len -> e,
// else b_begin + (e - a_len).
struct KeyList {
  int64_t a_len, b_begin, count;
};
__device__ __forceinline__ KeyList decode_keys(const KArgs& a, bool retrieval, int64_t p0) {
  KeyList k;
  if (retrieval || (a.chunk_mode && p0 == 0)) {
    k.a_len = p0 + 1;
    k.b_begin = p0 + 1;
    k.count = p0 + 1;
    return k;
  }
  k.a_len = a.S < p0 + 1 ? a.S : p0 + 1;
  int64_t wb = a.chunk_mode ? p0 - a.R : p0 - a.R + 1;
  if (wb < k.a_len) wb = k.a_len;
  k.b_begin = wb;
  k.count = k.a_len + (p0 + 1 - wb);
  return k;
}

// Keys per split: an equal share rounded up to whole iterations of `unit` keys (the split kernel's
// step; the merge kernel recomputes the same lengths to know which splits were used).
__device__ __forceinline__ int64_t split_len(int64_t count, int splits, int unit) {
  int64_t len = (count + splits - 1) / splits;
  return (len + unit - 1) / unit * unit;
}
// Keys per step of the SIMT split kernel: kUnroll per lane group, 32 / (D / 8) groups per warp.
template <int D>
constexpr int simt_unit() {
  return kUnroll * (kDecodeThreads / 32) * (32 / (D / 8));
}

__device__ __forceinline__ void bf16x8_to_float(const uint4& u, float* f) {
  const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(b[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <int D, int G>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_split_kernel(const KArgs a, float* ws, int splits) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  constexpr int LPK = D / 8;     // lanes per key
  constexpr int KPW = 32 / LPK;  // keys per warp step
  constexpr int WARPS = kDecodeThreads / 32;
  constexpr int GROUPS = WARPS * KPW;  // lane-groups per block
  const int64_t p0 = load_p0(a);
  const int head_tiles = a.group / G;
  const int g = blockIdx.y / head_tiles;
  const int h0 = g * a.group + (blockIdx.y % head_tiles) * G;
  const bool retrieval = g < a.num_retrieval;
  const KeyList kl = decode_keys(a, retrieval, p0);
  const int64_t len = split_len(kl.count, splits, simt_unit<D>());
  const int64_t e_begin = static_cast<int64_t>(blockIdx.x) * len;
  if (e_begin >= kl.count) return;  // unused split
  const int64_t e_end = e_begin + len < kl.count ? e_begin + len : kl.count;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int sub = lane % LPK, kslot = lane / LPK;

  float q[G][8];
#pragma unroll
  for (int hh = 0; hh < G; ++hh) {
    const uint4 u =
        *reinterpret_cast<const uint4*>(a.q + static_cast<int64_t>(h0 + hh) * D + sub * 8);
    bf16x8_to_float(u, q[hh]);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[hh][i] *= a.scale_log2;
  }
  const bf16* k_base =
      retrieval ? a.rk + static_cast<int64_t>(g) * a.capacity * D + sub * 8 : nullptr;
  const bf16* v_base =
      retrieval ? a.rv + static_cast<int64_t>(g) * a.capacity * D + sub * 8 : nullptr;
  float m[G], l[G], o[G][8];
#pragma unroll
  for (int hh = 0; hh < G; ++hh) {
    m[hh] = -INFINITY;
    l[hh] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[hh][i] = 0.f;
  }

  // The trip count must be warp-uniform (full-mask shuffles below): iterate on the warp's base
  // and let each lane-group mask its keys past e_end.
  for (int64_t wbase = e_begin + static_cast<int64_t>(warp) * KPW * kUnroll; wbase < e_end;
       wbase += static_cast<int64_t>(GROUPS) * kUnroll) {
    const int64_t e0 = wbase + static_cast<int64_t>(kslot) * kUnroll;
    uint4 kv[kUnroll], vv[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = e0 + u;
      valid[u] = e < e_end;
      kv[u] = make_uint4(0, 0, 0, 0);
      vv[u] = make_uint4(0, 0, 0, 0);
      if (valid[u]) {
        const bf16 *kp, *vp;
        if (retrieval) {  // block-uniform: contiguous rows, position == e
          kp = k_base + e * D;
          vp = v_base + e * D;
        } else {
          const int64_t j = e < kl.a_len ? e : kl.b_begin + (e - kl.a_len);
          kp = key_row<D>(a, g, false, j, p0, false) + sub * 8;
          vp = key_row<D>(a, g, false, j, p0, true) + sub * 8;
        }
        kv[u] = __ldg(reinterpret_cast<const uint4*>(kp));
        vv[u] = __ldg(reinterpret_cast<const uint4*>(vp));
      }
    }
    float s[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      bf16x8_to_float(kv[u], kf);
#pragma unroll
      for (int hh = 0; hh < G; ++hh) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(q[hh][i], kf[i], acc);
        s[u][hh] = acc;
      }
    }
#pragma unroll
    for (int off = LPK / 2; off >= 1; off /= 2) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int hh = 0; hh < G; ++hh) s[u][hh] += __shfl_xor_sync(0xffffffffu, s[u][hh], off);
    }
    // s becomes p (unnormalised probabilities); o and l rescaled per head.
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
      float mx = m[hh];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!valid[u]) s[u][hh] = -INFINITY;
        mx = fmaxf(mx, s[u][hh]);
      }
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m[hh] - base);
      m[hh] = mx;
      float lsum = l[hh] * alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        s[u][hh] = exp2f(s[u][hh] - base);
        lsum += s[u][hh];
      }
      l[hh] = lsum;
      if (alpha != 1.f) {  // the running max rarely moves after the first keys
#pragma unroll
        for (int i = 0; i < 8; ++i) o[hh][i] *= alpha;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[8];
      bf16x8_to_float(vv[u], vf);
#pragma unroll
      for (int hh = 0; hh < G; ++hh)
#pragma unroll
        for (int i = 0; i < 8; ++i) o[hh][i] = fmaf(s[u][hh], vf[i], o[hh][i]);
    }
  }

  // Combine the lane-groups of a warp (lanes with equal `sub`).
#pragma unroll
  for (int off = LPK; off < 32; off *= 2) {
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[hh], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[hh], off);
      const float mx = fmaxf(m[hh], mo);
      const float base = mx == -INFINITY ? 0.f : mx;
      const float a1 = exp2f(m[hh] - base), a2 = exp2f(mo - base);
      l[hh] = l[hh] * a1 + lo * a2;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float oo = __shfl_xor_sync(0xffffffffu, o[hh][i], off);
        o[hh][i] = o[hh][i] * a1 + oo * a2;
      }
      m[hh] = mx;
    }
  }
  // Across warps through shared memory: [WARPS][G][D + 2].
  __shared__ float red[WARPS][G][D + 2];
  if (kslot == 0) {
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
#pragma unroll
      for (int i = 0; i < 8; ++i) red[warp][hh][sub * 8 + i] = o[hh][i];
      if (sub == 0) {
        red[warp][hh][D] = m[hh];
        red[warp][hh][D + 1] = l[hh];
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += kDecodeThreads) {
    const int hh = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, red[w][hh][D]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float acc = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float f = exp2f(red[w][hh][D] - base);
      acc += red[w][hh][d] * f;
      lsum += red[w][hh][D + 1] * f;
    }
    float* dst = ws + (static_cast<int64_t>(blockIdx.x) * a.num_heads + h0 + hh) * (D + 2);
    dst[d] = acc;
    if (d == 0) {
      dst[D] = mx;
      dst[D + 1] = lsum;
    }
  }
}

// Tensor-core split kernel (GQA groups >= 4, decode_use_mma): grid (splits, num_kv_heads *
// head_tiles), 4 warps. A block takes KV head g and up to 16 of its query heads as the rows of one
// m16 tile (rows past the group are zero), and one split of g's visible keys, walked in tiles of
// kMmaBN keys through a kMmaStages-deep cp.async ring in shared memory. Warp w owns keys [16w, 16w
// + 16) of every tile: S = Q K^T (16 x 16, mma m16n8k16), base-2 online softmax per row, O += P V
// (16 x D). The four warps' (m, l, O) then merge through shared memory and the block writes
// (o unnormalised, m, l) per query head, as decode_split_kernel does, for decode_merge_kernel.
// The SIMT kernel spent its issue slots on 16-lane shuffle reductions per key and head and topped
// out near 3.3 TB/s; here QK^T and PV cost a few mma per 16 keys and the loads are the bound.
constexpr int kMmaBN = 64, kMmaStages = 3, kMmaThreads = 128;
template <int D>
constexpr int kMmaLds = D + 8;  // padded row (elements): conflict-free ldmatrix
template <int D>
constexpr size_t kMmaSmemBytes = (static_cast<size_t>(16) + 2 * kMmaStages * kMmaBN) * kMmaLds<D> *
                                 sizeof(bf16);

template <int D>
__global__ void __launch_bounds__(kMmaThreads)
    decode_mma_split_kernel(const KArgs a, float* ws, int splits) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  constexpr int LDS = kMmaLds<D>, KD = D / 16, CPR = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [16][LDS]
  bf16* sK = sQ + 16 * LDS;                      // [stages][kMmaBN][LDS]
  bf16* sV = sK + kMmaStages * kMmaBN * LDS;     // [stages][kMmaBN][LDS]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t p0 = load_p0(a);
  const int head_tiles = (a.group + 15) / 16;
  const int g = blockIdx.y / head_tiles;
  const int h0 = g * a.group + (blockIdx.y % head_tiles) * 16;
  const int rows = min(16, g * a.group + a.group - h0);  // query heads in this tile
  const bool retrieval = g < a.num_retrieval;
  const KeyList kl = decode_keys(a, retrieval, p0);
  const int64_t len = split_len(kl.count, splits, kMmaBN);
  const int64_t e_begin = static_cast<int64_t>(blockIdx.x) * len;
  if (e_begin >= kl.count) return;  // unused split
  const int64_t e_end = e_begin + len < kl.count ? e_begin + len : kl.count;
  const int ntiles = static_cast<int>((e_end - e_begin + kMmaBN - 1) / kMmaBN);

  for (int c = tid; c < 16 * CPR; c += kMmaThreads) {  // Q rows, zero past the group
    const int r = c / CPR, col = (c % CPR) * 8;
    const bool ok = r < rows;
    cp_async16(sQ + r * LDS + col, a.q + static_cast<int64_t>(ok ? h0 + r : h0) * D + col, ok);
  }
  auto load_tile = [&](int t) {
    bf16* dk = sK + (t % kMmaStages) * kMmaBN * LDS;
    bf16* dv = sV + (t % kMmaStages) * kMmaBN * LDS;
    for (int c = tid; c < kMmaBN * CPR; c += kMmaThreads) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const int64_t e = e_begin + static_cast<int64_t>(t) * kMmaBN + r;
      const bool ok = e < e_end;
      const bf16 *kp = a.q, *vp = a.q;  // any valid address when !ok (nothing is read)
      if (ok && retrieval) {            // contiguous rows, position == e
        kp = a.rk + (static_cast<int64_t>(g) * a.capacity + e) * D + col;
        vp = a.rv + (static_cast<int64_t>(g) * a.capacity + e) * D + col;
      } else if (ok) {
        const int64_t j = e < kl.a_len ? e : kl.b_begin + (e - kl.a_len);
        kp = key_row<D>(a, g, false, j, p0, false) + col;
        vp = key_row<D>(a, g, false, j, p0, true) + col;
      }
      cp_async16(dk + r * LDS + col, kp, ok);
      cp_async16(dv + r * LDS + col, vp, ok);
    }
  };
  // Group t holds tile t (group 0 also Q); empty groups past the end keep the count per step.
#pragma unroll
  for (int t = 0; t < kMmaStages - 1; ++t) {
    if (t < ntiles) load_tile(t);
    cp_async_commit();
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // rows lane/4 and lane/4 + 8
  uint32_t qf[KD][4];
  for (int t = 0; t < ntiles; ++t) {
    if (t + kMmaStages - 1 < ntiles) load_tile(t + kMmaStages - 1);
    cp_async_commit();
    cp_async_wait<kMmaStages - 1>();
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk)
        ldmatrix_x4(qf[kk], sQ + (lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
    }
    const bf16* cK = sK + (t % kMmaStages) * kMmaBN * LDS + warp * 16 * LDS;
    const bf16* cV = sV + (t % kMmaStages) * kMmaBN * LDS + warp * 16 * LDS;
    float s[2][4] = {};  // S = Q K^T over this warp's 16 keys
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, cK + ((lane % 8) + (lane / 16) * 8) * LDS + kk * 16 + ((lane / 8) % 2) * 8);
      mma_bf16(s[0], qf[kk], b[0], b[1]);
      mma_bf16(s[1], qf[kk], b[2], b[3]);
    }
    // Keys past the split's end were zero-filled: mask them. Every other key is visible.
    const int64_t key0 = e_begin + static_cast<int64_t>(t) * kMmaBN + warp * 16;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool in = key0 + nt * 8 + (lane % 4) * 2 + e < e_end;
        s[nt][e] = in ? s[nt][e] * a.scale_log2 : -INFINITY;
        s[nt][2 + e] = in ? s[nt][2 + e] * a.scale_log2 : -INFINITY;
      }
    online_softmax_step(s, o, m_a, m_b, l_a, l_b);
    p_times_v<D, 16, LDS>(o, s, cV);  // O += P V over the warp's 16 keys
    __syncthreads();                  // the slot is refilled next step
  }
  cp_async_wait<0>();
  __syncthreads();
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  // Merge the 4 warps (rows < `rows` only) through the now idle K ring: red[warp][row][D + 2].
  float* red = reinterpret_cast<float*>(sK);
  const int ra = lane / 4, rb = ra + 8;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    const int c = nt * 8 + (lane % 4) * 2;
    float* wa = red + (warp * 16 + ra) * (D + 2);
    float* wb = red + (warp * 16 + rb) * (D + 2);
    wa[c] = o[nt][0];
    wa[c + 1] = o[nt][1];
    wb[c] = o[nt][2];
    wb[c + 1] = o[nt][3];
  }
  if (lane % 4 == 0) {
    red[(warp * 16 + ra) * (D + 2) + D] = m_a;
    red[(warp * 16 + ra) * (D + 2) + D + 1] = l_a;
    red[(warp * 16 + rb) * (D + 2) + D] = m_b;
    red[(warp * 16 + rb) * (D + 2) + D + 1] = l_b;
  }
  __syncthreads();
  for (int idx = tid; idx < rows * D; idx += kMmaThreads) {
    const int r = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w) mx = fmaxf(mx, red[(w * 16 + r) * (D + 2) + D]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float acc = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float* row = red + (w * 16 + r) * (D + 2);
      const float f = exp2f(row[D] - base);
      acc += row[d] * f;
      lsum += row[D + 1] * f;
    }
    float* dst = ws + (static_cast<int64_t>(blockIdx.x) * a.num_heads + h0 + r) * (D + 2);
    dst[d] = acc;
    if (d == 0) {
      dst[D] = mx;
      dst[D + 1] = lsum;
    }
  }
}

// Merge: one block per query head, kMergeGroups * D threads. The used splits' m and l are
// reduced block-wide; then thread (grp, d) sums o[s][d] over the splits s = grp, grp +
// kMergeGroups, ... (independent loads, four accumulators) and the groups add up through shared
// memory, so the chain of dependent loads is 1 / kMergeGroups of the split count long.
constexpr int kMergeGroups = 4;

template <int D>
__global__ void __launch_bounds__(kMergeGroups* D)
    decode_merge_kernel(const KArgs a, const float* ws, int splits, int unit, bf16* append_k,
                        bf16* append_v) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  constexpr int T = kMergeGroups * D, W = T / 32;
  __shared__ float wgt[kMaxSplits];
  __shared__ float red[2][W];
  __shared__ float part[kMergeGroups][D];
  const int64_t p0 = load_p0(a);
  const int h = blockIdx.x;
  const int g = h / a.group;
  const bool retrieval = g < a.num_retrieval;
  const KeyList kl = decode_keys(a, retrieval, p0);
  const int64_t len = split_len(kl.count, splits, unit);
  const int used = kl.count <= 0 ? 0 : static_cast<int>((kl.count + len - 1) / len);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int grp = tid / D, d = tid % D;
  const int64_t stride = static_cast<int64_t>(a.num_heads) * (D + 2);
  const float* base_ptr = ws + static_cast<int64_t>(h) * (D + 2);
  // Pass 1: max of m over the used splits (split-parallel).
  float mx = -INFINITY;
  for (int s = tid; s < used; s += T) mx = fmaxf(mx, base_ptr[s * stride + D]);
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (lane == 0) red[0][warp] = mx;
  __syncthreads();
  mx = red[0][0];
#pragma unroll
  for (int w = 1; w < W; ++w) mx = fmaxf(mx, red[0][w]);
  const float base = mx == -INFINITY ? 0.f : mx;
  // Pass 2: weights and their l-sum.
  float ls = 0.f;
  for (int s = tid; s < used; s += T) {
    const float f = exp2f(base_ptr[s * stride + D] - base);
    wgt[s] = f;
    ls += f * base_ptr[s * stride + D + 1];
  }
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) ls += __shfl_xor_sync(0xffffffffu, ls, off);
  if (lane == 0) red[1][warp] = ls;
  __syncthreads();
  float lsum = 0.f;
#pragma unroll
  for (int w = 0; w < W; ++w) lsum += red[1][w];
  // Pass 3: weighted sum of o; this thread's share of the splits, independent loads.
  constexpr int G = kMergeGroups;
  float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
  int s = grp;
  for (; s + 3 * G < used; s += 4 * G) {
    acc0 += wgt[s] * base_ptr[s * stride + d];
    acc1 += wgt[s + G] * base_ptr[(s + G) * stride + d];
    acc2 += wgt[s + 2 * G] * base_ptr[(s + 2 * G) * stride + d];
    acc3 += wgt[s + 3 * G] * base_ptr[(s + 3 * G) * stride + d];
  }
  for (; s < used; s += G) acc0 += wgt[s] * base_ptr[s * stride + d];
  part[grp][d] = (acc0 + acc1) + (acc2 + acc3);
  __syncthreads();
  if (grp != 0) return;
  float acc = part[0][d];
#pragma unroll
  for (int i = 1; i < G; ++i) acc += part[i][d];
  a.out[static_cast<int64_t>(h) * D + d] = __float2bfloat16(lsum > 0.f ? acc / lsum : 0.f);
  // append_streaming for the one new token (position p0): the first query head of each streaming
  // KV head copies its K/V row into the slot, if the token stays held (as append_kernel).
  if (append_k != nullptr && !retrieval && h % a.group == 0 && (p0 < a.S || a.R > 0)) {
    const int64_t slot = ::duo::streaming_slot(p0, a.S, a.R);
    if (slot >= 0 && slot < a.slots) {
      const int64_t dst = (static_cast<int64_t>(g - a.num_retrieval) * a.slots + slot) * D + d;
      const int64_t src = static_cast<int64_t>(g) * D + d;
      append_k[dst] = a.k_new[src];
      append_v[dst] = a.v_new[src];
    }
  }
}

// Occupancy of one decode kernel instantiation (blocks per SM), cached. Queried (no-throw) once
// from attention_workspace_bytes() too, so that a graph capture never makes the first query.
template <int D, int G>
int decode_occupancy() {
  static std::atomic<int> occ{0};  // the same value from every thread
  if (occ == 0) {
    int v = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, decode_split_kernel<D, G>, kDecodeThreads,
                                                      0) != cudaSuccess) {
      cudaGetLastError();
      return 1;
    }
    occ = v > 0 ? v : 1;
  }
  return occ;
}

// Which split kernel: the tensor-core one for GQA groups of 4 or more, the SIMT one below that.
// Measured on an H200 (bench/results/attention_h200.md): the tensor-core kernel reads the KV cache
// at 0.98x / 0.95x of torch SDPA's bandwidth at 128K / 512K with 32 query and 8 KV heads (the SIMT
// kernel 0.82x / 0.76x), but end to end with MHA (Llama-2-7B, group 1) the SIMT kernel, whose work
// per byte is a quarter of group 4's, was faster (19.02 vs 20.61 ms per token at 120K).
// DUO_DECODE_MMA=0 / 1 forces either kernel (A/B timing, tests).
bool decode_use_mma(int group) {
  static const int forced = [] {
    const char* e = std::getenv("DUO_DECODE_MMA");
    if (e == nullptr) return -1;
    return std::string_view(e) == "0" ? 0 : 1;
  }();
  return forced >= 0 ? forced == 1 : group >= 4;
}

// Occupancy of the tensor-core split kernel (blocks per SM), cached; also raises its dynamic
// shared-memory limit (the ring is over 48 KB). Warmed like decode_occupancy().
template <int D>
int decode_mma_occupancy() {
  static std::atomic<int> occ{0};
  if (occ == 0) {
    int v = 0;
    if (cudaFuncSetAttribute(decode_mma_split_kernel<D>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kMmaSmemBytes<D>)) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, decode_mma_split_kernel<D>, kMmaThreads,
                                                      kMmaSmemBytes<D>) != cudaSuccess) {
      cudaGetLastError();
      return 1;
    }
    occ = v > 0 ? v : 1;
  }
  return occ;
}

void warm_decode_occupancy() {
  try {
    (void)device_num_sms();
  } catch (const Error&) {
    return;  // no device: nothing to warm
  }
  decode_occupancy<128, 1>();
  decode_occupancy<128, 2>();
  decode_occupancy<128, 4>();
  decode_occupancy<128, 8>();
  decode_occupancy<64, 1>();
  decode_occupancy<64, 2>();
  decode_occupancy<64, 4>();
  decode_occupancy<64, 8>();
  decode_mma_occupancy<128>();
  decode_mma_occupancy<64>();
}

// DUO_ATTN_SPLITS=N forces the split count (still capped by the workspace): a tuning knob.
int forced_splits() {
  static const int v = [] {
    const char* e = std::getenv("DUO_ATTN_SPLITS");
    return e == nullptr ? 0 : std::atoi(e);
  }();
  return v;
}

template <int D, int G>
void launch_decode_g(const KArgs& a, float* ws, int64_t max_splits, bf16* append_k, bf16* append_v,
                     cudaStream_t stream) {
  const int head_tiles = a.group / G;
  // Split count: one full wave of blocks over the heads that carry long contexts (retrieval
  // heads; streaming blocks finish at once), capped by the workspace / preferred count. The grid
  // never depends on p0 (graph replay).
  const int64_t rows = static_cast<int64_t>(std::max(a.num_retrieval, 1)) * head_tiles;
  const int64_t wave = static_cast<int64_t>(decode_occupancy<D, G>()) * device_num_sms();
  int64_t splits = std::max<int64_t>(1, wave / rows);
  if (forced_splits() > 0) splits = forced_splits();
  splits = std::max<int64_t>(1, std::min(splits, max_splits));
  const dim3 grid(static_cast<unsigned>(splits),
                  static_cast<unsigned>(a.num_kv_heads * head_tiles));
  launch_pdl(decode_split_kernel<D, G>, grid, kDecodeThreads, 0, stream, a, ws,
             static_cast<int>(splits));
  launch_pdl(decode_merge_kernel<D>, static_cast<unsigned>(a.num_heads), kMergeGroups * D, 0,
             stream, a, ws, static_cast<int>(splits), simt_unit<D>(), append_k, append_v);
}

template <int D>
void launch_decode_mma(const KArgs& a, float* ws, int64_t max_splits, bf16* append_k,
                       bf16* append_v, cudaStream_t stream) {
  const int head_tiles = (a.group + 15) / 16;
  // Split count as launch_decode_g: one full wave over the retrieval heads' blocks.
  const int64_t rows = static_cast<int64_t>(std::max(a.num_retrieval, 1)) * head_tiles;
  const int64_t wave = static_cast<int64_t>(decode_mma_occupancy<D>()) * device_num_sms();
  int64_t splits = std::max<int64_t>(1, wave / rows);
  if (forced_splits() > 0) splits = forced_splits();
  splits = std::max<int64_t>(1, std::min(splits, max_splits));
  const dim3 grid(static_cast<unsigned>(splits),
                  static_cast<unsigned>(a.num_kv_heads * head_tiles));
  launch_pdl(decode_mma_split_kernel<D>, grid, kMmaThreads, kMmaSmemBytes<D>, stream, a, ws,
             static_cast<int>(splits));
  launch_pdl(decode_merge_kernel<D>, static_cast<unsigned>(a.num_heads), kMergeGroups * D, 0,
             stream, a, ws, static_cast<int>(splits), kMmaBN, append_k, append_v);
}

template <int D>
void launch_decode(const KArgs& a, float* ws, int64_t max_splits, bf16* append_k, bf16* append_v,
                   cudaStream_t stream) {
  if (decode_use_mma(a.group)) {
    launch_decode_mma<D>(a, ws, max_splits, append_k, append_v, stream);
    return;
  }
  if (a.group % 8 == 0)
    launch_decode_g<D, 8>(a, ws, max_splits, append_k, append_v, stream);
  else if (a.group % 4 == 0)
    launch_decode_g<D, 4>(a, ws, max_splits, append_k, append_v, stream);
  else if (a.group % 2 == 0)
    launch_decode_g<D, 2>(a, ws, max_splits, append_k, append_v, stream);
  else
    launch_decode_g<D, 1>(a, ws, max_splits, append_k, append_v, stream);
}

// attention(); with append_k / append_v set (streaming store), the split-KV decode path also
// appends the new token there in its merge kernel. Returns whether it did.
bool run_attention(const AttentionParams& p, bf16* append_k, bf16* append_v, cudaStream_t stream) {
  validate(p, true);
  if (p.n == 0) return false;
  const KArgs a = make_kargs(p);
  if (p.n == 1 && p.workspace != nullptr) {
    const int64_t per_split = static_cast<int64_t>(p.num_heads) * (p.head_dim + 2) * 4;
    const int64_t fit = p.workspace_bytes / per_split;
    const int64_t splits = std::min<int64_t>(fit, preferred_splits(p.capacity, device_num_sms()));
    if (splits >= 1) {
      check((reinterpret_cast<uintptr_t>(p.workspace) & 15u) == 0,
            "attention: workspace not 16-byte aligned");
      if (p.head_dim == 128)
        launch_decode<128>(a, p.workspace, splits, append_k, append_v, stream);
      else
        launch_decode<64>(a, p.workspace, splits, append_k, append_v, stream);
      return append_k != nullptr;
    }
  }
  launch_prefill(a, p.head_dim, stream);
  return false;
}

}  // namespace

int device_num_sms() {
  int dev = 0;
  DUO_CUDA_CHECK(cudaGetDevice(&dev));
  // Cached as (dev << 32) | SM count.
  static std::atomic<int64_t> cached{-1};
  int64_t c = cached.load(std::memory_order_relaxed);
  if (c < 0 || (c >> 32) != dev) {
    int sms = 0;
    DUO_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    c = (static_cast<int64_t>(dev) << 32) | sms;
    cached.store(c, std::memory_order_relaxed);
  }
  return static_cast<int>(c & 0xffffffff);
}

KArgs make_kargs(const AttentionParams& p) {
  KArgs a{};
  a.q = p.q;
  a.k_new = p.k_new;
  a.v_new = p.v_new;
  a.out = p.out;
  a.n = p.n;
  a.p0 = p.p0;
  a.p0_ptr = p.p0_device;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.num_retrieval = p.num_retrieval;
  a.group = p.num_kv_heads > 0 ? p.num_heads / p.num_kv_heads : 0;
  a.scale_log2 = p.scale * 1.4426950408889634f;
  a.rk = p.retrieval_k;
  a.rv = p.retrieval_v;
  a.capacity = p.capacity;
  a.sk = p.streaming_k;
  a.sv = p.streaming_v;
  a.slots = p.slots;
  a.S = p.sink;
  a.R = p.recent;
  a.chunk_mode = p.mode == StreamingMode::kChunk ? 1 : 0;
  return a;
}

static bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

void validate(const AttentionParams& p, bool for_attention) {
  check(p.head_dim == 64 || p.head_dim == 128, "attention: head_dim ", p.head_dim,
        " unsupported (64 or 128)");
  check(p.num_kv_heads > 0 && p.num_heads > 0 && p.num_heads % p.num_kv_heads == 0,
        "attention: num_heads ", p.num_heads, " is not a multiple of num_kv_heads ",
        p.num_kv_heads);
  check(p.num_retrieval >= 0 && p.num_retrieval <= p.num_kv_heads, "attention: num_retrieval ",
        p.num_retrieval, " outside [0, ", p.num_kv_heads, "]");
  check(p.n >= 0 && p.p0 >= 0, "attention: negative n or p0");
  check(p.sink >= 0 && p.recent >= 0, "attention: negative sink or recent");
  check(p.capacity >= 0, "attention: negative capacity");
  if (p.p0_device == nullptr)
    check(p.p0 + p.n <= p.capacity, "attention: p0 + n = ", p.p0 + p.n, " exceeds capacity ",
          p.capacity);
  check(p.k_new != nullptr && p.v_new != nullptr && aligned16(p.k_new) && aligned16(p.v_new),
        "attention: k_new / v_new null or not 16-byte aligned");
  if (for_attention && p.num_retrieval > 0)
    check(p.retrieval_k != nullptr && p.retrieval_v != nullptr && aligned16(p.retrieval_k) &&
              aligned16(p.retrieval_v),
          "attention: retrieval store null or not 16-byte aligned");
  if (p.num_retrieval < p.num_kv_heads) {
    const int64_t want = std::min(p.capacity, p.sink + p.recent);
    check(p.slots == want, "attention: slots ", p.slots,
          ", expected min(capacity, S + R) = ", want);
    if (for_attention && p.slots > 0)
      check(p.streaming_k != nullptr && p.streaming_v != nullptr && aligned16(p.streaming_k) &&
                aligned16(p.streaming_v),
            "attention: streaming store null or not 16-byte aligned");
  }
  if (for_attention) {
    check(p.q != nullptr && p.out != nullptr && aligned16(p.q) && aligned16(p.out),
          "attention: q / out null or not 16-byte aligned");
    check(p.mode == StreamingMode::kExact || p.mode == StreamingMode::kChunk,
          "attention: unknown streaming mode");
  }
}

}  // namespace detail

int64_t attention_workspace_bytes(int64_t /*n*/, int num_heads, int head_dim, int64_t max_context,
                                  int num_sms) {
  detail::warm_decode_occupancy();
  const int64_t splits = detail::preferred_splits(max_context, num_sms);
  return splits * num_heads * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

void attention(const AttentionParams& p, cudaStream_t stream) {
  (void)detail::run_attention(p, nullptr, nullptr, stream);
}

void attention_append_streaming(const AttentionParams& p, __nv_bfloat16* streaming_k,
                                __nv_bfloat16* streaming_v, cudaStream_t stream) {
  const bool has_streaming = p.num_retrieval < p.num_kv_heads && p.slots > 0;
  if (has_streaming)
    check(streaming_k != nullptr && streaming_v != nullptr,
          "attention_append_streaming: streaming store missing");
  const bool appended = detail::run_attention(p, has_streaming ? streaming_k : nullptr,
                                              has_streaming ? streaming_v : nullptr, stream);
  if (!appended) append_streaming(p, streaming_k, streaming_v, stream);
}

}  // namespace duo::cuda
