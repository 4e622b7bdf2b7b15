// Shared by the micro-benchmarks: deterministic random bf16 buffers and CUDA-event timing
// (median of `reps` runs after `warmup`).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "cuda/cuda_check.h"

namespace {

using bf16 = __nv_bfloat16;

__global__ void fill_random(bf16* p, int64_t count, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32);
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    p[i] = __float2bfloat16((static_cast<float>(x & 0xffffff) / 16777216.0f - 0.5f) * 4.0f);
  }
}

bf16* alloc_random(int64_t count, uint32_t seed) {
  bf16* p = nullptr;
  DUO_CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(std::max<int64_t>(count, 8)) * sizeof(bf16)));
  fill_random<<<1024, 256>>>(p, count, seed);
  DUO_CUDA_CHECK(cudaGetLastError());
  return p;
}

double median_ms(const std::function<void()>& fn, int warmup, int reps) {
  cudaEvent_t a, b;
  DUO_CUDA_CHECK(cudaEventCreate(&a));
  DUO_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i) fn();
  DUO_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    DUO_CUDA_CHECK(cudaEventRecord(a));
    fn();
    DUO_CUDA_CHECK(cudaEventRecord(b));
    DUO_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    DUO_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  DUO_CUDA_CHECK(cudaEventDestroy(a));
  DUO_CUDA_CHECK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace
