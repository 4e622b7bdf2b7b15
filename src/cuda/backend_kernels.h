// Launchers for the CUDA backend's element-wise and row-wise kernels (backend_kernels.cu). Plain
// pointers, C++17, no engine headers: the backend class (cuda_backend.cpp, C++20) calls these.
// All are asynchronous on `stream` and check the launch (duo::Error on failure). bf16 storage,
// fp32 arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace duo::cuda::kernels {

using bf16 = __nv_bfloat16;

// out[i] = bf16(stddev * random_normal_at(seed, i))  (engine/random_fill.h)
void fill_normal(bf16* out, int64_t n, float stddev, uint64_t seed, cudaStream_t stream);
void fill_constant(bf16* out, int64_t n, float value, cudaStream_t stream);
void f32_to_bf16(const float* in, bf16* out, int64_t n, cudaStream_t stream);
// out[r, :] = table[tokens[r], :] for r < rows (tokens in device memory, already range-checked)
void embed(const bf16* table, int64_t cols, const int32_t* tokens, int64_t rows, bf16* out,
           cudaStream_t stream);
// out = w * (x * 1/sqrt(mean(x^2) + eps)), fp32 statistics
void rmsnorm(const bf16* x, const bf16* w, float eps, int64_t rows, int64_t cols, bf16* out,
             cudaStream_t stream);
// Rotates `heads` heads of each row at positions[r] (device), inv_freq[head_dim/2] (device).
void rope(bf16* x, int64_t rows, int64_t cols, int heads, int head_dim, const int64_t* positions,
          const float* inv_freq, float attention_scaling, cudaStream_t stream);
// One decode row qkv [(q_heads + 2 kv_heads) * head_dim] (query heads, keys, values): rope() of
// the query and key heads at *position, then the first `retrieval` KV heads' rotated keys and
// values copied to row *position of retrieval_k / retrieval_v [retrieval][capacity][head_dim].
// Bitwise the same as rope() then cuda::append_retrieval(); the caller checks the capacity.
void rope_append_retrieval(bf16* qkv, int q_heads, int kv_heads, int head_dim,
                           const int64_t* position, const float* inv_freq, float attention_scaling,
                           int retrieval, int64_t capacity, bf16* retrieval_k, bf16* retrieval_v,
                           cudaStream_t stream);
// x = bf16(x + y), then out = rmsnorm(x) * w: add() then rmsnorm() in one pass, bitwise equal.
void add_rmsnorm(bf16* x, const bf16* y, const bf16* w, float eps, int64_t rows, int64_t cols,
                 bf16* out, cudaStream_t stream);
void swiglu(const bf16* gate, const bf16* up, bf16* out, int64_t n, cudaStream_t stream);
void add(bf16* x, const bf16* y, int64_t n, cudaStream_t stream);
// out[r] = index of the largest element of row r of x[rows, cols] (lowest index among equals).
void argmax_rows(const bf16* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t stream);
// Plain tiled GEMM (fallback when cuBLASLt offers no algorithm): out[n, m] = x[n, k] w[m, k]^T + b
void linear_fallback(const bf16* x, const bf16* w, const bf16* bias, bf16* out, int64_t n,
                     int64_t m, int64_t k, cudaStream_t stream);

}  // namespace duo::cuda::kernels
