// The CUDA backend's fused decode attention (Backend::rope_attention: RoPE of the query and key
// heads in one kernel with the retrieval-store append) against the same call op by op (the base
// class: rope() then attention()), on two caches fed the same tokens. Every test skips ("no CUDA
// device") where the driver reports no GPU.
//
//   check                                                  bound
//   fused vs op by op: 9-token prefill, then 40 decode      bitwise equal attention outputs and
//     steps (ring S=4 R=8 wraps); head_dim 64 / 128; 0, 1,  rotated q/k/v rows, every step and
//     2, 4 of 4 KV heads retrieval (layer 0; layer 1 the   layer
//     complement); exact and chunk streaming modes
//   wrong position (not the cache length)                  duo::Error
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_backend.h"
#include "engine/backend.h"

namespace duo {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

std::vector<float> random_row(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = nd(rng);
  return v;  // the backend rounds to bf16 on upload (both copies alike)
}

RopeFrequencies frequencies(int64_t head_dim) {
  RopeFrequencies f;
  for (int64_t i = 0; i < head_dim / 2; ++i)
    f.inv_freq.push_back(static_cast<float>(std::pow(10000.0, -2.0 * i / head_dim)));
  return f;
}

TEST(DecodeFusion, RopeAttentionFusedEqualsOpByOp) {
  SKIP_WITHOUT_GPU();
  const int64_t kHeads = 8, kKvHeads = 4, kPrefill = 9, kSteps = 40;
  for (int64_t d : {64, 128})
    for (int64_t nr : {0, 1, 2, 4})
      for (StreamingPrefill mode : {StreamingPrefill::kExact, StreamingPrefill::kChunk}) {
        auto b = make_cuda_backend(0);
        CacheSpec s;
        s.num_layers = 2;
        s.num_kv_heads = kKvHeads;
        s.head_dim = d;
        s.capacity = kPrefill + kSteps + 3;
        s.num_retrieval = {nr, kKvHeads - nr};
        s.sink = 4;
        s.recent = 8;
        s.prefill = mode;
        auto fused = b->create_cache(s), plain = b->create_cache(s);
        const RopeFrequencies f = frequencies(d);
        const int64_t qd = kHeads * d, kvd = kKvHeads * d;
        std::mt19937 rng(static_cast<uint32_t>(d * 100 + nr * 10 + static_cast<int>(mode)));
        // Prefill: the same rows into both caches.
        {
          const auto q = random_row(kPrefill * qd, rng), k = random_row(kPrefill * kvd, rng),
                     v = random_row(kPrefill * kvd, rng);
          Tensor tq = b->upload(q.data(), kPrefill, qd), tk = b->upload(k.data(), kPrefill, kvd),
                 tv = b->upload(v.data(), kPrefill, kvd), out = b->alloc(kPrefill, qd);
          for (KVCache* c : {fused.get(), plain.get()})
            for (int64_t l = 0; l < s.num_layers; ++l) b->attention(*c, l, tq, tk, tv, kHeads, out);
          b->advance(*fused, kPrefill);
          b->advance(*plain, kPrefill);
        }
        std::string what = "d=" + std::to_string(d) + " retrieval=" + std::to_string(nr) +
                           (mode == StreamingPrefill::kChunk ? " chunk" : " exact");
        int64_t mismatches = 0;
        for (int64_t step = 0; step < kSteps; ++step) {
          const std::vector<int64_t> pos = {kPrefill + step};
          for (int64_t l = 0; l < s.num_layers; ++l) {
            const auto row = random_row(qd + 2 * kvd, rng);
            Tensor qa = b->upload(row.data(), 1, qd + 2 * kvd);
            Tensor qb = b->upload(row.data(), 1, qd + 2 * kvd);
            Tensor oa = b->alloc(1, qd), ob = b->alloc(1, qd);
            b->rope_attention(*fused, l, qa, kHeads, pos, f, oa);
            b->Backend::rope_attention(*plain, l, qb, kHeads, pos, f, ob);
            const auto ga = b->download(oa, 0, 1), gb = b->download(ob, 0, 1);
            const auto ra = b->download(qa, 0, 1), rb = b->download(qb, 0, 1);
            for (size_t i = 0; i < ga.size(); ++i) mismatches += ga[i] != gb[i];
            for (size_t i = 0; i < ra.size(); ++i) mismatches += ra[i] != rb[i];
            for (float x : ga) ASSERT_TRUE(std::isfinite(x)) << what << " step " << step;
          }
          b->advance(*fused, 1);
          b->advance(*plain, 1);
        }
        EXPECT_EQ(mismatches, 0) << what;
        std::printf("  [measured] %-28s fused vs op by op: %lld elements differ over %lld steps\n",
                    what.c_str(), static_cast<long long>(mismatches),
                    static_cast<long long>(kSteps));
      }
}

TEST(DecodeFusion, RopeAttentionRejectsAPositionOtherThanTheCacheLength) {
  SKIP_WITHOUT_GPU();
  auto b = make_cuda_backend(0);
  CacheSpec s;
  s.num_layers = 1;
  s.num_kv_heads = 2;
  s.head_dim = 64;
  s.capacity = 8;
  s.num_retrieval = {1};
  s.sink = 2;
  s.recent = 2;
  auto cache = b->create_cache(s);
  std::mt19937 rng(5);
  const auto row = random_row(4 * 64 + 2 * 2 * 64, rng);
  Tensor qkv = b->upload(row.data(), 1, static_cast<int64_t>(row.size()));
  Tensor out = b->alloc(1, 4 * 64);
  const std::vector<int64_t> pos = {3};
  EXPECT_THROW(b->rope_attention(*cache, 0, qkv, 4, pos, frequencies(64), out), Error);
}

}  // namespace
}  // namespace duo
