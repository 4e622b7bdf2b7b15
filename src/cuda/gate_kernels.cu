// Kernels of the CUDA gate optimisation (see gate_kernels.h). fp32 arithmetic on fp32 activations;
// reductions that feed the loss and the gate gradient are fp64 and in a fixed order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/gate_kernels.h"
#include "cuda/gate_window.cuh"
#include "engine/random_fill.h"

namespace duo::cuda::gate_kernels {

namespace {

constexpr unsigned kFull = 0xffffffffu;

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 16));
}

#define GRID_STRIDE(i, n)                                                                \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail("CUDA launch of ", what, " failed: ", cudaGetErrorString(e));
}

// The 4-wide element-wise kernels load and store 16 (fp32) or 8 (bf16) bytes at a time.
void check_aligned16(std::initializer_list<const void*> ptrs, const char* what) {
  for (const void* p : ptrs)
    check(reinterpret_cast<uintptr_t>(p) % 16 == 0, what, ": pointer ", p,
          " is not 16-byte aligned");
}

__device__ __forceinline__ float load_w(const void* p, bool is_bf16, int64_t i) {
  return is_bf16 ? __bfloat162float(static_cast<const bf16*>(p)[i])
                 : static_cast<const float*>(p)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// One output element, fp32 or rounded to bf16 (round to nearest even, like f32_to_bf16).
__device__ __forceinline__ void store_out(void* p, bool is_bf16, int64_t i, float v) {
  if (is_bf16)
    static_cast<bf16*>(p)[i] = __float2bfloat16(v);
  else
    static_cast<float*>(p)[i] = v;
}
// Four consecutive elements from i (a multiple of 4): one 16-byte (fp32) or 8-byte (bf16) store.
__device__ __forceinline__ void store_out4(void* p, bool is_bf16, int64_t i, float4 v) {
  if (is_bf16) {
    auto bits = [](float f) {
      return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16(f)));
    };
    reinterpret_cast<uint2*>(static_cast<bf16*>(p) + i)[0] =
        make_uint2(bits(v.x) | bits(v.y) << 16, bits(v.z) | bits(v.w) << 16);
  } else {
    reinterpret_cast<float4*>(static_cast<float*>(p) + i)[0] = v;
  }
}
__device__ __forceinline__ float4 load4(const float* p, int64_t i4) {
  return reinterpret_cast<const float4*>(p)[i4];
}

// Block-wide sums (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
template <class T>
__device__ T block_sum(T v) {
  __shared__ T partial[32];
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T s = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += partial[w];
  return s;
}

// ---- element-wise ----

__global__ void fill_normal_f32_kernel(float* out, int64_t n, float stddev, uint64_t seed) {
  GRID_STRIDE(i, n) out[i] = stddev * random_normal_at(seed, static_cast<uint64_t>(i));
}
__global__ void fill_normal_bf16_kernel(bf16* out, int64_t n, float stddev, uint64_t seed) {
  GRID_STRIDE(i, n)
  out[i] = __float2bfloat16(stddev * random_normal_at(seed, static_cast<uint64_t>(i)));
}
__global__ void fill_f32_kernel(float* out, int64_t n, float v) {
  GRID_STRIDE(i, n) out[i] = v;
}
// The element-wise kernels below take 4 elements per thread (16-byte loads; the launchers check
// 16-byte alignment), then the n % 4 tail.
__global__ void f32_to_bf16_kernel(const float* in, bf16* out, int64_t n) {
  const int64_t n4 = n / 4;
  GRID_STRIDE(i, n4) store_out4(out, true, 4 * i, load4(in, i));
  GRID_STRIDE(i, n - 4 * n4) out[4 * n4 + i] = __float2bfloat16(in[4 * n4 + i]);
}
__global__ void bf16_to_f32_kernel(const bf16* in, float* out, int64_t n) {
  GRID_STRIDE(i, n) out[i] = __bfloat162float(in[i]);
}
__global__ void embed_kernel(const void* table, bool tb, const int32_t* ids, int64_t rows,
                             int64_t cols, float* out) {
  GRID_STRIDE(e, rows * cols) {
    const int64_t r = e / cols, c = e % cols;
    out[e] = load_w(table, tb, static_cast<int64_t>(ids[r]) * cols + c);
  }
}
__device__ __forceinline__ float silu_mul(float g, float u) {
  return g / (1.0f + expf(-g)) * u;
}
__global__ void swiglu_forward_kernel(const float* g, const float* u, void* a, bool ab, int64_t n) {
  const int64_t n4 = n / 4;
  GRID_STRIDE(i, n4) {
    const float4 gv = load4(g, i), uv = load4(u, i);
    store_out4(a, ab, 4 * i,
               make_float4(silu_mul(gv.x, uv.x), silu_mul(gv.y, uv.y), silu_mul(gv.z, uv.z),
                           silu_mul(gv.w, uv.w)));
  }
  GRID_STRIDE(i, n - 4 * n4) {
    const int64_t e = 4 * n4 + i;
    store_out(a, ab, e, silu_mul(g[e], u[e]));
  }
}
// d/dg and d/du of silu(g) u times d.
__device__ __forceinline__ void swiglu_grad(float gi, float ui, float d, float& dg, float& du) {
  const float s = 1.0f / (1.0f + expf(-gi));
  du = d * gi * s;
  dg = d * ui * s * (1.0f + gi * (1.0f - s));
}
__global__ void swiglu_backward_kernel(const float* g, const float* u, const float* da, void* dg,
                                       void* du, bool ob, int64_t n) {
  const int64_t n4 = n / 4;
  GRID_STRIDE(i, n4) {
    const float4 gv = load4(g, i), uv = load4(u, i), dv = load4(da, i);
    float4 og, ou;
    swiglu_grad(gv.x, uv.x, dv.x, og.x, ou.x);
    swiglu_grad(gv.y, uv.y, dv.y, og.y, ou.y);
    swiglu_grad(gv.z, uv.z, dv.z, og.z, ou.z);
    swiglu_grad(gv.w, uv.w, dv.w, og.w, ou.w);
    store_out4(du, ob, 4 * i, ou);
    store_out4(dg, ob, 4 * i, og);
  }
  GRID_STRIDE(i, n - 4 * n4) {
    const int64_t e = 4 * n4 + i;
    float og, ou;
    swiglu_grad(g[e], u[e], da[e], og, ou);
    store_out(du, ob, e, ou);
    store_out(dg, ob, e, og);
  }
}
__global__ void add_kernel(float* x, const float* y, int64_t n) {
  const int64_t n4 = n / 4;
  GRID_STRIDE(i, n4) {
    const float4 a = load4(x, i), b = load4(y, i);
    reinterpret_cast<float4*>(x)[i] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
  }
  GRID_STRIDE(i, n - 4 * n4) x[4 * n4 + i] += y[4 * n4 + i];
}
__global__ void add_bias_kernel(float* y, const float* b, int64_t rows, int64_t cols) {
  GRID_STRIDE(i, rows * cols) y[i] += b[i % cols];
}
__global__ void add_bias_bf16_kernel(const float* y, const float* b, int64_t rows, int64_t cols,
                                     bf16* out) {
  GRID_STRIDE(i, rows * cols) out[i] = __float2bfloat16(y[i] + b[i % cols]);
}
// out may be x (fp32, in place): each thread reads its pair before writing it.
__global__ void rope_kernel(const float* x, const float* cos, const float* sin, int64_t rows,
                            int64_t heads, int64_t d, float sign, void* out, bool ob) {
  const int64_t half = d / 2;
  GRID_STRIDE(e, rows * heads * half) {
    const int64_t i = e % half, th = e / half, t = th / heads;
    const float* v = x + th * d;
    const float c = cos[t * half + i], s = sin[t * half + i];
    const float a = v[i], b = v[i + half];
    store_out(out, ob, th * d + i, a * c - sign * b * s);
    store_out(out, ob, th * d + i + half, b * c + sign * a * s);
  }
}

// ---- row-wise ----

__global__ void rmsnorm_forward_kernel(const float* x, const float* w, float eps, int64_t cols,
                                       void* y, bool yb, float* inv) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * cols;
  float ss = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
  ss = block_sum(ss);
  const float rr = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) inv[r] = rr;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    store_out(y, yb, r * cols + c, w[c] * (xr[c] * rr));
}

__global__ void rmsnorm_backward_kernel(const float* x, const float* w, const float* inv,
                                        const float* dy, int64_t cols, float* dx, bool acc,
                                        bf16* dxb) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * cols;
  const float* dyr = dy + r * cols;
  float dot = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dot += w[c] * dyr[c] * xr[c];
  dot = block_sum(dot);
  const float ri = inv[r];
  const float k = dot * ri * ri * ri / static_cast<float>(cols);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = ri * w[c] * dyr[c] - xr[c] * k;
    const float o = acc ? dx[r * cols + c] + g : g;
    dx[r * cols + c] = o;
    if (dxb != nullptr) dxb[r * cols + c] = __float2bfloat16(o);
  }
}

// ---- gate mix ----

constexpr int kMixRows = 64;

__global__ void gate_mix_forward_kernel(const void* F, bool fb, const float* S, const float* a,
                                        int64_t n, int64_t nq, int64_t G, int64_t d, void* M,
                                        bool mb) {
  GRID_STRIDE(e, n * nq * d) {
    const float al = a[(e / d) % nq / G];
    store_out(M, mb, e, al * load_w(F, fb, e) + (1.0f - al) * S[e]);
  }
}

// Block (row block, head h): partial[blk, h] = sum dM (F - S); dS = (1 - a) dM.
__global__ void gate_mix_backward_kernel(const void* F, bool fb, const float* S, const float* a,
                                         const float* dM, int64_t n, int64_t nq, int64_t G,
                                         int64_t d, double* partial, void* dS, bool dsb) {
  const int64_t blk = blockIdx.x, h = blockIdx.y;
  const int64_t t0 = blk * kMixRows, t1 = min(n, t0 + kMixRows);
  const float al = a[h / G];
  float acc = 0;
  for (int64_t e = threadIdx.x; e < (t1 - t0) * d; e += blockDim.x) {
    const int64_t t = t0 + e / d, i = e % d;
    const int64_t o = (t * nq + h) * d + i;
    const float dm = dM[o];
    acc += dm * (load_w(F, fb, o) - S[o]);
    store_out(dS, dsb, o, (1.0f - al) * dm);
  }
  const double s = block_sum(static_cast<double>(acc));
  if (threadIdx.x == 0) partial[blk * nq + h] = s;
}

__global__ void gate_mix_reduce_kernel(const double* partial, int64_t blocks, int64_t nq, int64_t G,
                                       double* da) {
  const int64_t g = blockIdx.x;
  double acc = 0;
  for (int64_t e = threadIdx.x; e < blocks * G; e += blockDim.x) {
    const int64_t b = e / G, h = g * G + e % G;
    acc += partial[b * nq + h];
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) da[g] = acc;
}

// ---- loss ----

__global__ void distill_rows_kernel(const float* y, const float* target, int64_t H,
                                    int64_t label_begin, double inv_denom2, double* row_loss,
                                    float* dy) {
  const int64_t r = blockIdx.x;
  const bool lab = r >= label_begin;
  double acc = 0;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    const int64_t o = r * H + c;
    const double diff = lab ? static_cast<double>(y[o]) - static_cast<double>(target[o]) : 0.0;
    acc += diff * diff;
    dy[o] = static_cast<float>(diff * inv_denom2);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) row_loss[r] = acc;
}

__global__ void sum_kernel(const double* v, int64_t n, double* out) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc;
}

// ---- windowed attention (fp32) ----
// Key ranges of a query: gate_window.cuh.

constexpr int kBK = 32;       // keys per tile (one per lane)
constexpr int kRowWarps = 8;  // row-centric kernels: 8 warps
constexpr int kRowsPerWarp = 4;
constexpr int kBQ = kRowWarps * kRowsPerWarp;  // 32 query rows per block

template <int D>
struct Tile {
  static constexpr int P = D + 4;  // padded row (16-byte aligned; conflict-free float4 per lane)
};

// Loads keys e0 .. e0+31 of the union list (index e -> key e < a1 ? e : b0 + e - a1) of KV head g
// into Ks/Vs [32][P]; rows past the list are zero.
template <int D>
__device__ void load_kv_tile(const float* K, const float* V, int64_t ks, int g, const KR& u,
                             int64_t e0, int64_t m, float* Ks, float* Vs) {
  constexpr int P = Tile<D>::P;
  for (int x = threadIdx.x; x < kBK * D / 4; x += blockDim.x) {
    const int kk = x / (D / 4), i4 = x % (D / 4);
    const int64_t e = e0 + kk;
    float4 kv = make_float4(0, 0, 0, 0), vv = kv;
    if (e < m) {
      const int64_t j = e < u.a1 ? e : u.b0 + (e - u.a1);
      kv = reinterpret_cast<const float4*>(K + j * ks + static_cast<int64_t>(g) * D)[i4];
      vv = reinterpret_cast<const float4*>(V + j * ks + static_cast<int64_t>(g) * D)[i4];
    }
    reinterpret_cast<float4*>(Ks + kk * P)[i4] = kv;
    reinterpret_cast<float4*>(Vs + kk * P)[i4] = vv;
  }
}

// dot of row a (smem, broadcast) with each of 4 rows r0..r3 against the lane's key row b.
template <int D>
__device__ __forceinline__ void dot4(const float* rows, int stride, const float* b, float out[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) out[r] = 0;
#pragma unroll 4
  for (int i4 = 0; i4 < D / 4; ++i4) {
    const float4 bv = reinterpret_cast<const float4*>(b)[i4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float4 av = reinterpret_cast<const float4*>(rows + r * stride)[i4];
      out[r] += av.x * bv.x + av.y * bv.y + av.z * bv.z + av.w * bv.w;
    }
  }
}

// acc[rr][c] += sum over the tile's keys k2 of x[rr](k2) * M[k2][lane + 32 c]: each row's
// per-key value x[rr] sits in lane k2 (P for P V in the forward, dS for dS K in dQ); lanes own
// dims lane + 32 c of the tile M (kBK rows of stride P in shared memory).
template <int D, int P, int PER>
__device__ __forceinline__ void rows_times_tile(float (&acc)[kRowsPerWarp][PER],
                                                const float (&x)[kRowsPerWarp], const float* M,
                                                int lane) {
#pragma unroll 4
  for (int k2 = 0; k2 < kBK; ++k2) {
    float m[PER];
#pragma unroll
    for (int c = 0; c < PER; ++c) {
      const int i = lane + 32 * c;
      m[c] = i < D ? M[k2 * P + i] : 0.0f;
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const float xk = __shfl_sync(kFull, x[rr], k2);
#pragma unroll
      for (int c = 0; c < PER; ++c) acc[rr][c] += xk * m[c];
    }
  }
}

// Forward: block = 32 query rows x one query head; warp w owns rows 4w..4w+3. Online softmax over
// the block's key union in tiles of 32 keys; lane = key for the scores, lane = dims for P V.
template <int D>
__global__ void __launch_bounds__(kRowWarps * 32)
    wattn_forward_kernel(const float* Q, const float* K, const float* V, int64_t n, int nq, int nkv,
                         Window w, float scale, float* O, float* lse) {
  constexpr int P = Tile<D>::P;
  constexpr int PER = (D + 31) / 32;
  extern __shared__ float4 smem4[];
  float* Ks = reinterpret_cast<float*>(smem4);
  float* Vs = Ks + kBK * P;
  float* Qs = Vs + kBK * P;  // [kBQ][D], pre-scaled
  const int h = blockIdx.y, g = h / (nq / nkv);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBQ, t1 = min(n, t0 + kBQ);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t qs = static_cast<int64_t>(nq) * D, ks = static_cast<int64_t>(nkv) * D;
  for (int x = threadIdx.x; x < kBQ * D; x += blockDim.x) {
    const int r = x / D, i = x % D;
    const int64_t t = t0 + r;
    Qs[x] = t < n ? Q[t * qs + static_cast<int64_t>(h) * D + i] * scale : 0.0f;
  }
  KR kr[kRowsPerWarp];
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][PER];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    kr[rr] = window_keys(w, min(t0 + warp * kRowsPerWarp + rr, n - 1));
    m[rr] = -INFINITY;
    l[rr] = 0;
#pragma unroll
    for (int c = 0; c < PER; ++c) acc[rr][c] = 0;
  }
  const KR u = key_union(w, t0, t1);
  const int64_t mk = u.a1 + (u.b1 - u.b0);
  const float* myQ = Qs + warp * kRowsPerWarp * D;
  for (int64_t e0 = 0; e0 < mk; e0 += kBK) {
    __syncthreads();
    load_kv_tile<D>(K, V, ks, g, u, e0, mk, Ks, Vs);
    __syncthreads();
    const int64_t e = e0 + lane;
    const int64_t j = e < u.a1 ? e : u.b0 + (e - u.a1);
    float s[kRowsPerWarp];
    dot4<D>(myQ, D, Ks + lane * P, s);
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t t = t0 + warp * kRowsPerWarp + rr;
      const bool vis = t < n && e < mk && visible(kr[rr], j);
      const float sc = vis ? s[rr] : -INFINITY;
      const float mx = warp_max(sc);
      if (mx == -INFINITY) {  // no key of this tile is visible to row rr (warp-uniform)
        s[rr] = 0;
        continue;
      }
      const float mnew = fmaxf(m[rr], mx);
      const float alpha = expf(m[rr] - mnew);
      const float p = vis ? expf(sc - mnew) : 0.0f;
      l[rr] = l[rr] * alpha + warp_sum(p);
      m[rr] = mnew;
#pragma unroll
      for (int c = 0; c < PER; ++c) acc[rr][c] *= alpha;
      s[rr] = p;
    }
    // P V: lanes own dims lane + 32 c.
    rows_times_tile<D, P, PER>(acc, s, Vs, lane);
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t t = t0 + warp * kRowsPerWarp + rr;
    if (t >= n) continue;
    const float invl = 1.0f / l[rr];
#pragma unroll
    for (int c = 0; c < PER; ++c) {
      const int i = lane + 32 * c;
      if (i < D) O[t * qs + static_cast<int64_t>(h) * D + i] = acc[rr][c] * invl;
    }
    if (lane == 0) lse[t * nq + h] = m[rr] + logf(l[rr]);
  }
}

// Dt[t, h] = dO . O
__global__ void row_dot_kernel(const float* dO, const float* O, int64_t rows, int d, float* out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  float acc = 0;
  for (int i = lane; i < d; i += 32) acc += dO[r * d + i] * O[r * d + i];
  acc = warp_sum(acc);
  if (lane == 0) out[r] = acc;
}

// dQ: row-centric like the forward. dS_j = P_j (dO . V_j - Dt); dQ = scale sum_j dS_j K_j.
template <int D>
__global__ void __launch_bounds__(kRowWarps * 32)
    wattn_dq_kernel(const float* Q, const float* K, const float* V, const float* lse,
                    const float* Dt, const float* dO, int64_t n, int nq, int nkv, Window w,
                    float scale, float* dQ) {
  constexpr int P = Tile<D>::P;
  constexpr int PER = (D + 31) / 32;
  extern __shared__ float4 smem4[];
  float* Ks = reinterpret_cast<float*>(smem4);
  float* Vs = Ks + kBK * P;
  float* Qs = Vs + kBK * P;   // [kBQ][D], pre-scaled
  float* dOs = Qs + kBQ * D;  // [kBQ][D]
  const int h = blockIdx.y, g = h / (nq / nkv);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBQ, t1 = min(n, t0 + kBQ);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t qs = static_cast<int64_t>(nq) * D, ks = static_cast<int64_t>(nkv) * D;
  for (int x = threadIdx.x; x < kBQ * D; x += blockDim.x) {
    const int r = x / D, i = x % D;
    const int64_t t = t0 + r;
    const int64_t o = t * qs + static_cast<int64_t>(h) * D + i;
    Qs[x] = t < n ? Q[o] * scale : 0.0f;
    dOs[x] = t < n ? dO[o] : 0.0f;
  }
  KR kr[kRowsPerWarp];
  float L[kRowsPerWarp], Dr[kRowsPerWarp], acc[kRowsPerWarp][PER];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t t = min(t0 + warp * kRowsPerWarp + rr, n - 1);
    kr[rr] = window_keys(w, t);
    L[rr] = lse[t * nq + h];
    Dr[rr] = Dt[t * nq + h];
#pragma unroll
    for (int c = 0; c < PER; ++c) acc[rr][c] = 0;
  }
  const KR u = key_union(w, t0, t1);
  const int64_t mk = u.a1 + (u.b1 - u.b0);
  const float* myQ = Qs + warp * kRowsPerWarp * D;
  const float* mydO = dOs + warp * kRowsPerWarp * D;
  for (int64_t e0 = 0; e0 < mk; e0 += kBK) {
    __syncthreads();
    load_kv_tile<D>(K, V, ks, g, u, e0, mk, Ks, Vs);
    __syncthreads();
    const int64_t e = e0 + lane;
    const int64_t j = e < u.a1 ? e : u.b0 + (e - u.a1);
    float s[kRowsPerWarp], dp[kRowsPerWarp];
    dot4<D>(myQ, D, Ks + lane * P, s);
    dot4<D>(mydO, D, Vs + lane * P, dp);
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t t = t0 + warp * kRowsPerWarp + rr;
      const bool vis = t < n && e < mk && visible(kr[rr], j);
      const float p = vis ? expf(s[rr] - L[rr]) : 0.0f;
      s[rr] = p * (dp[rr] - Dr[rr]);  // dS (unscaled)
    }
    rows_times_tile<D, P, PER>(acc, s, Ks, lane);  // dQ += dS K
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t t = t0 + warp * kRowsPerWarp + rr;
    if (t >= n) continue;
#pragma unroll
    for (int c = 0; c < PER; ++c) {
      const int i = lane + 32 * c;
      if (i < D) dQ[t * qs + static_cast<int64_t>(h) * D + i] = acc[rr][c] * scale;
    }
  }
}

// dK, dV: key-centric. Block = 32 keys x KV head g x query segment z; rows are (t, query head of
// the group) pairs, taken 32 at a time: phase 1 (lane = key) gives P and dS into smem, phase 2
// (thread = key x float4 columns) accumulates dK += dS q_scaled, dV += P dO in registers. The
// block's sums are atomically added (dK/dV zeroed first): sink tiles are seen by every query, so
// their rows are split over segments.
constexpr int kKvWarps = 4;
constexpr int kRB = 32;    // rows per chunk
constexpr int kSeg = 512;  // query positions per segment

template <int D>
__global__ void __launch_bounds__(kKvWarps * 32)
    wattn_dkv_kernel(const float* Q, const float* K, const float* V, const float* lse,
                     const float* Dt, const float* dO, int64_t n, int nq, int nkv, Window w,
                     float scale, float* dK, float* dV) {
  constexpr int P = Tile<D>::P;
  constexpr int NC4 = D / 16;  // float4 columns per thread in phase 2 (D / 4 dims)
  extern __shared__ float4 smem4[];
  float* Ks = reinterpret_cast<float*>(smem4);
  float* Vs = Ks + kBK * P;
  float* Qs = Vs + kBK * P;     // [kRB][D] pre-scaled
  float* dOs = Qs + kRB * D;    // [kRB][D]
  float* Ps = dOs + kRB * D;    // [kRB][32]
  float* dSs = Ps + kRB * kBK;  // [kRB][32]
  const int g = blockIdx.y, G = nq / nkv;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBK, j1 = min(n, j0 + kBK);
  const int64_t tq_end = min(n, (j0 < w.sink && w.kind != 0) ? n : last_query(w, j1 - 1, n) + 1);
  const int64_t tq0 = j0 + static_cast<int64_t>(blockIdx.z) * kSeg;
  const int64_t tq1 = min(tq_end, tq0 + kSeg);
  if (tq0 >= tq1) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t qs = static_cast<int64_t>(nq) * D, ks = static_cast<int64_t>(nkv) * D;
  // Key tile: keys j0 .. j1-1 (contiguous).
  for (int x = threadIdx.x; x < kBK * D / 4; x += blockDim.x) {
    const int kk = x / (D / 4), i4 = x % (D / 4);
    const int64_t j = j0 + kk;
    float4 kv = make_float4(0, 0, 0, 0), vv = kv;
    if (j < j1) {
      kv = reinterpret_cast<const float4*>(K + j * ks + static_cast<int64_t>(g) * D)[i4];
      vv = reinterpret_cast<const float4*>(V + j * ks + static_cast<int64_t>(g) * D)[i4];
    }
    reinterpret_cast<float4*>(Ks + kk * P)[i4] = kv;
    reinterpret_cast<float4*>(Vs + kk * P)[i4] = vv;
  }
  const int jj = threadIdx.x % kBK, cg = threadIdx.x / kBK;  // phase 2: key, column group
  float4 aK[NC4], aV[NC4];
#pragma unroll
  for (int c = 0; c < NC4; ++c) aK[c] = aV[c] = make_float4(0, 0, 0, 0);
  const int64_t rows = (tq1 - tq0) * G;
  const int64_t j = j0 + lane;
  for (int64_t r0 = 0; r0 < rows; r0 += kRB) {
    __syncthreads();
    for (int x = threadIdx.x; x < kRB * D; x += blockDim.x) {
      const int r = x / D, i = x % D;
      const int64_t rr = r0 + r;
      float qv = 0, dv = 0;
      if (rr < rows) {
        const int64_t t = tq0 + rr / G;
        const int h = g * G + static_cast<int>(rr % G);
        const int64_t o = t * qs + static_cast<int64_t>(h) * D + i;
        qv = Q[o] * scale;
        dv = dO[o];
      }
      Qs[x] = qv;
      dOs[x] = dv;
    }
    __syncthreads();
    // Phase 1: warp w takes rows 8w .. 8w+7 of the chunk, 4 at a time.
#pragma unroll
    for (int half = 0; half < kRB / (kKvWarps * 4); ++half) {
      const int rb = warp * (kRB / kKvWarps) + half * 4;
      float s[4], dp[4];
      dot4<D>(Qs + rb * D, D, Ks + lane * P, s);
      dot4<D>(dOs + rb * D, D, Vs + lane * P, dp);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t rr = r0 + rb + q;
        float p = 0, ds = 0;
        if (rr < rows && j < j1) {
          const int64_t t = tq0 + rr / G;
          const int h = g * G + static_cast<int>(rr % G);
          if (visible(window_keys(w, t), j)) {
            p = expf(s[q] - lse[t * nq + h]);
            ds = p * (dp[q] - Dt[t * nq + h]);
          }
        }
        Ps[(rb + q) * kBK + lane] = p;
        dSs[(rb + q) * kBK + lane] = ds;
      }
    }
    __syncthreads();
    // Phase 2.
    const int64_t nr = rows - r0 < kRB ? rows - r0 : static_cast<int64_t>(kRB);
    for (int r = 0; r < nr; ++r) {
      const float p = Ps[r * kBK + jj], ds = dSs[r * kBK + jj];
#pragma unroll
      for (int c = 0; c < NC4; ++c) {
        const int i4 = cg + (kKvWarps * 32 / kBK) * c;
        const float4 qv = reinterpret_cast<const float4*>(Qs + r * D)[i4];
        const float4 dv = reinterpret_cast<const float4*>(dOs + r * D)[i4];
        aK[c].x += ds * qv.x;
        aK[c].y += ds * qv.y;
        aK[c].z += ds * qv.z;
        aK[c].w += ds * qv.w;
        aV[c].x += p * dv.x;
        aV[c].y += p * dv.y;
        aV[c].z += p * dv.z;
        aV[c].w += p * dv.w;
      }
    }
  }
  const int64_t jo = j0 + jj;
  if (jo >= j1) return;
#pragma unroll
  for (int c = 0; c < NC4; ++c) {
    const int i = 4 * (cg + (kKvWarps * 32 / kBK) * c);
    float* k = dK + jo * ks + static_cast<int64_t>(g) * D + i;
    float* v = dV + jo * ks + static_cast<int64_t>(g) * D + i;
    atomicAdd(k + 0, aK[c].x);
    atomicAdd(k + 1, aK[c].y);
    atomicAdd(k + 2, aK[c].z);
    atomicAdd(k + 3, aK[c].w);
    atomicAdd(v + 0, aV[c].x);
    atomicAdd(v + 1, aV[c].y);
    atomicAdd(v + 2, aV[c].z);
    atomicAdd(v + 3, aV[c].w);
  }
}

template <int D>
size_t fwd_smem() {
  return sizeof(float) * (2 * kBK * Tile<D>::P + kBQ * D);
}
template <int D>
size_t dq_smem() {
  return sizeof(float) * (2 * kBK * Tile<D>::P + 2 * kBQ * D);
}
template <int D>
size_t dkv_smem() {
  return sizeof(float) * (2 * kBK * Tile<D>::P + 2 * kRB * D + 2 * kRB * kBK);
}

template <int D>
void forward_d(const float* Q, const float* K, const float* V, int64_t n, int nq, int nkv, Window w,
               float* O, float* lse, cudaStream_t s) {
  static bool configured = false;
  if (!configured) {
    DUO_CUDA_CHECK(cudaFuncSetAttribute(wattn_forward_kernel<D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(fwd_smem<D>())));
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>((n + kBQ - 1) / kBQ), static_cast<unsigned>(nq));
  wattn_forward_kernel<D><<<grid, kRowWarps * 32, fwd_smem<D>(), s>>>(
      Q, K, V, n, nq, nkv, w, 1.0f / sqrtf(static_cast<float>(D)), O, lse);
  check_launch("window attention forward");
}

template <int D>
void backward_d(const float* Q, const float* K, const float* V, const float* lse, const float* Dt,
                const float* dO, int64_t n, int nq, int nkv, Window w, float* dQ, float* dK,
                float* dV, cudaStream_t s) {
  static bool configured = false;
  if (!configured) {
    DUO_CUDA_CHECK(cudaFuncSetAttribute(wattn_dq_kernel<D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dq_smem<D>())));
    DUO_CUDA_CHECK(cudaFuncSetAttribute(wattn_dkv_kernel<D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dkv_smem<D>())));
    configured = true;
  }
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  const dim3 gq(static_cast<unsigned>((n + kBQ - 1) / kBQ), static_cast<unsigned>(nq));
  wattn_dq_kernel<D>
      <<<gq, kRowWarps * 32, dq_smem<D>(), s>>>(Q, K, V, lse, Dt, dO, n, nq, nkv, w, scale, dQ);
  check_launch("window attention dQ");
  const int64_t kv_elems = n * static_cast<int64_t>(nkv) * D * static_cast<int64_t>(sizeof(float));
  DUO_CUDA_CHECK(cudaMemsetAsync(dK, 0, static_cast<size_t>(kv_elems), s));
  DUO_CUDA_CHECK(cudaMemsetAsync(dV, 0, static_cast<size_t>(kv_elems), s));
  const dim3 gk(static_cast<unsigned>((n + kBK - 1) / kBK), static_cast<unsigned>(nkv),
                static_cast<unsigned>((n + kSeg - 1) / kSeg));
  wattn_dkv_kernel<D>
      <<<gk, kKvWarps * 32, dkv_smem<D>(), s>>>(Q, K, V, lse, Dt, dO, n, nq, nkv, w, scale, dK, dV);
  check_launch("window attention dK/dV");
}

}  // namespace

void fill_normal_f32(float* out, int64_t n, float stddev, uint64_t seed, cudaStream_t s) {
  fill_normal_f32_kernel<<<grid_for(n, 256), 256, 0, s>>>(out, n, stddev, seed);
  check_launch("fill_normal_f32");
}
void fill_normal_bf16(bf16* out, int64_t n, float stddev, uint64_t seed, cudaStream_t s) {
  fill_normal_bf16_kernel<<<grid_for(n, 256), 256, 0, s>>>(out, n, stddev, seed);
  check_launch("fill_normal_bf16");
}
void fill_f32(float* out, int64_t n, float value, cudaStream_t s) {
  fill_f32_kernel<<<grid_for(n, 256), 256, 0, s>>>(out, n, value);
  check_launch("fill_f32");
}
void f32_to_bf16(const float* in, bf16* out, int64_t n, cudaStream_t s) {
  check_aligned16({in, out}, "f32_to_bf16");
  f32_to_bf16_kernel<<<grid_for(n / 4 + 1, 256), 256, 0, s>>>(in, out, n);
  check_launch("f32_to_bf16");
}
void bf16_to_f32(const bf16* in, float* out, int64_t n, cudaStream_t s) {
  bf16_to_f32_kernel<<<grid_for(n, 256), 256, 0, s>>>(in, out, n);
  check_launch("bf16_to_f32");
}
void embed(const void* table, bool table_bf16, const int32_t* ids, int64_t rows, int64_t cols,
           float* out, cudaStream_t s) {
  embed_kernel<<<grid_for(rows * cols, 256), 256, 0, s>>>(table, table_bf16, ids, rows, cols, out);
  check_launch("embed");
}
void rmsnorm_forward(const float* x, const float* w, float eps, int64_t rows, int64_t cols, void* y,
                     bool y_bf16, float* inv, cudaStream_t s) {
  if (rows == 0) return;
  rmsnorm_forward_kernel<<<static_cast<unsigned>(rows), 256, 0, s>>>(x, w, eps, cols, y, y_bf16,
                                                                     inv);
  check_launch("rmsnorm_forward");
}
void rmsnorm_backward(const float* x, const float* w, const float* inv, const float* dy,
                      int64_t rows, int64_t cols, float* dx, bool accumulate, bf16* dx_bf16,
                      cudaStream_t s) {
  if (rows == 0) return;
  rmsnorm_backward_kernel<<<static_cast<unsigned>(rows), 256, 0, s>>>(x, w, inv, dy, cols, dx,
                                                                      accumulate, dx_bf16);
  check_launch("rmsnorm_backward");
}
void rope(const float* x, const float* cos, const float* sin, int64_t rows, int64_t heads,
          int64_t d, float sign, void* out, bool out_bf16, cudaStream_t s) {
  const int64_t n = rows * heads * (d / 2);
  rope_kernel<<<grid_for(n, 256), 256, 0, s>>>(x, cos, sin, rows, heads, d, sign, out, out_bf16);
  check_launch("rope");
}
void swiglu_forward(const float* g, const float* u, void* a, bool a_bf16, int64_t n,
                    cudaStream_t s) {
  check_aligned16({g, u, a}, "swiglu_forward");
  swiglu_forward_kernel<<<grid_for(n / 4 + 1, 256), 256, 0, s>>>(g, u, a, a_bf16, n);
  check_launch("swiglu_forward");
}
void swiglu_backward(const float* g, const float* u, const float* da, void* dg, void* du,
                     bool out_bf16, int64_t n, cudaStream_t s) {
  check_aligned16({g, u, da, dg, du}, "swiglu_backward");
  check(!out_bf16 || (dg != g && du != u && dg != du),
        "swiglu_backward: bf16 gradients need their own buffers");
  swiglu_backward_kernel<<<grid_for(n / 4 + 1, 256), 256, 0, s>>>(g, u, da, dg, du, out_bf16, n);
  check_launch("swiglu_backward");
}
void add(float* x, const float* y, int64_t n, cudaStream_t s) {
  check_aligned16({x, y}, "add");
  add_kernel<<<grid_for(n / 4 + 1, 256), 256, 0, s>>>(x, y, n);
  check_launch("add");
}
void add_bias(float* y, const float* b, int64_t rows, int64_t cols, cudaStream_t s) {
  add_bias_kernel<<<grid_for(rows * cols, 256), 256, 0, s>>>(y, b, rows, cols);
  check_launch("add_bias");
}

void add_bias_bf16(const float* y, const float* b, int64_t rows, int64_t cols, bf16* out,
                   cudaStream_t s) {
  add_bias_bf16_kernel<<<grid_for(rows * cols, 256), 256, 0, s>>>(y, b, rows, cols, out);
  check_launch("add_bias_bf16");
}

void gate_mix_forward(const void* F, bool f_bf16, const float* S, const float* a, int64_t n,
                      int64_t nq, int64_t nkv, int64_t d, void* M, bool m_bf16, cudaStream_t s) {
  gate_mix_forward_kernel<<<grid_for(n * nq * d, 256), 256, 0, s>>>(F, f_bf16, S, a, n, nq,
                                                                    nq / nkv, d, M, m_bf16);
  check_launch("gate_mix_forward");
}
int64_t gate_mix_partial_rows(int64_t n) {
  return (n + kMixRows - 1) / kMixRows;
}
int64_t gate_mix_backward(const void* F, bool f_bf16, const float* S, const float* a,
                          const float* dM, int64_t n, int64_t nq, int64_t nkv, int64_t d,
                          double* partial, void* dS, bool ds_bf16, cudaStream_t s) {
  const int64_t blocks = gate_mix_partial_rows(n);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(nq));
  gate_mix_backward_kernel<<<grid, 256, 0, s>>>(F, f_bf16, S, a, dM, n, nq, nq / nkv, d, partial,
                                                dS, ds_bf16);
  check_launch("gate_mix_backward");
  return blocks;
}
void gate_mix_reduce(const double* partial, int64_t blocks, int64_t nq, int64_t nkv, double* da,
                     cudaStream_t s) {
  gate_mix_reduce_kernel<<<static_cast<unsigned>(nkv), 256, 0, s>>>(partial, blocks, nq, nq / nkv,
                                                                    da);
  check_launch("gate_mix_reduce");
}

void window_attention_forward(const float* Q, const float* K, const float* V, int64_t n, int nq,
                              int nkv, int d, Window w, float* O, float* lse, cudaStream_t s) {
  check(nq % nkv == 0, "window attention: ", nq, " query heads for ", nkv, " KV heads");
  if (n == 0) return;
  switch (d) {
    case 16:
      return forward_d<16>(Q, K, V, n, nq, nkv, w, O, lse, s);
    case 32:
      return forward_d<32>(Q, K, V, n, nq, nkv, w, O, lse, s);
    case 64:
      return forward_d<64>(Q, K, V, n, nq, nkv, w, O, lse, s);
    case 128:
      return forward_d<128>(Q, K, V, n, nq, nkv, w, O, lse, s);
    default:
      fail("window attention: head_dim ", d, " is not supported (16, 32, 64 or 128)");
  }
}

void window_attention_backward(const float* Q, const float* K, const float* V, const float* O,
                               const float* lse, const float* dO, int64_t n, int nq, int nkv, int d,
                               Window w, float* dQ, float* dK, float* dV, float* scratch,
                               cudaStream_t s) {
  check(nq % nkv == 0, "window attention: ", nq, " query heads for ", nkv, " KV heads");
  if (n == 0) return;
  const int64_t rows = n * nq;
  row_dot_kernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, s>>>(dO, O, rows, d, scratch);
  check_launch("row_dot");
  switch (d) {
    case 16:
      return backward_d<16>(Q, K, V, lse, scratch, dO, n, nq, nkv, w, dQ, dK, dV, s);
    case 32:
      return backward_d<32>(Q, K, V, lse, scratch, dO, n, nq, nkv, w, dQ, dK, dV, s);
    case 64:
      return backward_d<64>(Q, K, V, lse, scratch, dO, n, nq, nkv, w, dQ, dK, dV, s);
    case 128:
      return backward_d<128>(Q, K, V, lse, scratch, dO, n, nq, nkv, w, dQ, dK, dV, s);
    default:
      fail("window attention: head_dim ", d, " is not supported (16, 32, 64 or 128)");
  }
}

void distill_loss(const float* y, const float* target, int64_t n, int64_t H, int64_t label_begin,
                  double* row_loss, double* total, float* dy, cudaStream_t s) {
  const double denom = static_cast<double>(n - label_begin) * static_cast<double>(H);
  distill_rows_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(y, target, H, label_begin,
                                                               2.0 / denom, row_loss, dy);
  check_launch("distill_rows");
  sum_kernel<<<1, 1024, 0, s>>>(row_loss, n, total);
  check_launch("distill_sum");
}

}  // namespace duo::cuda::gate_kernels
