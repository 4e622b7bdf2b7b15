// Sampling: greedy, temperature/top-k/top-p semantics, seeding, and stopping at EOS.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <tuple>

#include "core/error.h"
#include "engine/generate.h"
#include "engine/sampler.h"
#include "test_util.h"

namespace duo {
namespace {

const std::vector<float> kLogits = {1.0f, 3.0f, 2.0f, 0.5f, 2.9f};

TEST(Sampler, GreedyIsArgmax) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(kLogits), 1);
}

TEST(Sampler, TopKOneAndTinyTopPAreArgmax) {
  Sampler k1(SamplingParams{1.0f, 1, 1.0f, 7});
  Sampler p0(SamplingParams{1.0f, 0, 1e-6f, 7});
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(k1.sample(kLogits), 1);
    EXPECT_EQ(p0.sample(kLogits), 1);
  }
}

TEST(Sampler, SameSeedSameDraws) {
  Sampler a(SamplingParams{1.0f, 0, 1.0f, 123}), b(SamplingParams{1.0f, 0, 1.0f, 123});
  std::vector<int32_t> da, db;
  for (int i = 0; i < 100; ++i) {
    da.push_back(a.sample(kLogits));
    db.push_back(b.sample(kLogits));
  }
  EXPECT_EQ(da, db);
}

TEST(Sampler, FrequenciesFollowTheTruncatedSoftmax) {
  // temperature 0.5, top-k 3: candidates 1 (3.0), 4 (2.9), 2 (2.0) with p ~ exp(logit / 0.5).
  Sampler s(SamplingParams{0.5f, 3, 1.0f, 99});
  std::map<int32_t, int> count;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++count[s.sample(kLogits)];
  const double z = std::exp(6.0) + std::exp(5.8) + std::exp(4.0);
  EXPECT_EQ(count.count(0) + count.count(3), 0u);  // outside the top 3: never drawn
  EXPECT_NEAR(count[1] / double(n), std::exp(6.0) / z, 0.015);
  EXPECT_NEAR(count[4] / double(n), std::exp(5.8) / z, 0.015);
  EXPECT_NEAR(count[2] / double(n), std::exp(4.0) / z, 0.015);
  // top-p 0.6 keeps only token 1 (mass 0.49) and 4 (0.40): never token 2.
  Sampler p(SamplingParams{0.5f, 0, 0.6f, 5});
  for (int i = 0; i < 2000; ++i) EXPECT_NE(p.sample(kLogits), 2);
}

TEST(Sampler, RejectsAbsurdParameters) {
  EXPECT_THROW(Sampler(SamplingParams{-1.0f, 0, 1.0f, 0}), Error);
  EXPECT_THROW(Sampler(SamplingParams{1.0f, -2, 1.0f, 0}), Error);
  EXPECT_THROW(Sampler(SamplingParams{1.0f, 0, 1.5f, 0}), Error);
  EXPECT_THROW(Sampler(SamplingParams{NAN, 0, 1.0f, 0}), Error);
}

TEST(Generate, StopsAtEos) {
  const auto dir = testing::fixture("models/llama3_gqa");
  auto be = make_cpu_backend(CpuMode::kFast);
  const ModelConfig c = ModelConfig::load(dir);
  Model m(dir, *be, HeadLayout::all_retrieval(c));
  const std::vector<int32_t> prompt = {5, 17, 300, 42};
  GenerateOptions opt;
  opt.max_new_tokens = 10;
  auto cache = m.make_cache(20, 0, 0, StreamingPrefill::kExact);
  GenerateResult free_run = generate(m, *cache, prompt, opt);
  ASSERT_EQ(free_run.tokens.size(), 10u);
  EXPECT_FALSE(free_run.stopped);
  // Make the third generated token an EOS: generation stops right there, EOS included.
  opt.stop_ids = {free_run.tokens[2]};
  auto cache2 = m.make_cache(20, 0, 0, StreamingPrefill::kExact);
  GenerateResult stopped = generate(m, *cache2, prompt, opt);
  EXPECT_TRUE(stopped.stopped);
  const size_t first = static_cast<size_t>(
      std::find(free_run.tokens.begin(), free_run.tokens.end(), free_run.tokens[2]) -
      free_run.tokens.begin());
  EXPECT_EQ(stopped.tokens,
            std::vector<int32_t>(free_run.tokens.begin(), free_run.tokens.begin() + first + 1));
  // Context checks.
  auto small = m.make_cache(8, 0, 0, StreamingPrefill::kExact);
  EXPECT_THROW(generate(m, *small, prompt, opt), Error);  // 4 + 10 > 8
}

// The chunk split shared by generate() and continuation_nll: chunks of `chunk` run here, the last
// (1..chunk tokens) is returned; worked examples with 10 tokens.
TEST(Generate, PrefillToLastChunkSplitsAsDocumented) {
  const auto dir = testing::fixture("models/llama3_gqa");
  auto be = make_cpu_backend(CpuMode::kFast);
  const ModelConfig c = ModelConfig::load(dir);
  Model m(dir, *be, HeadLayout::all_retrieval(c));
  const std::vector<int32_t> prompt = {5, 17, 300, 42, 7, 9, 11, 13, 15, 19};
  // chunk: (tokens run here, progress reports, size of the returned last chunk)
  for (const auto& [chunk, run, reports, rest] :
       std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {3, 9, 3, 1}, {4, 8, 2, 2}, {5, 5, 1, 5}, {10, 0, 0, 10}, {64, 0, 0, 10}}) {
    auto cache = m.make_cache(16, 0, 0, StreamingPrefill::kExact);
    std::vector<int64_t> done;
    const auto last = prefill_to_last_chunk(m, *cache, prompt, chunk, [&](int64_t d, int64_t n) {
      EXPECT_EQ(n, 10);
      done.push_back(d);
    });
    EXPECT_EQ(cache->length(), run) << "chunk " << chunk;
    EXPECT_EQ(static_cast<int64_t>(done.size()), reports) << "chunk " << chunk;
    if (!done.empty()) {
      EXPECT_EQ(done.back(), run);
    }
    ASSERT_EQ(static_cast<int64_t>(last.size()), rest) << "chunk " << chunk;
    EXPECT_EQ(last.data(), prompt.data() + run);
  }
  auto cache = m.make_cache(16, 0, 0, StreamingPrefill::kExact);
  EXPECT_THROW(prefill_to_last_chunk(m, *cache, std::vector<int32_t>{}, 4), Error);
  EXPECT_THROW(prefill_to_last_chunk(m, *cache, prompt, 0), Error);
}

}  // namespace
}  // namespace duo
