// Perplexity and KL(full || pattern): window index maths, the per-token comparison by hand, the
// chunked evaluation against one forward per window, and the CLI.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "core/file_util.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "eval/perplexity.h"
#include "test_util.h"

namespace duo {
namespace {

using testing::fixture;

TEST(Perplexity, PlanWorkedExamples) {
  // The header's example: 10000 text tokens, BOS, ctx 4096, second half scored.
  PerplexityPlan p = plan_perplexity(10000, 1, 4096, 2048, 0);
  EXPECT_EQ(p.body, 4095);
  EXPECT_EQ(p.windows, 2);
  EXPECT_EQ(p.scored_per_window(), 2048);
  EXPECT_EQ(p.text_index(0, 1), 0);        // window 0 position 1 = first text token
  EXPECT_EQ(p.text_index(1, 1), 4095);     // window 1 starts where window 0 ended
  EXPECT_EQ(p.text_index(1, 4096), 8190);  // one past window 1's last text token
  EXPECT_EQ(plan_perplexity(10000, 1, 4096, 2048, 1).windows, 1);  // --windows caps
  EXPECT_EQ(plan_perplexity(10000, 1, 4096, 2048, 9).windows, 2);  // ...but adds none
  // No BOS: windows are ctx text tokens.
  p = plan_perplexity(8192, 0, 4096, 100, 0);
  EXPECT_EQ(p.body, 4096);
  EXPECT_EQ(p.windows, 2);
  EXPECT_EQ(p.scored_per_window(), 3996);
  EXPECT_EQ(p.text_index(1, 0), 4096);
  // Too short, bad --score-from, bad --ctx.
  try {
    plan_perplexity(4000, 1, 4096, 2048, 0);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("needs at least 4095"), std::string::npos) << e.what();
  }
  EXPECT_THROW(plan_perplexity(10000, 1, 4096, 0, 0), Error);
  EXPECT_THROW(plan_perplexity(10000, 1, 4096, 4096, 0), Error);
  EXPECT_THROW(plan_perplexity(10000, 1, 2, 1, 0), Error);
  EXPECT_THROW(plan_perplexity(10000, 1, 4096, 2048, -1), Error);
}

TEST(Perplexity, CompareNextTokenByHand) {
  // base: p = (1/4, 1/2, 1/4); test: uniform (1/3 each).
  const float base[3] = {0.0f, std::log(2.0f), 0.0f};
  const float test[3] = {0.0f, 0.0f, 0.0f};
  const TokenComparison c = compare_next_token(base, test, 3, 1);
  EXPECT_NEAR(c.nll_base, std::log(2.0), 1e-7);
  EXPECT_NEAR(c.nll_test, std::log(3.0), 1e-7);
  // KL = 2 * 1/4 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8)
  EXPECT_NEAR(c.kl, 0.5 * std::log(9.0 / 8.0), 1e-7);
  EXPECT_FALSE(c.same_top);  // argmax 1 vs 0 (lowest id among equal logits)
  const TokenComparison same = compare_next_token(base, base, 3, 0);
  EXPECT_EQ(same.kl, 0.0);
  EXPECT_TRUE(same.same_top);
  EXPECT_EQ(same.nll_base, same.nll_test);
  EXPECT_THROW(compare_next_token(base, test, 3, 3), Error);
  EXPECT_THROW(compare_next_token(base, test, 3, -1), Error);
}

// Log-softmax in double, written out here (independent of the code under test).
std::vector<double> log_probs(const float* row, int64_t V) {
  double mx = row[0], z = 0;
  for (int64_t j = 1; j < V; ++j) mx = std::max(mx, static_cast<double>(row[j]));
  for (int64_t j = 0; j < V; ++j) z += std::exp(row[j] - mx);
  std::vector<double> out(static_cast<size_t>(V));
  for (int64_t j = 0; j < V; ++j) out[j] = row[j] - mx - std::log(z);
  return out;
}

// evaluate_perplexity (chunked, only the scored rows) against one forward per window per model
// with every logit row, for several chunk sizes; a streaming pattern against full attention.
TEST(Perplexity, ChunkedEvaluationMatchesOneForwardPerWindow) {
  const auto dir = fixture("models/llama_mha_linear");
  const ModelConfig c = ModelConfig::load(dir);
  auto be = make_cpu_backend(CpuMode::kReference);
  std::mt19937 rng(11);
  std::vector<int32_t> text(130);
  for (auto& t : text) t = static_cast<int32_t>(rng() % c.vocab_size);
  const std::vector<int32_t> prefix{1};
  HeadPartition half;  // KV head 0 of every layer retrieval, the rest streaming
  half.num_layers = c.num_layers;
  half.num_kv_heads = c.num_kv_heads;
  half.retrieval.assign(static_cast<size_t>(c.num_layers * c.num_kv_heads), 0);
  for (int64_t l = 0; l < c.num_layers; ++l) half.retrieval[l * c.num_kv_heads] = 1;
  Model test(dir, *be, HeadLayout::from_partition(c, half));
  Model base(dir, *be, HeadLayout::all_retrieval(c));
  const int64_t ctx = 60, first = 23, sink = 4, recent = 8, V = c.vocab_size;
  // Expected: windows of 1 + 59 text tokens (2 fit in 130), positions 23..59 scored.
  double nll = 0, base_nll = 0, kl = 0, same = 0;
  int64_t n = 0;
  for (int64_t w = 0; w < 2; ++w) {
    std::vector<int32_t> ids = prefix;
    ids.insert(ids.end(), text.begin() + w * 59, text.begin() + (w + 1) * 59);
    const std::span<const int32_t> in(ids.data(), ids.size() - 1);
    auto ct = test.make_cache(ctx, sink, recent, StreamingPrefill::kExact);
    auto cb = base.make_cache(ctx, 0, 0, StreamingPrefill::kExact);
    const std::vector<float> lt = test.forward(in, *ct, ctx - 1);  // rows = positions 0..58
    const std::vector<float> lb = base.forward(in, *cb, ctx - 1);
    for (int64_t q = first - 1; q < ctx - 1; ++q) {
      const std::vector<double> pt = log_probs(&lt[q * V], V), pb = log_probs(&lb[q * V], V);
      const int32_t target = ids[q + 1];
      nll -= pt[target];
      base_nll -= pb[target];
      for (int64_t j = 0; j < V; ++j) kl += std::exp(pb[j]) * (pb[j] - pt[j]);
      const auto at = std::max_element(pt.begin(), pt.end()) - pt.begin();
      const auto ab = std::max_element(pb.begin(), pb.end()) - pb.begin();
      same += at == ab ? 1 : 0;
      ++n;
    }
  }
  ASSERT_EQ(n, 2 * (ctx - first));
  ASSERT_GT(kl, 1e-6);  // the streaming heads really change the distribution
  for (int64_t chunk : {5, 22, 59, 1000}) {
    PerplexityOptions o;
    o.ctx = ctx;
    o.first_target = first;
    o.chunk = chunk;
    o.sink = sink;
    o.recent = recent;
    const PerplexityResult r = evaluate_perplexity(test, &base, text, prefix, o);
    ASSERT_EQ(r.tokens, n) << "chunk " << chunk;
    ASSERT_EQ(r.windows.size(), 2u);
    EXPECT_NEAR(r.nll, nll / n, 1e-5) << "chunk " << chunk;
    EXPECT_NEAR(r.base_nll, base_nll / n, 1e-5) << "chunk " << chunk;
    EXPECT_NEAR(r.kl, kl / n, 1e-6 + 1e-4 * kl / n) << "chunk " << chunk;
    EXPECT_NEAR(r.same_top, same / n, 1e-12) << "chunk " << chunk;
    EXPECT_NEAR(0.5 * (r.windows[0].nll + r.windows[1].nll), r.nll, 1e-9);
    EXPECT_GE(r.kl_max, r.kl_p99);
    EXPECT_GE(r.kl_p99, r.kl_median);
  }
  // Full attention against itself: every distribution identical.
  PerplexityOptions o;
  o.ctx = ctx;
  o.sink = sink;
  o.recent = recent;
  const PerplexityResult same_model = evaluate_perplexity(base, &base, text, prefix, o);
  EXPECT_EQ(same_model.kl, 0.0);
  EXPECT_EQ(same_model.same_top, 1.0);
  EXPECT_EQ(same_model.nll, same_model.base_nll);
  EXPECT_EQ(same_model.tokens, 2 * (ctx - ctx / 2));  // default: the second half
  // Without a base model only the perplexity is reported.
  const PerplexityResult alone = evaluate_perplexity(test, nullptr, text, prefix, o);
  const PerplexityResult paired = evaluate_perplexity(test, &base, text, prefix, o);
  EXPECT_FALSE(alone.compared);
  EXPECT_EQ(alone.tokens, paired.tokens);
  EXPECT_NEAR(alone.nll, paired.nll, 1e-12);
  EXPECT_NEAR(alone.windows[1].nll, paired.windows[1].nll, 1e-12);
  EXPECT_EQ(alone.kl, 0.0);
  EXPECT_NEAR(alone.perplexity(), std::exp(alone.nll), 1e-12);
}

TEST(Perplexity, CliRunsAndRejectsBadInput) {
  testing::TempDir t("ppl");
  const std::string model = "-m " + fixture("models/llama3_gqa").string();
  std::string words;
  std::mt19937 rng(3);
  const char* vocab[] = {"river", "stone", "light", "quiet", "north", "window", "paper", "green"};
  for (int i = 0; i < 600; ++i) words += std::string(vocab[rng() % 8]) + (i % 12 ? " " : ".\n");
  testing::write_file(t / "a.txt", words);
  auto r = testing::run_duo("perplexity " + model + " --text " + (t / "a.txt").string() +
                            " --ctx 128 --windows 2 --streaming-only --sink 4 --recent 16 "
                            "--kl-divergence --backend cpu --json " +
                            (t / "out.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("KL(full || this)"), std::string::npos) << r.out;
  auto j = read_json_file(t / "out.json");
  EXPECT_EQ(j["windows"], 2);
  EXPECT_EQ(j["tokens_scored"], 2 * 64);
  EXPECT_EQ(j["attention"], "streaming only");
  EXPECT_EQ(j["sink"], 4);
  EXPECT_EQ(j["recent"], 16);
  EXPECT_EQ(j["streaming_prefill"], "exact");
  EXPECT_GT(j["kl"].get<double>(), 0.0);
  EXPECT_EQ(j["per_window"].size(), 2u);
  // A directory of .txt files is read too; full attention alone has no KL.
  auto d =
      testing::run_duo("perplexity " + model + " --text " + t.path().string() +
                       " --ctx 128 --windows 2 --backend cpu --json " + (t / "full.json").string());
  ASSERT_EQ(d.exit_code, 0) << d.err;
  auto jf = read_json_file(t / "full.json");
  EXPECT_TRUE(jf["kl"].is_null());
  // The same two windows under full attention as the KL run's base model.
  EXPECT_NEAR(jf["nll"].get<double>(), j["full_nll"].get<double>(), 1e-9);
  const auto bad = [&](const std::string& args, const std::string& want) {
    auto b = testing::run_duo("perplexity " + model + " --backend cpu " + args);
    EXPECT_NE(b.exit_code, 0) << args;
    EXPECT_NE(b.err.find(want), std::string::npos) << args << "\n" << b.err;
  };
  bad("--text " + (t / "a.txt").string() + " --kl-divergence", "none was given");
  bad("--text " + (t / "a.txt").string() + " --ctx 100000", "needs at least");
  bad("--text " + (t / "a.txt").string() + " --ctx 128 --score-from 128", "--score-from");
  bad("--text /no/such/file.txt", "/no/such/file.txt: not found");
  bad("--text " + (t / "a.txt").string() + " --chunk 0", "--chunk must be positive");
  bad("--text " + (t / "a.txt").string() + " --ctx 128 --windows 1 --json /no/such/dir/out.json",
      "/no/such/dir/out.json: cannot write");
}

}  // namespace
}  // namespace duo
