// The gate trainer's windowed attention on tensor cores (gate_kernels.h window_attention_tc_*):
// bf16 Q/K/V, mma.sync m16n8k16 with fp32 accumulation, FlashAttention-2 style.
//
// Forward: block = 64 query rows of one query head (4 warps x 16 rows); key tiles of 64 over the
// block's key union ([0, a1) sinks, then [b0, t1) recent: O(n (S + R)) work), double-buffered
// with cp.async; online softmax in base 2; O and the natural-log lse stored in fp32.
// Backward (P recomputed from lse, D_t = dO . O from a row-dot pass):
//   dQ: row-centric like the forward; dS = P (dP - D_t) rounded to bf16 feeds dQ += dS K.
//   dK, dV: key-centric, block = 64 keys of one KV head (4 warps x 16 keys), query rows (every
//   query head of the group) in tiles of 32, double-buffered; dV += P^T dO, dK += dS^T Q.
//   A key tile that holds a sink is seen by every later query: its rows are split into segments
//   (one block each) whose partial sums go to a workspace and are added in segment order by a
//   last pass. Other tiles are one block each and write dK/dV directly. No atomics: the results
//   are deterministic.
// Two backward kernels recompute S and dP twice (7 products instead of FlashAttention-2's 5) in
// exchange for no atomics on dQ.
//
// Fragments of mma.m16n8k16 (cuda/mma_bf16.cuh; lane = threadIdx.x % 32, r = lane / 4,
// c = (lane % 4) * 2): A (16x16) a[0] = A[r][c..c+1], a[1] = A[r+8][c..], a[2] = A[r][c+8..],
// a[3] = A[r+8][c+8..]; B (16x8) b0 = B[c..c+1][r], b1 = B[c+8..c+9][r]; C (16x8) c[0..1] =
// C[r][c..c+1], c[2..3] = C[r+8][c..c+1]. Two C n-tiles repacked to bf16 are the A fragment of
// the next product (P V, dS K, P^T dO, dS^T Q).
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "core/error.h"
#include "cuda/async_copy.cuh"
#include "cuda/cuda_check.h"
#include "cuda/gate_kernels.h"
#include "cuda/gate_window.cuh"
#include "cuda/mma_bf16.cuh"

namespace duo::cuda::gate_kernels {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16 * kWarps;  // query rows (forward, dQ) or keys (dK/dV) per block
constexpr int kBN = 64;             // keys per tile (forward, dQ)
constexpr int kBQ = 32;             // query rows per tile (dK/dV)
constexpr int kMaxSegments = 64;    // bound on a sink tile's segments (workspace size)
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
constexpr int lds() {
  return D + 8;  // padded smem row (elements): ldmatrix rows fall in distinct banks
}

// Rows [base, base + rows) of a [*, stride] bf16 matrix (already offset to the head) into smem
// [rows][D + 8]; rows at or past `end` are zero-filled.
template <int D>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, int64_t stride, int64_t base,
                                          int64_t end, int rows) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < rows * CPR; c += kThreads) {
    const int row = c / CPR, col = (c % CPR) * 8;
    const int64_t j = base + row;
    const bool ok = j < end;
    cp_async16(dst + row * lds<D>() + col, src + (ok ? j : 0) * stride + col, ok);
  }
}

// The key tiles of a query block: tiles of kBN over [0, a1), then over [b0, b1).
struct KeyTiles {
  int64_t a1, b0, b1;
  int n0, count;
  __device__ void at(int k, int64_t& base, int64_t& end) const {
    if (k < n0) {
      base = static_cast<int64_t>(k) * kBN;
      end = a1;
    } else {
      base = b0 + static_cast<int64_t>(k - n0) * kBN;
      end = b1;
    }
  }
};
__device__ __forceinline__ KeyTiles key_tiles(const Window& w, int64_t t0, int64_t t1) {
  const KR u = key_union(w, t0, t1);
  KeyTiles k;
  k.a1 = u.a1;
  k.b0 = u.b0;
  k.b1 = u.b1;
  k.n0 = static_cast<int>((u.a1 + kBN - 1) / kBN);
  k.count = k.n0 + static_cast<int>((u.b1 - u.b0 + kBN - 1) / kBN);
  return k;
}

// Whether key tile [base, base + kBN) (range end `end`) is visible to every query of a block
// starting at t0 whose last query's recent part begins at rb_last: then no mask is needed.
// Windows only grow forward (recent_begin never decreases with t).
__device__ __forceinline__ bool tile_full(const Window& w, int64_t base, int64_t end, int64_t t0,
                                          int64_t rb_last) {
  return base + kBN <= end && base + kBN - 1 <= t0 && (base + kBN <= w.sink || base >= rb_last);
}

// Double buffering over a block's tiles (key tiles, or dK/dV's query items): before working on
// tile k, issue tile k + 1's loads into the other buffer (load(k + 1, buffer)) and wait until
// tile k's loads, committed earlier, have landed for the whole block.
template <class Load>
__device__ __forceinline__ void next_tile_ready(int64_t k, int64_t count, const Load& load) {
  if (k + 1 < count) {
    load(k + 1, static_cast<int>((k + 1) & 1));
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// A forward / dQ block: query rows [t0, t1) of query head h (blockIdx.y; blockIdx.x picks the 64
// rows), the key tiles they see, and the K / V columns of the head's KV group.
template <int D>
struct QueryBlock {
  int h;
  int64_t t0, t1;
  int64_t qs, ks;  // row strides of Q (and dO, O) and of K / V
  KeyTiles kt;
  const bf16* Kg;
  const bf16* Vg;
  __device__ QueryBlock(const bf16* K, const bf16* V, int64_t n, int nq, int nkv, const Window& w)
      : h(static_cast<int>(blockIdx.y)),
        t0(static_cast<int64_t>(blockIdx.x) * kRows),
        t1(min(n, t0 + kRows)),
        qs(static_cast<int64_t>(nq) * D),
        ks(static_cast<int64_t>(nkv) * D),
        kt(key_tiles(w, t0, t1)),
        Kg(K + static_cast<int64_t>(h / (nq / nkv)) * D),
        Vg(V + static_cast<int64_t>(h / (nq / nkv)) * D) {}
  // Key tile k into buffer buf of sK / sV ([2][kBN][lds]; rows past the tile's range zeroed).
  __device__ void load_kv(bf16* sK, bf16* sV, int64_t k, int buf) const {
    int64_t base, end;
    kt.at(static_cast<int>(k), base, end);
    load_rows<D>(sK + buf * kBN * lds<D>(), Kg + base * ks, ks, 0, end - base, kBN);
    load_rows<D>(sV + buf * kBN * lds<D>(), Vg + base * ks, ks, 0, end - base, kBN);
  }
};

// A fragment (16 rows x 16 k) of a row-major smem tile at (row0, k0).
template <int D>
__device__ __forceinline__ void load_a(uint32_t* a, const bf16* s, int row0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, s + (row0 + lane % 16) * lds<D>() + k0 + (lane / 16) * 8);
}
// B fragments of two n-tiles (n0..n0+15) x 16 k from a smem tile stored [n][k] (b[0..1]: n-tile
// n0, b[2..3]: n0 + 8).
template <int D>
__device__ __forceinline__ void load_b_nk(uint32_t* b, const bf16* s, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(b, s + (n0 + lane % 8 + (lane / 16) * 8) * lds<D>() + k0 + ((lane / 8) % 2) * 8);
}
// acc[16 x NT*8] += A[16 x D] (rows row0.. of sa) B^T, B = sb [NT*8][D]: scores of 16 rows.
template <int D, int NT>
__device__ __forceinline__ void scores(float (*acc)[4], const bf16* sa, int row0, const bf16* sb) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a<D>(a, sa, row0, kk * 16);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      load_b_nk<D>(b, sb, np * 16, kk * 16);
      mma_bf16(acc[2 * np], a, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x D] += P[16 x K] sb[K][D] (cuda/mma_bf16.cuh) on this file's padded tiles.
template <int D, int K>
__device__ __forceinline__ void times_rows(float (*acc)[4], const float (*p)[4], const bf16* sb) {
  p_times_v<D, K, lds<D>()>(acc, p, sb);
}

template <int NT>
__device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// ---- forward ----

template <int D>
__global__ void __launch_bounds__(kThreads)
    tc_forward_kernel(const bf16* Q, const bf16* K, const bf16* V, int64_t n, int nq, int nkv,
                      Window w, float scale_log2, float* O, float* lse) {
  constexpr int LDS = lds<D>(), KD = D / 16, NT = kBN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + kRows * LDS;    // [2][kBN][LDS]
  bf16* sV = sK + 2 * kBN * LDS;  // [2][kBN][LDS]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock<D> qb(K, V, n, nq, nkv, w);
  const int h = qb.h;
  const int64_t t0 = qb.t0, t1 = qb.t1, qs = qb.qs;
  const KeyTiles& kt = qb.kt;
  const auto load_kv = [&](int64_t k, int buf) { qb.load_kv(sK, sV, k, buf); };
  load_rows<D>(sQ, Q + static_cast<int64_t>(h) * D + t0 * qs, qs, 0, n - t0, kRows);
  if (kt.count > 0) load_kv(0, 0);
  cp_async_commit();

  // This thread's rows: ta (C elements 0, 1) and tb = ta + 8 (elements 2, 3).
  const int64_t ta = t0 + warp * 16 + lane / 4, tb = ta + 8;
  const int64_t rba = recent_begin(w, ta), rbb = recent_begin(w, tb);
  const int64_t rb_last = recent_begin(w, t1 - 1);
  float o[D / 8][4];
  zero<D / 8>(o);
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
  uint32_t qf[KD][4];
  for (int k = 0; k < kt.count; ++k) {
    const int buf = k & 1;
    next_tile_ready(k, kt.count, load_kv);
    if (k == 0) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) load_a<D>(qf[kk], sQ, warp * 16, kk * 16);
    }
    const bf16* cK = sK + buf * kBN * LDS;
    const bf16* cV = sV + buf * kBN * LDS;
    float s[NT][4];
    zero<NT>(s);
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        load_b_nk<D>(b, cK, np * 16, kk * 16);
        mma_bf16(s[2 * np], qf[kk], b[0], b[1]);
        mma_bf16(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }
    int64_t base, end;
    kt.at(k, base, end);
    const bool full = tile_full(w, base, end, t0, rb_last);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
      if (!full) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = base + nt * 8 + (lane % 4) * 2 + e;
          if (!(j < end && ta < n && sees(w, ta, rba, j))) s[nt][e] = -INFINITY;
          if (!(j < end && tb < n && sees(w, tb, rbb, j))) s[nt][2 + e] = -INFINITY;
        }
      }
    }
    online_softmax_step(s, o, m_a, m_b, l_a, l_b);
    times_rows<D, kBN>(o, s, cV);
    __syncthreads();  // the next iteration's loads overwrite this buffer
  }
  if (kt.count == 0) cp_async_wait<0>();
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
  float* oh = O + static_cast<int64_t>(h) * D + (lane % 4) * 2;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    if (ta < n)
      *reinterpret_cast<float2*>(oh + ta * qs + nt * 8) =
          make_float2(o[nt][0] * inv_a, o[nt][1] * inv_a);
    if (tb < n)
      *reinterpret_cast<float2*>(oh + tb * qs + nt * 8) =
          make_float2(o[nt][2] * inv_b, o[nt][3] * inv_b);
  }
  if (lane % 4 == 0) {
    // lse = ln sum exp(scale s) = (m + log2 l) / log2(e), m and l in base 2.
    if (ta < n) lse[ta * nq + h] = l_a > 0.0f ? (m_a + log2f(l_a)) / kLog2e : -INFINITY;
    if (tb < n) lse[tb * nq + h] = l_b > 0.0f ? (m_b + log2f(l_b)) / kLog2e : -INFINITY;
  }
}

// ---- backward ----

// Dt[r] = dO[r] . O[r] over rows r = (t, h) of d (a multiple of 4) elements; one warp per row.
__global__ void row_dot_bf16_kernel(const bf16* dO, const float* O, int64_t rows, int d,
                                    float* Dt) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  float acc = 0.0f;
  for (int i = 4 * lane; i < d; i += 128) {
    const float4 o = *reinterpret_cast<const float4*>(O + r * d + i);
    const uint2 u = *reinterpret_cast<const uint2*>(dO + r * d + i);
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    acc += lo.x * o.x + lo.y * o.y + hi.x * o.z + hi.y * o.w;
  }
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) Dt[r] = acc;
}

// dQ: block = 64 query rows of head h, over the same key tiles as the forward.
template <int D>
__global__ void __launch_bounds__(kThreads)
    tc_dq_kernel(const bf16* Q, const bf16* K, const bf16* V, const float* lse, const float* Dt,
                 const bf16* dO, int64_t n, int nq, int nkv, Window w, float scale_log2,
                 float scale, float* dQ) {
  constexpr int LDS = lds<D>(), NT = kBN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sdO = sQ + kRows * LDS;
  bf16* sK = sdO + kRows * LDS;   // [2][kBN][LDS]
  bf16* sV = sK + 2 * kBN * LDS;  // [2][kBN][LDS]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock<D> qb(K, V, n, nq, nkv, w);
  const int h = qb.h;
  const int64_t t0 = qb.t0, t1 = qb.t1, qs = qb.qs;
  const KeyTiles& kt = qb.kt;
  const auto load_kv = [&](int64_t k, int buf) { qb.load_kv(sK, sV, k, buf); };
  const int64_t off = static_cast<int64_t>(h) * D + t0 * qs;
  load_rows<D>(sQ, Q + off, qs, 0, n - t0, kRows);
  load_rows<D>(sdO, dO + off, qs, 0, n - t0, kRows);
  if (kt.count > 0) load_kv(0, 0);
  cp_async_commit();

  const int64_t ta = t0 + warp * 16 + lane / 4, tb = ta + 8;
  const int64_t rba = recent_begin(w, ta), rbb = recent_begin(w, tb);
  const int64_t rb_last = recent_begin(w, t1 - 1);
  const float la = ta < n ? lse[ta * nq + h] * kLog2e : 0.0f;
  const float lb = tb < n ? lse[tb * nq + h] * kLog2e : 0.0f;
  const float da = ta < n ? Dt[ta * nq + h] : 0.0f, db = tb < n ? Dt[tb * nq + h] : 0.0f;
  float acc[D / 8][4];
  zero<D / 8>(acc);
  for (int k = 0; k < kt.count; ++k) {
    const int buf = k & 1;
    next_tile_ready(k, kt.count, load_kv);
    const bf16* cK = sK + buf * kBN * LDS;
    const bf16* cV = sV + buf * kBN * LDS;
    float s[NT][4], dp[NT][4];
    zero<NT>(s);
    zero<NT>(dp);
    scores<D, NT>(s, sQ, warp * 16, cK);
    scores<D, NT>(dp, sdO, warp * 16, cV);
    int64_t base, end;
    kt.at(k, base, end);
    // s becomes dS = P (dP - D_t); invisible keys give 0.
    const bool full = tile_full(w, base, end, t0, rb_last);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t j = base + nt * 8 + (lane % 4) * 2 + e;
        const bool va = full || (j < end && ta < n && sees(w, ta, rba, j));
        const bool vb = full || (j < end && tb < n && sees(w, tb, rbb, j));
        const float pa = va ? exp2f(s[nt][e] * scale_log2 - la) : 0.0f;
        const float pb = vb ? exp2f(s[nt][2 + e] * scale_log2 - lb) : 0.0f;
        s[nt][e] = pa * (dp[nt][e] - da);
        s[nt][2 + e] = pb * (dp[nt][2 + e] - db);
      }
    }
    times_rows<D, kBN>(acc, s, cK);
    __syncthreads();
  }
  if (kt.count == 0) cp_async_wait<0>();
  float* qh = dQ + static_cast<int64_t>(h) * D + (lane % 4) * 2;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    if (ta < n)
      *reinterpret_cast<float2*>(qh + ta * qs + nt * 8) =
          make_float2(acc[nt][0] * scale, acc[nt][1] * scale);
    if (tb < n)
      *reinterpret_cast<float2*>(qh + tb * qs + nt * 8) =
          make_float2(acc[nt][2] * scale, acc[nt][3] * scale);
  }
}

// How the dK/dV grid splits the work (host and device agree through this struct).
struct DkvPlan {
  int64_t tiles;       // key tiles of kRows keys
  int64_t sink_tiles;  // tiles [0, sink_tiles) hold a sink: split into segments
  int64_t segments;    // per sink tile
  int64_t seg_len;     // query positions per segment (a multiple of kBQ)
  __host__ __device__ int64_t blocks() const {
    return sink_tiles * segments + (tiles - sink_tiles);
  }
  __host__ __device__ int64_t partial_keys() const { return sink_tiles * kRows; }
};

DkvPlan dkv_plan(int64_t n, const Window& w) {
  DkvPlan p;
  p.tiles = (n + kRows - 1) / kRows;
  p.sink_tiles = std::min(p.tiles, (w.sink + kRows - 1) / kRows);
  // A segment about as long as what another tile's block sees (recent + its own 64 keys, plus a
  // block for the block mask), at least 256 positions, at most kMaxSegments segments.
  const int64_t span = w.recent + kRows + (w.kind == 2 ? w.block : 0);
  int64_t len = std::max<int64_t>(256, span);
  len = std::max(len, (n + kMaxSegments - 1) / kMaxSegments);
  p.seg_len = (len + kBQ - 1) / kBQ * kBQ;
  p.segments = p.sink_tiles > 0 ? (n + p.seg_len - 1) / p.seg_len : 0;
  return p;
}

// dK, dV: block = 64 keys of KV head g (blockIdx.y); blockIdx.x picks the tile (and segment).
template <int D>
__global__ void __launch_bounds__(kThreads)
    tc_dkv_kernel(const bf16* Q, const bf16* K, const bf16* V, const float* lse, const float* Dt,
                  const bf16* dO, int64_t n, int nq, int nkv, Window w, float scale_log2,
                  float scale, DkvPlan plan, float* dK, float* dV, float* pK, float* pV) {
  constexpr int LDS = lds<D>(), NT = kBQ / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);
  bf16* sV = sK + kRows * LDS;
  bf16* sQ = sV + kRows * LDS;                                     // [2][kBQ][LDS]
  bf16* sdO = sQ + 2 * kBQ * LDS;                                  // [2][kBQ][LDS]
  int64_t* sRb = reinterpret_cast<int64_t*>(sdO + 2 * kBQ * LDS);  // [2][kBQ] recent_begin
  float* sL = reinterpret_cast<float*>(sRb + 2 * kBQ);             // [2][kBQ] lse * log2(e)
  float* sD = sL + 2 * kBQ;                                        // [2][kBQ] D_t
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = blockIdx.y, G = nq / nkv;
  const int64_t bx = blockIdx.x;
  const bool split = bx < plan.sink_tiles * plan.segments;
  const int64_t tile =
      split ? bx / plan.segments : plan.sink_tiles + (bx - plan.sink_tiles * plan.segments);
  const int64_t seg = split ? bx % plan.segments : 0;
  const int64_t j0 = tile * kRows, j1 = min(n, j0 + kRows);
  // Query positions [q0, q1) of this block: causal from j0, up to the last query of the tile's
  // last key (or the segment's end).
  int64_t q0 = j0, q1 = last_query(w, j1 - 1, n) + 1;
  if (split) {
    q0 = j0 + seg * plan.seg_len;
    q1 = min(n, q0 + plan.seg_len);
  }
  const int64_t qs = static_cast<int64_t>(nq) * D, ks = static_cast<int64_t>(nkv) * D;
  const int64_t koff = static_cast<int64_t>(g) * D;
  load_rows<D>(sK, K + koff + j0 * ks, ks, 0, j1 - j0, kRows);
  load_rows<D>(sV, V + koff + j0 * ks, ks, 0, j1 - j0, kRows);
  // Work items: (query tile of kBQ positions, query head of the group), head fastest.
  const int64_t items = q1 > q0 ? (q1 - q0 + kBQ - 1) / kBQ * G : 0;
  auto load_item = [&](int64_t it, int buf) {
    const int64_t p0 = q0 + it / G * kBQ;
    const int h = g * G + static_cast<int>(it % G);
    const int64_t off = static_cast<int64_t>(h) * D + p0 * qs;
    load_rows<D>(sQ + buf * kBQ * LDS, Q + off, qs, 0, q1 - p0, kBQ);
    load_rows<D>(sdO + buf * kBQ * LDS, dO + off, qs, 0, q1 - p0, kBQ);
    if (threadIdx.x < kBQ) {
      const int64_t t = p0 + threadIdx.x;
      const bool ok = t < q1;
      sRb[buf * kBQ + threadIdx.x] = ok ? recent_begin(w, t) : 0;
      sL[buf * kBQ + threadIdx.x] = ok ? lse[t * nq + h] * kLog2e : 0.0f;
      sD[buf * kBQ + threadIdx.x] = ok ? Dt[t * nq + h] : 0.0f;
    }
  };
  if (items > 0) load_item(0, 0);
  cp_async_commit();

  const int64_t ja = j0 + warp * 16 + lane / 4, jb = ja + 8;  // this thread's key rows
  float dk[D / 8][4], dv[D / 8][4];
  zero<D / 8>(dk);
  zero<D / 8>(dv);
  for (int64_t it = 0; it < items; ++it) {
    const int buf = static_cast<int>(it & 1);
    next_tile_ready(it, items, load_item);
    const bf16* cQ = sQ + buf * kBQ * LDS;
    const bf16* cdO = sdO + buf * kBQ * LDS;
    // S^T and dP^T (16 keys x 32 query rows per warp).
    float s[NT][4], dp[NT][4];
    zero<NT>(s);
    zero<NT>(dp);
    scores<D, NT>(s, sK, warp * 16, cQ);
    scores<D, NT>(dp, sV, warp * 16, cdO);
    const int64_t p0 = q0 + it / G * kBQ;
    // s becomes P^T, dp becomes dS^T = P^T (dP^T - D_t); invisible pairs give 0. Every pair is
    // visible when the whole query tile is past the keys and inside their window.
    const bool full = j1 - j0 == kRows && p0 + kBQ <= q1 && j0 + kRows - 1 <= p0 &&
                      (j0 + kRows <= w.sink || j0 >= recent_begin(w, p0 + kBQ - 1));
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = nt * 8 + (lane % 4) * 2 + e;  // query row within the tile
        const int64_t t = p0 + c;
        const int64_t rb = sRb[buf * kBQ + c];
        const float L = sL[buf * kBQ + c], Dc = sD[buf * kBQ + c];
        const bool va = full || (t < q1 && ja < j1 && sees(w, t, rb, ja));
        const bool vb = full || (t < q1 && jb < j1 && sees(w, t, rb, jb));
        const float pa = va ? exp2f(s[nt][e] * scale_log2 - L) : 0.0f;
        const float pb = vb ? exp2f(s[nt][2 + e] * scale_log2 - L) : 0.0f;
        s[nt][e] = pa;
        s[nt][2 + e] = pb;
        dp[nt][e] = pa * (dp[nt][e] - Dc);
        dp[nt][2 + e] = pb * (dp[nt][2 + e] - Dc);
      }
    }
    times_rows<D, kBQ>(dv, s, cdO);
    times_rows<D, kBQ>(dk, dp, cQ);
    __syncthreads();
  }
  if (items == 0) cp_async_wait<0>();
  // Out: rows ja, jb; a split tile's segment goes to its slice of the partials [segment][key of
  // the sink tiles][nkv][D].
  float* out_k = split ? pK + seg * plan.partial_keys() * ks : dK;
  float* out_v = split ? pV + seg * plan.partial_keys() * ks : dV;
  const int64_t limit = split ? plan.partial_keys() : n;
  const int col = (lane % 4) * 2;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    if (ja < limit) {
      const int64_t o = ja * ks + koff + nt * 8 + col;
      *reinterpret_cast<float2*>(out_k + o) = make_float2(dk[nt][0] * scale, dk[nt][1] * scale);
      *reinterpret_cast<float2*>(out_v + o) = make_float2(dv[nt][0], dv[nt][1]);
    }
    if (jb < limit) {
      const int64_t o = jb * ks + koff + nt * 8 + col;
      *reinterpret_cast<float2*>(out_k + o) = make_float2(dk[nt][2] * scale, dk[nt][3] * scale);
      *reinterpret_cast<float2*>(out_v + o) = make_float2(dv[nt][2], dv[nt][3]);
    }
  }
}

// dK/dV of the sink tiles' keys: the sum of the segments' partials, in segment order.
__global__ void sum_segments_kernel(const float* pK, const float* pV, int64_t segments,
                                    int64_t stride, int64_t count, float* dK, float* dV) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float k = 0.0f, v = 0.0f;
    for (int64_t z = 0; z < segments; ++z) {
      k += pK[z * stride + e];
      v += pV[z * stride + e];
    }
    dK[e] = k;
    dV[e] = v;
  }
}

template <int D>
constexpr int fwd_smem() {
  return (kRows + 4 * kBN) * lds<D>() * static_cast<int>(sizeof(bf16));
}
template <int D>
constexpr int dq_smem() {
  return (2 * kRows + 4 * kBN) * lds<D>() * static_cast<int>(sizeof(bf16));
}
template <int D>
constexpr int dkv_smem() {
  return (2 * kRows + 4 * kBQ) * lds<D>() * static_cast<int>(sizeof(bf16)) +
         2 * kBQ * static_cast<int>(sizeof(int64_t) + 2 * sizeof(float));
}

// Dynamic shared memory above 48 KB needs the attribute once per kernel.
template <class Kernel>
void allow_smem(Kernel k, int bytes, std::atomic<bool>& done) {
  if (done.load()) return;
  DUO_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.store(true);
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail("CUDA launch of ", what, " failed: ", cudaGetErrorString(e));
}

void check_args(int64_t n, int nq, int nkv, int d, const Window& w) {
  check(window_attention_tc_supported(d, w), "window attention (tensor cores): head_dim ", d,
        " window kind ", w.kind, " not supported (64 or 128; kinds 1 and 2)");
  check(nkv > 0 && nq % nkv == 0, "window attention: ", nq, " query heads for ", nkv, " KV heads");
  check((n + kRows - 1) / kRows <= 0x7fffffff, "window attention: n too large");
}

template <int D>
void forward_d(const bf16* Q, const bf16* K, const bf16* V, int64_t n, int nq, int nkv, Window w,
               float* O, float* lse, cudaStream_t s) {
  static std::atomic<bool> attr{false};
  allow_smem(tc_forward_kernel<D>, fwd_smem<D>(), attr);
  const dim3 grid(static_cast<unsigned>((n + kRows - 1) / kRows), static_cast<unsigned>(nq));
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(D));
  tc_forward_kernel<D>
      <<<grid, kThreads, fwd_smem<D>(), s>>>(Q, K, V, n, nq, nkv, w, scale_log2, O, lse);
  check_launch("window attention forward (tensor cores)");
}

template <int D>
void backward_d(const bf16* Q, const bf16* K, const bf16* V, const float* lse, const float* Dt,
                const bf16* dO, int64_t n, int nq, int nkv, Window w, float* dQ, float* dK,
                float* dV, float* partials, cudaStream_t s) {
  static std::atomic<bool> attr_q{false}, attr_kv{false};
  allow_smem(tc_dq_kernel<D>, dq_smem<D>(), attr_q);
  allow_smem(tc_dkv_kernel<D>, dkv_smem<D>(), attr_kv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D)), scale_log2 = kLog2e * scale;
  const dim3 gq(static_cast<unsigned>((n + kRows - 1) / kRows), static_cast<unsigned>(nq));
  tc_dq_kernel<D><<<gq, kThreads, dq_smem<D>(), s>>>(Q, K, V, lse, Dt, dO, n, nq, nkv, w,
                                                     scale_log2, scale, dQ);
  check_launch("window attention dQ (tensor cores)");
  const DkvPlan plan = dkv_plan(n, w);
  check(plan.blocks() <= 0x7fffffff, "window attention: too many dK/dV blocks");
  const int64_t pstride = plan.partial_keys() * nkv * D;
  float* pK = partials;
  float* pV = partials == nullptr ? nullptr : partials + plan.segments * pstride;
  check(plan.segments == 0 || partials != nullptr, "window attention: no workspace for dK/dV");
  const dim3 gkv(static_cast<unsigned>(plan.blocks()), static_cast<unsigned>(nkv));
  tc_dkv_kernel<D><<<gkv, kThreads, dkv_smem<D>(), s>>>(Q, K, V, lse, Dt, dO, n, nq, nkv, w,
                                                        scale_log2, scale, plan, dK, dV, pK, pV);
  check_launch("window attention dK/dV (tensor cores)");
  if (plan.segments == 0) return;
  const int64_t count = std::min(plan.partial_keys(), n) * nkv * D;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((count + 255) / 256, 4096));
  sum_segments_kernel<<<blocks, 256, 0, s>>>(pK, pV, plan.segments, pstride, count, dK, dV);
  check_launch("window attention dK/dV segment sum");
}

}  // namespace

bool window_attention_tc_supported(int d, const Window& w) {
  return (d == 64 || d == 128) && (w.kind == 1 || w.kind == 2);
}

void window_attention_tc_forward(const bf16* Q, const bf16* K, const bf16* V, int64_t n, int nq,
                                 int nkv, int d, Window w, float* O, float* lse, cudaStream_t s) {
  check_args(n, nq, nkv, d, w);
  if (n == 0) return;
  if (d == 64) return forward_d<64>(Q, K, V, n, nq, nkv, w, O, lse, s);
  forward_d<128>(Q, K, V, n, nq, nkv, w, O, lse, s);
}

int64_t window_attention_tc_workspace(int64_t n, int nkv, int d, const Window& w) {
  const DkvPlan p = dkv_plan(n, w);
  return 2 * p.segments * p.partial_keys() * nkv * d * static_cast<int64_t>(sizeof(float));
}

void window_attention_tc_backward(const bf16* Q, const bf16* K, const bf16* V, const float* O,
                                  const float* lse, const bf16* dO, int64_t n, int nq, int nkv,
                                  int d, Window w, float* dQ, float* dK, float* dV, float* scratch,
                                  void* workspace, cudaStream_t s) {
  check_args(n, nq, nkv, d, w);
  if (n == 0) return;
  const int64_t rows = n * nq;
  row_dot_bf16_kernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, s>>>(dO, O, rows, d,
                                                                            scratch);
  check_launch("row_dot_bf16");
  float* partials = static_cast<float*>(workspace);
  if (d == 64)
    return backward_d<64>(Q, K, V, lse, scratch, dO, n, nq, nkv, w, dQ, dK, dV, partials, s);
  backward_d<128>(Q, K, V, lse, scratch, dO, n, nq, nkv, w, dQ, dK, dV, partials, s);
}

}  // namespace duo::cuda::gate_kernels
