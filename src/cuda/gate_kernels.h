// Kernels of the CUDA gate optimisation (gate_kernels.cu; the model is cuda/gate_cuda.cpp). Plain
// pointers, C++17. Activations are fp32 (row-major [rows, cols]); "W" tensors (the embedding table
// and the teacher's stored attention output) are bf16 or fp32 as the precision mode says. Every
// launcher is asynchronous on `stream` and checks the launch (duo::Error on failure).
//
// Attention windows are those of identify/gate_ops.h (AttnWindow): kind 0 full causal, 1
// token-exact sink + recent, 2 the release's block mask.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace duo::cuda::gate_kernels {

using bf16 = __nv_bfloat16;

struct Window {
  int kind = 0;  // 0 full, 1 exact, 2 block
  int64_t sink = 0, recent = 0, block = 128;
};

// out[i] = stddev * random_normal_at(seed, i) (engine/random_fill.h), or `value` when stddev == 0.
void fill_normal_f32(float* out, int64_t n, float stddev, uint64_t seed, cudaStream_t s);
void fill_normal_bf16(bf16* out, int64_t n, float stddev, uint64_t seed, cudaStream_t s);
void fill_f32(float* out, int64_t n, float value, cudaStream_t s);
void f32_to_bf16(const float* in, bf16* out, int64_t n, cudaStream_t s);
void bf16_to_f32(const bf16* in, float* out, int64_t n, cudaStream_t s);

// out[r, :] = table[ids[r], :]
void embed(const void* table, bool table_bf16, const int32_t* ids, int64_t rows, int64_t cols,
           float* out, cudaStream_t s);
// y = w * x * inv, inv[r] = 1 / sqrt(mean(x^2) + eps) (fp32 sums); y is fp32, or bf16 (the
// fp32 value rounded) when y_bf16: a GEMM input needs no separate conversion pass.
void rmsnorm_forward(const float* x, const float* w, float eps, int64_t rows, int64_t cols, void* y,
                     bool y_bf16, float* inv, cudaStream_t s);
// dx (+)= inv w dy - x inv^3 / H * sum(w dy x); when dx_bf16 is not null, the new dx rounded to
// bf16 goes there too (the next GEMM's input).
void rmsnorm_backward(const float* x, const float* w, const float* inv, const float* dy,
                      int64_t rows, int64_t cols, float* dx, bool accumulate, bf16* dx_bf16,
                      cudaStream_t s);
// Rotate-half RoPE of `heads` heads of d per row by the angle of row t (sign +1) or its transpose
// (sign -1); cos/sin tables [rows, d/2]. out is fp32 (may be x: in place) or bf16 (out_bf16).
void rope(const float* x, const float* cos, const float* sin, int64_t rows, int64_t heads,
          int64_t d, float sign, void* out, bool out_bf16, cudaStream_t s);
// a = silu(g) u, fp32 or bf16 (a_bf16; the fp32 value rounded).
void swiglu_forward(const float* g, const float* u, void* a, bool a_bf16, int64_t n,
                    cudaStream_t s);
// dg, du fp32 (in place allowed: dg == g, du == u) or bf16 (out_bf16; separate buffers).
void swiglu_backward(const float* g, const float* u, const float* da, void* dg, void* du,
                     bool out_bf16, int64_t n, cudaStream_t s);
void add(float* x, const float* y, int64_t n, cudaStream_t s);
void add_bias(float* y, const float* b, int64_t rows, int64_t cols, cudaStream_t s);
// out = y + b rounded to bf16 (y unchanged): a biased projection whose only consumer is bf16.
void add_bias_bf16(const float* y, const float* b, int64_t rows, int64_t cols, bf16* out,
                   cudaStream_t s);

// M = a[h/G] F + (1 - a[h/G]) S per query head (F: the teacher's output, bf16 or fp32; M fp32,
// or bf16 when m_bf16).
void gate_mix_forward(const void* F, bool f_bf16, const float* S, const float* a, int64_t n,
                      int64_t nq, int64_t nkv, int64_t d, void* M, bool m_bf16, cudaStream_t s);
// partial[blk * nq + h] = sum over the block's rows of dM . (F - S) for head h (fp64), and
// dS = (1 - a) dM, fp32 (may alias dM) or rounded to bf16 (ds_bf16: the tensor-core attention
// backward's input). Returns the number of row blocks (the partial's rows).
int64_t gate_mix_backward(const void* F, bool f_bf16, const float* S, const float* a,
                          const float* dM, int64_t n, int64_t nq, int64_t nkv, int64_t d,
                          double* partial, void* dS, bool ds_bf16, cudaStream_t s);
int64_t gate_mix_partial_rows(int64_t n);
// da[g] = sum over row blocks and the group's heads of partial (fixed order: deterministic).
void gate_mix_reduce(const double* partial, int64_t blocks, int64_t nq, int64_t nkv, double* da,
                     cudaStream_t s);

// Windowed attention in fp32, O(n * visible keys * d) work and O(1) extra memory: Q [n, nq*d],
// K/V [n, nkv*d], O [n, nq*d], lse [n, nq]. head_dim d in {16, 32, 64, 128}.
void window_attention_forward(const float* Q, const float* K, const float* V, int64_t n, int nq,
                              int nkv, int d, Window w, float* O, float* lse, cudaStream_t s);
// dQ, dK, dV overwritten. `scratch` holds n * nq floats.
void window_attention_backward(const float* Q, const float* K, const float* V, const float* O,
                               const float* lse, const float* dO, int64_t n, int nq, int nkv, int d,
                               Window w, float* dQ, float* dK, float* dV, float* scratch,
                               cudaStream_t s);

// The same on tensor cores (gate_attention_tc.cu): Q/K/V in bf16 (same layouts), mma.sync
// bf16 -> fp32, P (forward) and dS (backward) rounded to bf16 as the products' inputs; O, lse and
// the gradients fp32. Window kinds 1 and 2, head_dim 64 or 128 (window_attention_tc_supported);
// deterministic (no atomics).
bool window_attention_tc_supported(int d, const Window& w);
void window_attention_tc_forward(const bf16* Q, const bf16* K, const bf16* V, int64_t n, int nq,
                                 int nkv, int d, Window w, float* O, float* lse, cudaStream_t s);
// Bytes of `workspace` the backward needs: the partial dK/dV sums of the key tiles that hold a
// sink, one per query segment (0 without sinks; about 66 MB for Llama-3-8B at 32K, S = 128).
int64_t window_attention_tc_workspace(int64_t n, int nkv, int d, const Window& w);
// dQ, dK, dV (fp32) overwritten from dO (bf16); `scratch` holds n * nq floats.
void window_attention_tc_backward(const bf16* Q, const bf16* K, const bf16* V, const float* O,
                                  const float* lse, const bf16* dO, int64_t n, int nq, int nkv,
                                  int d, Window w, float* dQ, float* dK, float* dV, float* scratch,
                                  void* workspace, cudaStream_t s);

// Loss over rows [label_begin, n): row_loss[r] = sum_i (y - t)^2 (fp64, 0 outside the labels),
// dy = 2 (y - t) / (m * H) on labelled rows, 0 elsewhere; then total[0] = sum of row_loss.
void distill_loss(const float* y, const float* target, int64_t n, int64_t H, int64_t label_begin,
                  double* row_loss, double* total, float* dy, cudaStream_t s);

}  // namespace duo::cuda::gate_kernels
