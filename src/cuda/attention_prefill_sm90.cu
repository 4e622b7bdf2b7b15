// Prefill attention for Hopper (sm_90a): warpgroup MMA (wgmma) with a warp-specialised pipeline,
// head_dim 128, both head types in one launch; same semantics as attention_prefill.cu (which stays
// the fallback for other GPUs, head_dim 64, and whenever this kernel is not compiled in).
//
// Block = 2 consumer warpgroups (64 query rows each, BM = 128) + 1 producer warpgroup (which
// gives most of its registers to the consumers with setmaxnreg); grid (query tiles, query heads),
// longest tiles first. Keys are walked in tiles of BN = 128 positions over the tile's candidate
// ranges (retrieval: 0..t1; streaming: sinks then window), exactly as the mma.sync kernel does, so
// a streaming head still costs O(n * (S + R)).
//   producer: loads Q once, then K and V of each key tile into a 3-stage ring in the 128-byte-
//     swizzled layout wgmma descriptors expect. Whole tiles of retrieval heads (contiguous store
//     rows) come by TMA (one thread, two 64-column boxes per operand, completing on the stage's
//     "full" mbarrier with a transaction count); the rest (streaming heads, whose keys live in
//     store slots or the new-token tensors, and a range's partial last tile, zero-filled past its
//     end so P * V never meets NaN rows) is gathered row by row with cp.async, each thread's copies
//     arriving on the same mbarrier (cp.async.mbarrier.arrive.noinc). The cp.async-only version
//     ran at ~300-360 TFLOP/s, the copy issue being the bound (same kernel without loads: ~630).
//   consumers: S = Q K^T with Q and K from shared memory (wgmma m64n128k16, K-major), online
//     softmax in registers (base 2, scale folded into one FMA), O += P V with P from registers
//     (register-A wgmma) and V N-major from shared memory. QK^T of tile k and PV of tile k-1 are
//     issued back to back and the softmax of tile k overlaps the PV; the two warpgroups take turns
//     issuing (named barriers, "ping-pong") so one's softmax overlaps the other's MMAs. K and V are
//     separate pipelines: K of a stage goes back to the producer after QK^T, V after PV, through a
//     named barrier each (consumers bar.arrive, the producer bar.sync): an mbarrier wait loop in
//     the producer made ptxas serialise every wgmma of the kernel (warning C7520).
//   Masks are evaluated per element only where needed (causal diagonal / range end for retrieval
//   heads; every tile of a streaming head).
//
// Shared memory (1024-byte aligned, swizzle atoms of 8 rows x 128 bytes): a [rows x 128] bf16 tile
// is stored as two column blocks of 64 elements, block c at c * rows * 128 bytes; element (r, e)
// of a block at r * 128 + ((e / 8) ^ (r % 8)) * 16 + (e % 8) * 2.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "core/error.h"
#include "cuda/async_copy.cuh"
#include "cuda/attention_internal.cuh"
#include "cuda/cuda_check.h"

// wgmma and setmaxnreg exist only on the arch-specific sm_90a target.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DUO_SM90A_DEVICE 1
#else
#define DUO_SM90A_DEVICE 0
#endif

namespace duo::cuda::detail {
namespace {

constexpr int kD = 128;
constexpr int kBM = 128;  // query rows per block (2 warpgroups x 64)
constexpr int kBN = 128;  // keys per tile
constexpr int kStages = 3;
constexpr int kConsumerThreads = 256;
constexpr int kProducerThreads = 128;
constexpr int kThreads = kConsumerThreads + kProducerThreads;
// Registers per thread after setmaxnreg: 128 * 40 + 256 * 232 <= 65536.
[[maybe_unused]] constexpr int kProducerRegs = 40, kConsumerRegs = 232;
constexpr int kTileBytes = kBN * kD * 2;  // one K (or V) tile
constexpr int kQBytes = kBM * kD * 2;
// Default: the wgmma kernel from this many new tokens on (below, 64-row mma.sync tiles waste less).
[[maybe_unused]] constexpr int64_t kSm90MinN = 1024;
constexpr int kSmemBytes = 1024 + kQBytes + kStages * 2 * kTileBytes + (2 * kStages + 1) * 8;
// Named barriers: 0 __syncthreads, 1-2 ping-pong turns, 3.. "K of stage s is free", then V.
[[maybe_unused]] constexpr int kBarTurn = 1, kBarKFree = 3, kBarVFree = 3 + kStages;

#if DUO_SM90A_DEVICE
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrives on `bar` once all of this thread's earlier cp.async have landed (counts as one arrival).
__device__ __forceinline__ void mbar_arrive_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives and adds `bytes` to the transaction count the phase waits for (TMA completions).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// TMA: box (64 columns from c0, kBN rows from row) of `map` into shared memory at dst (swizzled
// by the map), completing on mbarrier bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int row,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(row), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from touching accumulator registers across an asynchronous wgmma.
__device__ __forceinline__ void reg_fence(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}
__device__ __forceinline__ void reg_fence(uint32_t& r) {
  asm volatile("" : "+r"(r)::"memory");
}
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// D[64x128] (+)= A[64x16] * B[16x128]; A and B from shared memory (K-major descriptors).
__device__ __forceinline__ void wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b,
                                         int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, "
      "%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
// D[64x128] += A[64x16] * B[16x128]; A from registers (4 x bf16x2 per thread), B from shared
// memory, N-major (transposed) descriptor.
__device__ __forceinline__ void wgmma_rs_tb(float* d, const uint32_t* a, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, "
      "%27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, "
      "%63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// Shared-memory matrix descriptor, 128-byte swizzle. K-major operands: SBO = 1024 (8 rows of 128
// bytes), LBO unused (1). N-major V: LBO = distance between the two 64-column blocks, SBO = 1024.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// Key tiles of a query tile: the candidate ranges cut into kBN-key tiles (the last one of a range
// may be partial).
struct KeyTiles {
  int64_t rb[2], re[2];
  int nt0 = 0, ntiles = 0;
  __device__ __forceinline__ void at(int k, int64_t& base, int64_t& end) const {
    if (k < nt0) {
      base = rb[0] + static_cast<int64_t>(k) * kBN;
      end = re[0];
    } else {
      base = rb[1] + static_cast<int64_t>(k - nt0) * kBN;
      end = re[1];
    }
  }
};

// Byte offset of 16-byte chunk ch (0..15) of row `row` in a swizzled [rows x 128] bf16 tile.
__device__ __forceinline__ uint32_t swizzled(int rows, int row, int ch) {
  return static_cast<uint32_t>((ch >> 3) * rows * 128 + row * 128 + (((ch & 7) ^ (row & 7)) << 4));
}
#endif  // DUO_SM90A_DEVICE

// tma_k / tma_v: tensor maps over the retrieval stores viewed as [num_retrieval * capacity, 128]
// (boxes of 128 rows x 64 columns, 128-byte swizzle); unused when there are no retrieval heads.
template <bool kPingPong>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_sm90_kernel(const KArgs a, const __grid_constant__ CUtensorMap tma_k,
                        const __grid_constant__ CUtensorMap tma_v) {
#if DUO_SM90A_DEVICE
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sKV = sQ + kQBytes;  // stage s: K at sKV + 2 s kTileBytes, V right after
  const uint32_t bar_kfull = sKV + kStages * 2 * kTileBytes;  // K of stage s landed
  const uint32_t bar_vfull = bar_kfull + kStages * 8;         // V of stage s landed
  const uint32_t bar_q = bar_vfull + kStages * 8;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Broadcasts make warp-uniformity visible to the compiler (wgmma must not sit on a path it
  // considers divergent, or it serialises them).
  const int wgi = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int64_t p0 = __shfl_sync(0xffffffffu, load_p0(a), 0);
  const int64_t n = a.n;
  const int num_qt = static_cast<int>((n + kBM - 1) / kBM);
  const int qt = num_qt - 1 - static_cast<int>(blockIdx.x);  // longest tiles first
  const int h = blockIdx.y;
  const int g = h / a.group;
  const bool retrieval = g < a.num_retrieval;
  const int64_t i0 = static_cast<int64_t>(qt) * kBM;
  const int64_t i1 = i0 + kBM < n ? i0 + kBM : n;
  const int64_t t0 = p0 + i0, t1 = p0 + i1 - 1;

  KeyTiles tiles;
  const int nr = candidate_ranges(a, retrieval, t0, t1, p0, tiles.rb, tiles.re);
  tiles.nt0 = nr > 0 ? static_cast<int>((tiles.re[0] - tiles.rb[0] + kBN - 1) / kBN) : 0;
  const int nt1 = nr > 1 ? static_cast<int>((tiles.re[1] - tiles.rb[1] + kBN - 1) / kBN) : 0;
  tiles.ntiles = tiles.nt0 + nt1;
  const int ntiles = tiles.ntiles;
  const int64_t q_stride = static_cast<int64_t>(a.num_heads) * kD;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_kfull + 8 * s, kProducerThreads);  // one cp.async arrival per producer thread
      mbar_init(bar_vfull + 8 * s, kProducerThreads);
    }
    mbar_init(bar_q, kProducerThreads);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wgi == kConsumerThreads / 128) {
    // ---- Producer warpgroup: Q once, then K/V tiles into the stage ring.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    const int pt = tid - kConsumerThreads;
    for (int c = pt; c < kBM * 16; c += kProducerThreads) {
      const int row = c >> 4, ch = c & 15;
      const int64_t i = i0 + row;
      const bool ok = i < n;
      const bf16* src = a.q + (ok ? i : 0) * q_stride + static_cast<int64_t>(h) * kD + ch * 8;
      cp_async16(sQ + swizzled(kBM, row, ch), src, ok);
    }
    mbar_arrive_copies(bar_q);
    // K and V of a tile are separate pipelines: K is released after QK^T, V only after PV.
    // Whole tiles of retrieval heads (contiguous store rows) come by TMA, issued by one thread;
    // everything else (streaming heads, a range's partial last tile) is gathered with cp.async.
    for (int k = 0; k < ntiles; ++k) {
      const int s = k % kStages;
      int64_t base, end;
      tiles.at(k, base, end);
      const uint32_t dK = sKV + s * 2 * kTileBytes, dV = dK + kTileBytes;
      const uint32_t kfull = bar_kfull + 8 * s, vfull = bar_vfull + 8 * s;
      if (k >= kStages) named_bar_sync(kBarKFree + s, kThreads);
      if (retrieval && base + kBN <= end) {
        const int row = static_cast<int>(g * a.capacity + base);
        if (pt == 0) {
          mbar_arrive_expect_tx(kfull, kTileBytes);
          tma_load_2d(dK, &tma_k, 0, row, kfull);
          tma_load_2d(dK + kBN * 128, &tma_k, 64, row, kfull);
        } else {
          mbar_arrive(kfull);
        }
        if (k >= kStages) named_bar_sync(kBarVFree + s, kThreads);
        if (pt == 0) {
          mbar_arrive_expect_tx(vfull, kTileBytes);
          tma_load_2d(dV, &tma_v, 0, row, vfull);
          tma_load_2d(dV + kBN * 128, &tma_v, 64, row, vfull);
        } else {
          mbar_arrive(vfull);
        }
      } else {
        if (k >= kStages) named_bar_sync(kBarVFree + s, kThreads);
#pragma unroll 2
        for (int c = pt; c < kBN * 16; c += kProducerThreads) {
          const int row = c >> 4, ch = c & 15;
          const int64_t j = base + row;
          const bool ok = j < end;
          const bf16* ks = a.k_new;
          const bf16* vs = a.v_new;
          if (ok) {
            ks = key_row<kD>(a, g, retrieval, j, p0, false) + ch * 8;
            vs = key_row<kD>(a, g, retrieval, j, p0, true) + ch * 8;
          }
          const uint32_t off = swizzled(kBN, row, ch);
          cp_async16(dK + off, ks, ok);
          cp_async16(dV + off, vs, ok);
        }
        mbar_arrive_copies(kfull);
        mbar_arrive_copies(vfull);
      }
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));

    // ---- Consumer warpgroups: wg owns query rows [64 wg, 64 wg + 64) of the tile; this thread
    // owns rows a = 16 (warp % 4) + lane / 4 and b = a + 8 of them (wgmma accumulator layout).
    const int wg = wgi;
    const int q4 = lane % 4;
    const int64_t ra = i0 + wg * 64 + (warp % 4) * 16 + lane / 4, rb = ra + 8;  // local rows
    const int64_t ta = p0 + ra, tb = p0 + rb;
    const int64_t t0w = t0 + wg * 64;  // first query of this warpgroup
    const float sl = a.scale_log2;

    float o[64], s[64];
    uint32_t pf[32];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f, alpha_a = 1.f, alpha_b = 1.f;

    const uint32_t q_base = sQ + wg * 64 * 128;
    auto issue_qk = [&](int stage) {
      const uint32_t kb = sKV + stage * 2 * kTileBytes;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint64_t da = make_desc(q_base + (kk >> 2) * (kBM * 128) + (kk & 3) * 32, 16, 1024);
        const uint64_t db = make_desc(kb + (kk >> 2) * (kBN * 128) + (kk & 3) * 32, 16, 1024);
        wgmma_ss(s, da, db, kk > 0 ? 1 : 0);
      }
    };
    auto issue_pv = [&](int stage) {
      const uint32_t vb = sKV + stage * 2 * kTileBytes + kTileBytes;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_rs_tb(o, &pf[4 * kk], make_desc(vb + kk * 16 * 128, kBN * 128, 1024));
    };
    // Masks tile k's scores, updates the running max / sum, leaves P = 2^(s*sl - m) in s and the
    // factor for O in alpha_a / alpha_b.
    auto softmax = [&](int k) {
      int64_t base, end;
      tiles.at(k, base, end);
      const bool need_mask = !retrieval || base + kBN > end || base + kBN - 1 > t0w;
      if (need_mask) {
#pragma unroll
        for (int j = 0; j < 16; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t key = base + 8 * j + 2 * q4 + e;
            const bool in = key < end;
            if (!(in && key_visible(a, retrieval, ta, key, p0))) s[4 * j + e] = -INFINITY;
            if (!(in && key_visible(a, retrieval, tb, key, p0))) s[4 * j + 2 + e] = -INFINITY;
          }
        }
      }
      float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        mx_a = fmaxf(mx_a, fmaxf(s[4 * j], s[4 * j + 1]));
        mx_b = fmaxf(mx_b, fmaxf(s[4 * j + 2], s[4 * j + 3]));
      }
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
      const float new_a = fmaxf(m_a, mx_a * sl), new_b = fmaxf(m_b, mx_b * sl);
      const float base_a = new_a == -INFINITY ? 0.f : new_a;
      const float base_b = new_b == -INFINITY ? 0.f : new_b;
      alpha_a = fast_exp2(m_a - base_a);
      alpha_b = fast_exp2(m_b - base_b);
      m_a = new_a;
      m_b = new_b;
      float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        s[4 * j] = fast_exp2(fmaf(s[4 * j], sl, -base_a));
        s[4 * j + 1] = fast_exp2(fmaf(s[4 * j + 1], sl, -base_a));
        s[4 * j + 2] = fast_exp2(fmaf(s[4 * j + 2], sl, -base_b));
        s[4 * j + 3] = fast_exp2(fmaf(s[4 * j + 3], sl, -base_b));
        sum_a += s[4 * j] + s[4 * j + 1];
        sum_b += s[4 * j + 2] + s[4 * j + 3];
      }
      l_a = l_a * alpha_a + sum_a;
      l_b = l_b * alpha_b + sum_b;
    };
    auto rescale_o = [&] {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        o[4 * j] *= alpha_a;
        o[4 * j + 1] *= alpha_a;
        o[4 * j + 2] *= alpha_b;
        o[4 * j + 3] *= alpha_b;
      }
    };
    // P (bf16) as the register A operand of the PV wgmma: k-step kk covers keys 16 kk .. 16 kk
    // + 15.
    auto convert_p = [&] {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        pf[4 * kk] = pack_bf16(s[8 * kk], s[8 * kk + 1]);
        pf[4 * kk + 1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        pf[4 * kk + 2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        pf[4 * kk + 3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };
    auto fence_s = [&] {
#pragma unroll
      for (int i = 0; i < 64; ++i) reg_fence(s[i]);
    };
    auto fence_o = [&] {
#pragma unroll
      for (int i = 0; i < 64; ++i) reg_fence(o[i]);
    };
    auto fence_p = [&] {
#pragma unroll
      for (int i = 0; i < 32; ++i) reg_fence(pf[i]);
    };
    auto wait_full = [&](uint32_t bars, int k) {
      mbar_wait(bars + 8 * (k % kStages), static_cast<uint32_t>((k / kStages) & 1));
      fence_proxy_async();  // for the cp.async (generic proxy) tiles
    };

    if (ntiles > 0) {
      mbar_wait(bar_q, 0);
      wait_full(bar_kfull, 0);
      wgmma_fence();
      issue_qk(0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_s();
      // Stages are handed back only where the producer waits for them (the counts match).
      if (kStages < ntiles) named_bar_arrive(kBarKFree, kThreads);
      softmax(0);
      convert_p();
      fence_p();
      // Ping-pong: warpgroup w issues its MMAs after barrier kBarTurn + w, then opens the other's.
      // Warpgroup 0 goes first; warpgroup 1 skips its last opening so the counts balance.
      if (kPingPong && wg == 1 && ntiles > 1) named_bar_arrive(kBarTurn, kConsumerThreads);
      for (int k = 1; k < ntiles; ++k) {
        wait_full(bar_kfull, k);
        wait_full(bar_vfull, k - 1);
        // The operand fences keep the compiler from sinking register writes past wgmma.fence.
        rescale_o();
        fence_o();
        if (kPingPong) named_bar_sync(kBarTurn + wg, kConsumerThreads);
        wgmma_fence();
        issue_qk(k % kStages);
        wgmma_commit();
        issue_pv((k - 1) % kStages);
        wgmma_commit();
        if (kPingPong && !(wg == 1 && k == ntiles - 1))
          named_bar_arrive(kBarTurn + 1 - wg, kConsumerThreads);
        wgmma_wait<1>();
        fence_s();
        if (k + kStages < ntiles) named_bar_arrive(kBarKFree + k % kStages, kThreads);
        softmax(k);
        wgmma_wait<0>();
        fence_o();
        fence_p();
        if (k - 1 + kStages < ntiles) named_bar_arrive(kBarVFree + (k - 1) % kStages, kThreads);
        convert_p();
        fence_p();
      }
      wait_full(bar_vfull, ntiles - 1);
      rescale_o();
      fence_o();
      wgmma_fence();
      issue_pv((ntiles - 1) % kStages);
      wgmma_commit();
      wgmma_wait<0>();
      fence_o();
    }

    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;
    const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
    bf16* out_h = a.out + static_cast<int64_t>(h) * kD + q4 * 2;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if (ra < n)
        *reinterpret_cast<uint32_t*>(out_h + ra * q_stride + j * 8) =
            pack_bf16(o[4 * j] * inv_a, o[4 * j + 1] * inv_a);
      if (rb < n)
        *reinterpret_cast<uint32_t*>(out_h + rb * q_stride + j * 8) =
            pack_bf16(o[4 * j + 2] * inv_b, o[4 * j + 3] * inv_b);
    }
  }  // consumers
#else
  (void)a;
  __trap();  // never launched: the host dispatches here only for sm_90a builds on sm_90 devices
#endif
}

// Tensor map over a retrieval store [rows, 128] bf16 (rows = num_retrieval * capacity).
CUtensorMap store_tensor_map(const bf16* store, int64_t rows) {
  using Encode = PFN_cuTensorMapEncodeTiled_v12000;
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    DUO_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                    cudaEnableDefault, &q));
    check(fn != nullptr && q == cudaDriverEntryPointSuccess,
          "attention: cuTensorMapEncodeTiled not available from the driver");
    return reinterpret_cast<Encode>(fn);
  }();
  CUtensorMap m{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kD), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kD) * sizeof(bf16)};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(kBN)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r =
      encode(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<bf16*>(store), dims, strides, box,
             elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  check(r == CUDA_SUCCESS, "attention: cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
  return m;
}

template <bool kPingPong>
void launch_sm90(const KArgs& a, cudaStream_t stream) {
  static std::atomic<bool> attr_set{false};  // per instantiation (setting it twice is harmless)
  if (!attr_set) {
    DUO_CUDA_CHECK(cudaFuncSetAttribute(prefill_sm90_kernel<kPingPong>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    attr_set = true;
  }
  const int64_t qt = (a.n + kBM - 1) / kBM;
  check(qt <= 0x7fffffff, "attention: n too large");
  const int64_t rows = static_cast<int64_t>(a.num_retrieval) * a.capacity;
  check(rows < (int64_t{1} << 31), "attention: retrieval store too large for TMA coordinates");
  CUtensorMap tk{}, tv{};
  if (rows > 0) {
    tk = store_tensor_map(a.rk, rows);
    tv = store_tensor_map(a.rv, rows);
  }
  dim3 grid(static_cast<unsigned>(qt), static_cast<unsigned>(a.num_heads));
  prefill_sm90_kernel<kPingPong><<<grid, kThreads, kSmemBytes, stream>>>(a, tk, tv);
  DUO_CUDA_CHECK(cudaGetLastError());
}

int env_int(const char* name, int fallback) {
  const char* e = std::getenv(name);
  return e == nullptr || *e == '\0' ? fallback : std::atoi(e);
}

}  // namespace

bool prefill_sm90_eligible(int64_t n, int head_dim) {
#if defined(DUO_CUDA_SM90A)
  // DUO_ATTN_SM90: 0 never, 1 whenever the shape fits (tests), unset: from kSm90MinN tokens.
  static const int mode = env_int("DUO_ATTN_SM90", -1);
  if (mode == 0 || head_dim != kD || n <= 0) return false;
  int dev = 0;
  DUO_CUDA_CHECK(cudaGetDevice(&dev));
  // Cached per device as dev * 2 + (1 when sm_90a code runs here: compute capability 9.0 only).
  static std::atomic<int> cached{-1};
  int c = cached.load(std::memory_order_relaxed);
  if (c < 0 || c / 2 != dev) {
    int major = 0, minor = 0;
    DUO_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    DUO_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    c = dev * 2 + (major == 9 && minor == 0 ? 1 : 0);
    cached.store(c, std::memory_order_relaxed);
  }
  if ((c & 1) == 0) return false;
  return mode == 1 || n >= kSm90MinN;
#else
  (void)n;
  (void)head_dim;
  return false;
#endif
}

void launch_prefill_sm90(const KArgs& a, cudaStream_t stream) {
  // Warpgroup ping-pong measured 3-9% faster on an H200 (bench/results/attention_h200.md);
  // DUO_ATTN_SM90_PINGPONG=0 turns it off (tuning).
  static const bool pingpong = env_int("DUO_ATTN_SM90_PINGPONG", 1) != 0;
  if (pingpong)
    launch_sm90<true>(a, stream);
  else
    launch_sm90<false>(a, stream);
}

}  // namespace duo::cuda::detail
