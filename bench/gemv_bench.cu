// Times the one-row GEMMs of batch-1 decode (Llama-3-8B shapes) with CUDA events, median of 50
// runs: duo's kernels::gemv / gemv_swiglu against cuBLAS (cublasGemmEx, bf16 in, fp32 compute,
// the library's default algorithm), same process, same card. Each run reads a different copy of
// the weights (>= 512 MiB in rotation) so L2 (50 MiB) cannot serve them. Prints JSON lines with
// the weight bytes over the time (the bound for a one-row product is the weight-read bandwidth).
// Usage: duo_gemv_bench
#include <cublas_v2.h>

#include <cstdio>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "cuda/backend_kernels.h"
#include "cuda/cuda_check.h"

namespace {

struct Shape {
  const char* name;
  int64_t m, k;
  bool glu;  // m output rows from 2m weight rows (gate and up, then silu * up)
};

void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLAS error %d in %s\n", static_cast<int>(s), what);
    std::exit(1);
  }
}

}  // namespace

int main() {
  const Shape shapes[] = {{"qkv", 6144, 4096, false},       {"o_proj", 4096, 4096, false},
                          {"gate_up", 28672, 4096, false},  {"gate_up+swiglu", 14336, 4096, true},
                          {"down", 4096, 14336, false},     {"lm_head", 128256, 4096, false}};
  cublasHandle_t h = nullptr;
  check_cublas(cublasCreate(&h), "create");
  cudaDeviceProp prop{};
  DUO_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("{\"card\": \"%s\"}\n", prop.name);
  bf16* x = alloc_random(14336, 1);
  bf16* y = alloc_random(128256, 2);
  for (const Shape& s : shapes) {
    const int64_t wrows = s.glu ? 2 * s.m : s.m;
    const int64_t bytes = wrows * s.k * 2;
    const int copies = static_cast<int>(std::max<int64_t>(2, (int64_t{512} << 20) / bytes + 1));
    std::vector<bf16*> w(copies);
    for (int c = 0; c < copies; ++c) w[c] = alloc_random(wrows * s.k, 10 + c);
    int next = 0;
    const double ms_duo = median_ms(
        [&] {
          const bf16* wc = w[next++ % copies];
          if (s.glu)
            duo::cuda::kernels::gemv_swiglu(x, wc, y, s.m, s.k, nullptr);
          else
            duo::cuda::kernels::gemv(x, wc, nullptr, y, s.m, s.k, nullptr);
        },
        5, 50);
    // cuBLAS, column-major: y^T [m x 1] = W [k x m]^T x [k x 1] (no swiglu: the bare product).
    const float alpha = 1.0f, beta = 0.0f;
    const double ms_cublas = median_ms(
        [&] {
          check_cublas(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(wrows), 1,
                                    static_cast<int>(s.k), &alpha, w[next++ % copies], CUDA_R_16BF,
                                    static_cast<int>(s.k), x, CUDA_R_16BF, static_cast<int>(s.k),
                                    &beta, y, CUDA_R_16BF, static_cast<int>(wrows),
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "gemm");
        },
        5, 50);
    std::printf(
        "{\"shape\": \"%s\", \"m\": %lld, \"k\": %lld, \"weight_bytes\": %lld, \"duo_us\": %.2f, "
        "\"duo_TBps\": %.3f, \"cublas_us\": %.2f, \"cublas_TBps\": %.3f}\n",
        s.name, static_cast<long long>(s.m), static_cast<long long>(s.k),
        static_cast<long long>(bytes), ms_duo * 1e3, bytes / ms_duo / 1e9, ms_cublas * 1e3,
        bytes / ms_cublas / 1e9);
    for (bf16* p : w) DUO_CUDA_CHECK(cudaFree(p));
  }
  DUO_CUDA_CHECK(cudaFree(x));
  DUO_CUDA_CHECK(cudaFree(y));
  check_cublas(cublasDestroy(h), "destroy");
  return 0;
}
