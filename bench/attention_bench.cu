// Times the attention kernels with CUDA events (median of >= 20 runs after warm-up), JSON lines:
//  (a) full causal prefill, bf16, hd 128, 32 query / 8 KV heads, all retrieval, p0 = 0:
//      n = 16K, 32K, 64K; TFLOP/s with causal FLOPs = 4 * n^2 / 2 * d * heads
//  (b) decode (n = 1) at context 128K and 512K, GQA 32/8, hd 128: KV bandwidth = K+V bytes / time
//      (also 50% retrieval heads, S=128 R=256, for the DuoAttention decode speedup)
//  (c) streaming-only prefill (S = 128, R = 256) vs full prefill at 32K: speedup
// Usage: duo_attention_bench [--quick | --decode-only | --prefill-only]
//   --prefill-only: (a) also at n = 1K and 4K, then (c); no decode. The prefill kernel follows
//   DUO_ATTN_SM90 (0: the mma.sync kernel; unset: the sm_90a wgmma kernel on Hopper from 1K
//   tokens).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "bench_util.cuh"
#include "cuda/attention.h"
#include "cuda/cuda_check.h"

namespace {

constexpr int kH = 32, kHkv = 8, kD = 128;

struct Bufs {
  bf16 *q = nullptr, *kn = nullptr, *vn = nullptr, *out = nullptr, *rk = nullptr, *rv = nullptr,
       *sk = nullptr, *sv = nullptr;
  float* ws = nullptr;
  ~Bufs() {
    for (void* p : {static_cast<void*>(q), static_cast<void*>(kn), static_cast<void*>(vn),
                    static_cast<void*>(out), static_cast<void*>(rk), static_cast<void*>(rv),
                    static_cast<void*>(sk), static_cast<void*>(sv), static_cast<void*>(ws)})
      if (p) cudaFree(p);
  }
};

duo::cuda::AttentionParams params(Bufs& b, int64_t n, int64_t p0, int nr, int64_t capacity,
                                  int64_t S, int64_t R) {
  duo::cuda::AttentionParams p{};
  p.q = b.q;
  p.k_new = b.kn;
  p.v_new = b.vn;
  p.out = b.out;
  p.n = n;
  p.p0 = p0;
  p.num_heads = kH;
  p.num_kv_heads = kHkv;
  p.num_retrieval = nr;
  p.head_dim = kD;
  p.scale = 1.0f / std::sqrt(static_cast<float>(kD));
  p.retrieval_k = b.rk;
  p.retrieval_v = b.rv;
  p.capacity = capacity;
  p.streaming_k = b.sk;
  p.streaming_v = b.sv;
  p.slots = std::min(capacity, S + R);
  p.sink = S;
  p.recent = R;
  p.mode = duo::cuda::StreamingMode::kExact;
  return p;
}

double prefill_ms(int64_t n, int nr, int reps) {
  Bufs b;
  b.q = alloc_random(n * kH * kD, 1);
  b.kn = alloc_random(n * kHkv * kD, 2);
  b.vn = alloc_random(n * kHkv * kD, 3);
  DUO_CUDA_CHECK(cudaMalloc(&b.out, static_cast<size_t>(n * kH * kD) * sizeof(bf16)));
  b.rk = alloc_random(static_cast<int64_t>(nr) * n * kD, 4);
  b.rv = alloc_random(static_cast<int64_t>(nr) * n * kD, 5);
  b.sk = alloc_random(static_cast<int64_t>(kHkv - nr) * 384 * kD, 6);
  b.sv = alloc_random(static_cast<int64_t>(kHkv - nr) * 384 * kD, 7);
  auto p = params(b, n, 0, nr, n, 128, 256);
  return median_ms([&] { duo::cuda::attention(p, nullptr); }, 3, reps);
}

double decode_ms(int64_t ctx, int nr, int sms, int reps) {
  Bufs b;
  b.q = alloc_random(kH * kD, 1);
  b.kn = alloc_random(kHkv * kD, 2);
  b.vn = alloc_random(kHkv * kD, 3);
  DUO_CUDA_CHECK(cudaMalloc(&b.out, static_cast<size_t>(kH * kD) * sizeof(bf16)));
  b.rk = alloc_random(static_cast<int64_t>(nr) * ctx * kD, 4);
  b.rv = alloc_random(static_cast<int64_t>(nr) * ctx * kD, 5);
  b.sk = alloc_random(static_cast<int64_t>(kHkv - nr) * 384 * kD, 6);
  b.sv = alloc_random(static_cast<int64_t>(kHkv - nr) * 384 * kD, 7);
  // Room for up to 2 * SMs splits so DUO_ATTN_SPLITS can be explored; the default uses fewer.
  const int64_t wsb = duo::cuda::attention_workspace_bytes(1, kH, kD, ctx, 2 * sms);
  DUO_CUDA_CHECK(cudaMalloc(&b.ws, static_cast<size_t>(wsb)));
  auto p = params(b, 1, ctx - 1, nr, ctx, 128, 256);
  p.workspace = b.ws;
  p.workspace_bytes = wsb;
  return median_ms([&] { duo::cuda::attention(p, nullptr); }, 5, reps);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const bool decode_only = argc > 1 && std::strcmp(argv[1], "--decode-only") == 0;
  const bool prefill_only = argc > 1 && std::strcmp(argv[1], "--prefill-only") == 0;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("{\"error\": \"no CUDA device\"}\n");
    return 0;
  }
  cudaDeviceProp prop{};
  DUO_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const int reps = 20;
  const char* forced = std::getenv("DUO_ATTN_SPLITS");
  const char* sm90 = std::getenv("DUO_ATTN_SM90");
  std::printf(
      "{\"impl\": \"duo\", \"device\": \"%s\", \"sms\": %d, \"DUO_ATTN_SPLITS\": \"%s\", "
      "\"DUO_ATTN_SM90\": \"%s\"}\n",
      prop.name, prop.multiProcessorCount, forced ? forced : "default", sm90 ? sm90 : "default");
  std::fflush(stdout);
  double full32 = 0;
  for (int64_t n : {1024LL, 4096LL, 16384LL, 32768LL, 65536LL}) {
    if (n < 16384 && !prefill_only) continue;
    if ((quick && n > 16384) || decode_only) break;
    const double ms = prefill_ms(n, kHkv, reps);
    if (n == 32768) full32 = ms;
    const double flops = 4.0 * static_cast<double>(n) * n / 2 * kD * kH;
    std::printf(
        "{\"impl\": \"duo\", \"bench\": \"prefill_causal\", \"n\": %lld, \"ms\": %.4f, "
        "\"tflops\": %.1f}\n",
        static_cast<long long>(n), ms, flops / ms / 1e9);
    std::fflush(stdout);
  }
  for (int64_t ctx : {131072LL, 524288LL}) {
    if (prefill_only) break;
    for (int nr : {kHkv, kHkv / 2}) {
      const double ms = decode_ms(ctx, nr, prop.multiProcessorCount, reps);
      const double bytes = 2.0 * kD * 2 *
                           (static_cast<double>(nr) * ctx +
                            static_cast<double>(kHkv - nr) * std::min<int64_t>(ctx, 385));
      std::printf(
          "{\"impl\": \"duo\", \"bench\": \"decode\", \"ctx\": %lld, \"retrieval_kv_heads\": %d, "
          "\"ms\": %.4f, \"kv_bytes\": %.0f, \"gbps\": %.1f}\n",
          static_cast<long long>(ctx), nr, ms, bytes, bytes / ms / 1e6);
      std::fflush(stdout);
    }
  }
  if (!quick && !decode_only) {
    const double ms = prefill_ms(32768, 0, reps);
    std::printf(
        "{\"impl\": \"duo\", \"bench\": \"prefill_streaming_only\", \"n\": 32768, \"S\": 128, "
        "\"R\": 256, \"ms\": %.4f, \"full_ms\": %.4f, \"speedup\": %.2f}\n",
        ms, full32, full32 / ms);
    const double half = prefill_ms(32768, kHkv / 2, reps);
    std::printf(
        "{\"impl\": \"duo\", \"bench\": \"prefill_half_retrieval\", \"n\": 32768, \"ms\": %.4f, "
        "\"speedup_vs_full\": %.2f}\n",
        half, full32 / half);
  }
  return 0;
}
