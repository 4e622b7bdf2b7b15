// Kernels of the CUDA backend (see backend_kernels.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "core/error.h"
#include "cuda/backend_kernels.h"
#include "cuda/cuda_check.h"
#include "cuda/pdl.cuh"
#include "engine/random_fill.h"

namespace duo::cuda::kernels {

namespace {

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 16));
}

__global__ void fill_normal_kernel(bf16* out, int64_t n, float stddev, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(stddev * random_normal_at(seed, static_cast<uint64_t>(i)));
}

__global__ void fill_constant_kernel(bf16* out, int64_t n, float value) {
  const bf16 v = __float2bfloat16(value);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = v;
}

__global__ void f32_to_bf16_kernel(const float* in, bf16* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

__global__ void embed_kernel(const bf16* table, int64_t cols, const int32_t* tokens, bf16* out) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  const int64_t r = blockIdx.x;
  const bf16* src = table + static_cast<int64_t>(tokens[r]) * cols;
  bf16* dst = out + r * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// Block-wide fp32 sum (blockDim.x a multiple of 32, <= 1024).
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  float s = 0.0f;
  for (int w = 0; w < warps; ++w) s += partial[w];
  return s;
}

// Row norms (rmsnorm_kernel, add_rmsnorm_kernel): one block per row. Rows of at most
// kNormVecCols columns, a multiple of 8, 16-byte aligned, take the vector path: thread t holds
// columns [8t, 8t + 8) in registers (one 16-byte load per operand, no second read of the row),
// so the one-row decode norms cost one memory round trip instead of one per 256 columns. Other
// rows loop over columns with 256 threads. Both kernels pick the path and block size the same
// way (norm_vector_path / norm_threads), so on aligned rows add_rmsnorm stays bitwise add() then
// rmsnorm().
constexpr int64_t kNormVecCols = 8192;

__device__ __forceinline__ void bf16x8_load(const bf16* p, float* f) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(b[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void bf16x8_store(bf16* p, const float* f) {
  uint4 u;
  __nv_bfloat162* b = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) b[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}

// The second half of both row norms, after each thread has its columns: the block's sum of
// squares -> 1 / rms -> w * x / rms, stored as bf16. Vector path: thread t's 8 columns from c
// (zeros past the row, which add nothing), weights already loaded so no load follows the sum.
__device__ __forceinline__ void norm_finish_vec(float (&v)[8], const float (&wv)[8], int64_t c,
                                                int64_t cols, float eps, bf16* o) {
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);
  if (c < cols) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = wv[i] * (v[i] * inv);
    bf16x8_store(o + c, v);
  }
}
// Looped path: ss is this thread's sum over columns threadIdx.x + k * blockDim.x of xr.
__device__ __forceinline__ void norm_finish_loop(float ss, const bf16* xr, const bf16* w,
                                                 int64_t cols, float eps, bf16* o) {
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    o[c] = __float2bfloat16(__bfloat162float(w[c]) * (__bfloat162float(xr[c]) * inv));
}

__global__ void rmsnorm_kernel(const bf16* x, const bf16* w, float eps, int64_t cols, bool vec,
                               bf16* out) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  const int64_t r = blockIdx.x;
  const bf16* xr = x + r * cols;
  bf16* o = out + r * cols;
  if (vec) {
    const int64_t c = 8 * static_cast<int64_t>(threadIdx.x);
    float v[8] = {}, wv[8];
    if (c < cols) {
      bf16x8_load(xr + c, v);
      bf16x8_load(w + c, wv);
    }
    norm_finish_vec(v, wv, c, cols, eps, o);
    return;
  }
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = __bfloat162float(xr[c]);
    ss += v * v;
  }
  norm_finish_loop(ss, xr, w, cols, eps, o);
}

// add_kernel then rmsnorm_kernel in one pass: each thread rounds x + y to bf16 exactly as
// add_kernel, stores it, and sums the squares of the rounded values over the same columns as
// rmsnorm_kernel, so the result is bitwise that of the two kernels.
__global__ void add_rmsnorm_kernel(bf16* x, const bf16* y, const bf16* w, float eps, int64_t cols,
                                   bool vec, bf16* out) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  const int64_t r = blockIdx.x;
  bf16* xr = x + r * cols;
  const bf16* yr = y + r * cols;
  bf16* o = out + r * cols;
  if (vec) {
    const int64_t c = 8 * static_cast<int64_t>(threadIdx.x);
    float v[8] = {}, yv[8], wv[8];
    if (c < cols) {
      bf16x8_load(xr + c, v);
      bf16x8_load(yr + c, yv);
      bf16x8_load(w + c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __bfloat162float(__float2bfloat16(v[i] + yv[i]));
      bf16x8_store(xr + c, v);
    }
    norm_finish_vec(v, wv, c, cols, eps, o);
    return;
  }
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const bf16 s = __float2bfloat16(__bfloat162float(xr[c]) + __bfloat162float(yr[c]));
    xr[c] = s;
    const float v = __bfloat162float(s);
    ss += v * v;
  }
  norm_finish_loop(ss, xr, w, cols, eps, o);  // the same thread wrote the xr[c] it reads
}

// One block per row: cos/sin of the row's position for each frequency (angle in fp32 exactly as
// the CPU: float(pos) * inv_freq[i]; cos/sin evaluated in double and rounded to float, as the CPU's
// std::cos(double)), then every head of the row rotated (rotate-half pairs (i, i + d/2)).
// Error vs the CPU: the angle is the same fp32 number; CUDA's double sincos is within 1-2 double
// ulps, so the fp32 cos/sin differ from the CPU's only when that lands on a float rounding
// boundary (at most 1 fp32 ulp, i.e. <= 6e-8 relative). fp32 cosf/sinf would instead err by
// ~1e-7..1e-6 absolute for the large angles of long contexts (pos up to 1e6, angle = pos * 1).
// The rotation is fp32 and the result is rounded to bf16 (2^-9 relative), which dominates:
// measured NMSE vs the CPU <= 3.1e-6 (and exactly 0 on the 1-row cases).
// cos / sin of angle pos * inv_freq[i], i < half, times attention_scaling, into cs[i] / cs[half +
// i] (block-cooperative; ends with __syncthreads()).
__device__ void rope_table(float* cs, int half, float pos, const float* inv_freq,
                           float attention_scaling) {
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = pos * inv_freq[i];
    double s, c;
    sincos(static_cast<double>(angle), &s, &c);
    cs[i] = static_cast<float>(c) * attention_scaling;
    cs[half + i] = static_cast<float>(s) * attention_scaling;
  }
  __syncthreads();
}

// Rotates the pair (i, i + half) of one head in place; returns the stored (bf16) values.
__device__ __forceinline__ __nv_bfloat162 rope_pair(bf16* hx, int i, int half, const float* cs) {
  const float a = __bfloat162float(hx[i]), b = __bfloat162float(hx[i + half]);
  const bf16 lo = __float2bfloat16(a * cs[i] - b * cs[half + i]);
  const bf16 hi = __float2bfloat16(b * cs[i] + a * cs[half + i]);
  hx[i] = lo;
  hx[i + half] = hi;
  return __halves2bfloat162(lo, hi);
}

// One block per row: cos/sin of the row's position for each frequency (angle in fp32 exactly as
// the CPU: float(pos) * inv_freq[i]; cos/sin evaluated in double and rounded to float, as the CPU's
// std::cos(double)), then every head of the row rotated (rotate-half pairs (i, i + d/2)).
// Error vs the CPU: the angle is the same fp32 number; CUDA's double sincos is within 1-2 double
// ulps, so the fp32 cos/sin differ from the CPU's only when that lands on a float rounding
// boundary (at most 1 fp32 ulp, i.e. <= 6e-8 relative). fp32 cosf/sinf would instead err by
// ~1e-7..1e-6 absolute for the large angles of long contexts (pos up to 1e6, angle = pos * 1).
// The rotation is fp32 and the result is rounded to bf16 (2^-9 relative), which dominates:
// measured NMSE vs the CPU <= 3.1e-6 (and exactly 0 on the 1-row cases).
__global__ void rope_kernel(bf16* x, int64_t cols, int heads, int head_dim,
                            const int64_t* positions, const float* inv_freq,
                            float attention_scaling) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  extern __shared__ float cs[];  // [half] cos, then [half] sin
  const int half = head_dim / 2;
  const int64_t r = blockIdx.x;
  rope_table(cs, half, static_cast<float>(positions[r]), inv_freq, attention_scaling);
  bf16* row = x + r * cols;
  const int total = heads * half;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int h = e / half, i = e % half;
    rope_pair(row + static_cast<int64_t>(h) * head_dim, i, half, cs);
  }
}

// rope_kernel on the query and key heads of one decode row qkv [(q_heads + 2 kv_heads) head_dim]
// (same arithmetic), then append_retrieval of that token: the rotated keys and the values of KV
// heads [0, retrieval) go to row *position of rk / rv [retrieval][capacity][head_dim]. One
// rotated pair and one copied value per thread over as many blocks as that takes (each block
// builds its own cos / sin table), so the step costs one memory round trip, not one per pass of
// a single block over the row.
__global__ void rope_append_kernel(bf16* qkv, int q_heads, int kv_heads, int head_dim,
                                   const int64_t* position, const float* inv_freq,
                                   float attention_scaling, int retrieval, int64_t capacity,
                                   bf16* rk, bf16* rv) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  extern __shared__ float cs[];  // [half] cos, then [half] sin
  const int half = head_dim / 2;
  const int64_t pos = *position;
  rope_table(cs, half, static_cast<float>(pos), inv_freq, attention_scaling);
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e < (q_heads + kv_heads) * half) {
    const int h = e / half, i = e % half;
    const __nv_bfloat162 r = rope_pair(qkv + static_cast<int64_t>(h) * head_dim, i, half, cs);
    const int g = h - q_heads;
    if (g >= 0 && g < retrieval) {
      bf16* dst = rk + (static_cast<int64_t>(g) * capacity + pos) * head_dim;
      dst[i] = r.x;
      dst[i + half] = r.y;
    }
  }
  if (e < retrieval * head_dim) {
    const bf16* v = qkv + static_cast<int64_t>(q_heads + kv_heads) * head_dim;
    const int g = e / head_dim, c = e % head_dim;
    rv[(static_cast<int64_t>(g) * capacity + pos) * head_dim + c] = v[e];
  }
}

__global__ void swiglu_kernel(const bf16* gate, const bf16* up, bf16* out, int64_t n) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(gate[i]);
    out[i] = __float2bfloat16(g / (1.0f + expf(-g)) * __bfloat162float(up[i]));
  }
}

__global__ void add_kernel(bf16* x, const bf16* y, int64_t n) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(y[i]));
}

// Fallback GEMM when cuBLASLt offers no algorithm: out[r, c] = sum_i x[r, i] * w[c, i] (+ b[c]),
// fp32 accumulation, 16x16 tiles.
__global__ void linear_fallback_kernel(const bf16* x, const bf16* w, const bf16* bias, bf16* out,
                                       int64_t n, int64_t m, int64_t k) {
  __shared__ float xs[16][17], ws[16][17];
  const int64_t r = blockIdx.y * 16 + threadIdx.y;
  const int64_t c = blockIdx.x * 16 + threadIdx.x;
  float acc = 0.0f;
  for (int64_t k0 = 0; k0 < k; k0 += 16) {
    const int64_t kx = k0 + threadIdx.x;
    const int64_t wr = blockIdx.x * 16 + threadIdx.y;
    xs[threadIdx.y][threadIdx.x] = (r < n && kx < k) ? __bfloat162float(x[r * k + kx]) : 0.0f;
    ws[threadIdx.y][threadIdx.x] = (wr < m && kx < k) ? __bfloat162float(w[wr * k + kx]) : 0.0f;
    __syncthreads();
    for (int i = 0; i < 16; ++i) acc += xs[threadIdx.y][i] * ws[threadIdx.x][i];
    __syncthreads();
  }
  if (r < n && c < m) {
    if (bias != nullptr) acc += __bfloat162float(bias[c]);
    out[r * m + c] = __float2bfloat16(acc);
  }
}

// (value, index) candidates for argmax; index kNone = no candidate yet. a beats b when b is none,
// or a is larger, or equal with a lower index: std::max_element's choice.
constexpr int64_t kNone = INT64_MAX;
__device__ __forceinline__ bool beats(float av, int64_t ai, float bv, int64_t bi) {
  if (ai == kNone) return false;
  if (bi == kNone) return true;
  return av > bv || (av == bv && ai < bi);
}

// One block per row: each thread scans a strided share, then warp and block reductions.
__global__ void argmax_kernel(const bf16* x, int64_t cols, int32_t* out) {
  pdl_wait();  // launched with launch_pdl (cuda/pdl.cuh)
  pdl_launch_dependents();
  const bf16* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  float best = -INFINITY;
  int64_t bi = kNone;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = __bfloat162float(row[c]);
    if (beats(v, c, best, bi)) {
      best = v;
      bi = c;
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
    if (beats(ov, oi, best, bi)) {
      best = ov;
      bi = oi;
    }
  }
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w)
      if (beats(sv[w], si[w], best, bi)) {
        best = sv[w];
        bi = si[w];
      }
    out[blockIdx.x] = static_cast<int32_t>(bi);
  }
}

}  // namespace

void argmax_rows(const bf16* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t stream) {
  if (rows <= 0) return;
  check(cols > 0 && cols <= 0x7fffffff && rows <= 0x7fffffff, "argmax: bad shape ", rows, " x ",
        cols);
  launch_pdl(argmax_kernel, static_cast<unsigned>(rows), 1024, 0, stream, x, cols, out);
}

void fill_normal(bf16* out, int64_t n, float stddev, uint64_t seed, cudaStream_t stream) {
  if (n <= 0) return;
  fill_normal_kernel<<<grid_for(n, 256), 256, 0, stream>>>(out, n, stddev, seed);
  DUO_CUDA_CHECK(cudaGetLastError());
}

void fill_constant(bf16* out, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return;
  fill_constant_kernel<<<grid_for(n, 256), 256, 0, stream>>>(out, n, value);
  DUO_CUDA_CHECK(cudaGetLastError());
}

void f32_to_bf16(const float* in, bf16* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  f32_to_bf16_kernel<<<grid_for(n, 256), 256, 0, stream>>>(in, out, n);
  DUO_CUDA_CHECK(cudaGetLastError());
}

void embed(const bf16* table, int64_t cols, const int32_t* tokens, int64_t rows, bf16* out,
           cudaStream_t stream) {
  if (rows <= 0) return;
  check(rows <= 0x7fffffff, "embed: too many rows");
  launch_pdl(embed_kernel, static_cast<unsigned>(rows), 256, 0, stream, table, cols, tokens, out);
}

// The row norms' vector path (see kNormVecCols) and block size.
static bool norm_vector_path(int64_t cols, std::initializer_list<const void*> ptrs) {
  if (cols % 8 != 0 || cols > kNormVecCols) return false;
  for (const void* p : ptrs)
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) return false;
  return true;
}
static unsigned norm_threads(int64_t cols, bool vec) {
  return vec ? static_cast<unsigned>((cols / 8 + 31) / 32 * 32) : 256u;
}

void rmsnorm(const bf16* x, const bf16* w, float eps, int64_t rows, int64_t cols, bf16* out,
             cudaStream_t stream) {
  if (rows <= 0) return;
  check(rows <= 0x7fffffff, "rmsnorm: too many rows");
  const bool vec = norm_vector_path(cols, {x, w, out});
  launch_pdl(rmsnorm_kernel, static_cast<unsigned>(rows), norm_threads(cols, vec), 0, stream, x, w,
             eps, cols, vec, out);
}

void add_rmsnorm(bf16* x, const bf16* y, const bf16* w, float eps, int64_t rows, int64_t cols,
                 bf16* out, cudaStream_t stream) {
  if (rows <= 0) return;
  check(rows <= 0x7fffffff, "add_rmsnorm: too many rows");
  const bool vec = norm_vector_path(cols, {x, y, w, out});
  launch_pdl(add_rmsnorm_kernel, static_cast<unsigned>(rows), norm_threads(cols, vec), 0, stream, x,
             y, w, eps, cols, vec, out);
}

void rope(bf16* x, int64_t rows, int64_t cols, int heads, int head_dim, const int64_t* positions,
          const float* inv_freq, float attention_scaling, cudaStream_t stream) {
  if (rows <= 0) return;
  check(rows <= 0x7fffffff, "rope: too many rows");
  const size_t smem = static_cast<size_t>(head_dim) * sizeof(float);
  launch_pdl(rope_kernel, static_cast<unsigned>(rows), 256, smem, stream, x, cols, heads, head_dim,
             positions, inv_freq, attention_scaling);
}

void rope_append_retrieval(bf16* qkv, int q_heads, int kv_heads, int head_dim,
                           const int64_t* position, const float* inv_freq, float attention_scaling,
                           int retrieval, int64_t capacity, bf16* retrieval_k, bf16* retrieval_v,
                           cudaStream_t stream) {
  check(retrieval >= 0 && retrieval <= kv_heads && head_dim % 2 == 0,
        "rope_append_retrieval: bad shape");
  check(retrieval == 0 || (retrieval_k != nullptr && retrieval_v != nullptr),
        "rope_append_retrieval: retrieval store missing");
  const size_t smem = static_cast<size_t>(head_dim) * sizeof(float);
  const int work = std::max((q_heads + kv_heads) * (head_dim / 2), retrieval * head_dim);
  const unsigned blocks = static_cast<unsigned>(std::max(1, (work + 127) / 128));
  launch_pdl(rope_append_kernel, blocks, 128, smem, stream, qkv, q_heads, kv_heads, head_dim,
             position, inv_freq, attention_scaling, retrieval, capacity, retrieval_k, retrieval_v);
}

void swiglu(const bf16* gate, const bf16* up, bf16* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  launch_pdl(swiglu_kernel, grid_for(n, 256), 256, 0, stream, gate, up, out, n);
}

void add(bf16* x, const bf16* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  launch_pdl(add_kernel, grid_for(n, 256), 256, 0, stream, x, y, n);
}

void linear_fallback(const bf16* x, const bf16* w, const bf16* bias, bf16* out, int64_t n,
                     int64_t m, int64_t k, cudaStream_t stream) {
  if (n <= 0 || m <= 0) return;
  check((n + 15) / 16 <= 65535, "linear_fallback: too many rows");
  dim3 block(16, 16),
      grid(static_cast<unsigned>((m + 15) / 16), static_cast<unsigned>((n + 15) / 16));
  linear_fallback_kernel<<<grid, block, 0, stream>>>(x, w, bias, out, n, m, k);
  DUO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace duo::cuda::kernels
