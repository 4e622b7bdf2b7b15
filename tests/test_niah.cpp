// Needle-in-a-haystack harness: prompt construction at token depths, scoring, and the CLI.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "core/file_util.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "eval/niah.h"
#include "test_util.h"

namespace duo {
namespace {

using testing::fixture;

TEST(Niah, PromptHasExactLengthAndNeedleAtDepth) {
  auto tok = Tokenizer::load(fixture("models/llama3_gqa"));
  auto hay = haystack_tokens(*tok, "", 5000);
  const Needle n = passkey_needle(3);
  const auto needle_ids = tok->encode("\n" + n.needle + "\n", false);
  for (int64_t L : {200, 1000, 3000}) {
    for (double d : {0.0, 25.0, 50.0, 100.0}) {
      NiahPrompt p = build_niah_prompt(*tok, hay, n, L, d);
      EXPECT_EQ(static_cast<int64_t>(p.ids.size()), L);
      EXPECT_EQ(p.ids[0], *tok->bos_id());
      // The needle's tokens sit at needle_position, which moves with depth.
      ASSERT_LE(p.needle_position + static_cast<int64_t>(needle_ids.size()), L);
      EXPECT_TRUE(
          std::equal(needle_ids.begin(), needle_ids.end(), p.ids.begin() + p.needle_position));
      const int64_t hay_len =
          L - 1 - static_cast<int64_t>(needle_ids.size()) -
          static_cast<int64_t>(
              tok->encode("\n\nQuestion: " + n.question + "\nAnswer:", false).size());
      EXPECT_EQ(p.needle_position,
                1 + static_cast<int64_t>(std::llround(d / 100.0 * static_cast<double>(hay_len))));
    }
  }
  EXPECT_THROW(build_niah_prompt(*tok, hay, n, 10, 50), Error);
  EXPECT_THROW(build_niah_prompt(*tok, hay, n, 1000, 101), Error);
}

TEST(Niah, KeyValuePromptHoldsEveryPairOnceWithTheAskedOneAtDepth) {
  auto tok = Tokenizer::load(fixture("models/llama3_gqa"));
  auto hay = haystack_tokens(*tok, "", 5000);
  const Needle n = kv_needle(7, 5);
  ASSERT_EQ(n.distractors.size(), 4u);
  EXPECT_EQ(n.answer.size(), 6u);
  EXPECT_NE(n.needle.find(n.answer), std::string::npos);
  const std::string key = n.question.substr(n.question.find(" for ") + 5);
  EXPECT_NE(n.needle.find(key.substr(0, key.size() - 1) + " is:"), std::string::npos);
  for (const auto& d : n.distractors) {
    EXPECT_EQ(d.find(key.substr(0, key.size() - 1) + " is:"), std::string::npos) << d;
    EXPECT_EQ(d.find(n.answer), std::string::npos) << d;  // values are 6 digits, keys distinct
  }
  EXPECT_EQ(kv_needle(7, 5).needle, n.needle);  // seeded
  EXPECT_NE(kv_needle(8, 5).needle, n.needle);
  auto find = [](const std::vector<int32_t>& ids, const std::vector<int32_t>& part) {
    std::vector<int64_t> at;
    for (auto it = ids.begin();
         (it = std::search(it, ids.end(), part.begin(), part.end())) != ids.end(); ++it)
      at.push_back(it - ids.begin());
    return at;
  };
  const auto asked = tok->encode("\n" + n.needle + "\n", false);
  int64_t fixed =
      1 + static_cast<int64_t>(asked.size()) +
      static_cast<int64_t>(tok->encode("\n\nQuestion: " + n.question + "\nAnswer:", false).size());
  for (const auto& d : n.distractors)
    fixed += static_cast<int64_t>(tok->encode("\n" + d + "\n", false).size());
  for (double depth : {0.0, 30.0, 100.0}) {
    NiahPrompt p = build_niah_prompt(*tok, hay, n, 2000, depth);
    EXPECT_EQ(static_cast<int64_t>(p.ids.size()), 2000);
    const auto at = find(p.ids, asked);
    ASSERT_EQ(at.size(), 1u) << depth;
    EXPECT_EQ(at[0], p.needle_position);
    // The asked needle follows the haystack tokens before its depth and the distractors whose
    // depths (30 + 20 i wrapped: 50, 70, 90, 10 at depth 30) come earlier.
    int64_t earlier_tokens = 0;
    for (size_t i = 0; i < n.distractors.size(); ++i) {
      const double d = std::fmod(depth + static_cast<double>(i + 1) * 20.0, 100.0);
      const auto ids = tok->encode("\n" + n.distractors[i] + "\n", false);
      EXPECT_EQ(find(p.ids, ids).size(), 1u) << n.distractors[i];
      if (d < depth) earlier_tokens += static_cast<int64_t>(ids.size());
    }
    EXPECT_EQ(
        p.needle_position,
        1 + earlier_tokens +
            static_cast<int64_t>(std::llround(depth / 100.0 * static_cast<double>(2000 - fixed))));
  }
  EXPECT_THROW(build_niah_prompt(*tok, hay, n, 60, 50), Error);
  EXPECT_THROW(kv_needle(1, 0), Error);
}

TEST(Niah, Scoring) {
  const std::string ans = "The best thing to do in San Francisco is eat a sandwich.";
  auto s =
      score_answer(" The best thing to do in San Francisco is eat a sandwich.\nQuestion:", ans);
  EXPECT_TRUE(s.exact);
  EXPECT_DOUBLE_EQ(s.words, 1.0);
  s = score_answer(" the best thing to do in Paris is eat", ans);
  EXPECT_FALSE(s.exact);
  EXPECT_NEAR(s.words, 8.0 / 12.0, 1e-12);  // 12 answer words; misses san, francisco, a, sandwich
  s = score_answer(" 58213\n\n", "58213");
  EXPECT_TRUE(s.exact);
  s = score_answer("\n58213", "58213");  // only the first line counts
  EXPECT_FALSE(s.exact);
  EXPECT_DOUBLE_EQ(s.words, 0.0);
}

TEST(Niah, TokenNllIsMinusLogSoftmax) {
  const float logits[3] = {1.0f, 2.0f, 3.0f};
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  EXPECT_NEAR(token_nll(logits, 3, 2), std::log(z) - 3.0, 1e-12);
  EXPECT_NEAR(token_nll(logits, 3, 0), std::log(z) - 1.0, 1e-12);
  EXPECT_THROW(token_nll(logits, 3, 3), Error);
}

// continuation_nll (chunked prefill, then the continuation) against one forward over prompt +
// continuation whose logits are log-softmaxed here; with a streaming pattern too (token-exact
// mode is chunk-size independent, so the two must agree).
TEST(Niah, ContinuationNllMatchesOneForwardOverEverything) {
  const auto dir = fixture("models/llama_mha_linear");
  const ModelConfig c = ModelConfig::load(dir);
  auto be = make_cpu_backend(CpuMode::kReference);
  std::mt19937 rng(5);
  std::vector<int32_t> prompt(70), cont(4);
  for (auto& t : prompt) t = static_cast<int32_t>(rng() % c.vocab_size);
  for (auto& t : cont) t = static_cast<int32_t>(rng() % c.vocab_size);
  HeadPartition half;  // KV head 0 of every layer retrieval, the rest streaming
  half.num_layers = c.num_layers;
  half.num_kv_heads = c.num_kv_heads;
  half.retrieval.assign(static_cast<size_t>(c.num_layers * c.num_kv_heads), 0);
  for (int64_t l = 0; l < c.num_layers; ++l) half.retrieval[l * c.num_kv_heads] = 1;
  for (const HeadLayout& layout :
       {HeadLayout::all_retrieval(c), HeadLayout::from_partition(c, half)}) {
    Model m(dir, *be, layout);
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), cont.begin(), cont.end());
    auto whole_cache = m.make_cache(80, 4, 16, StreamingPrefill::kExact);
    const int64_t k = static_cast<int64_t>(cont.size()), V = c.vocab_size;
    const std::vector<float> logits = m.forward(all, *whole_cache, k + 1);
    double want = 0;
    for (int64_t i = 0; i < k; ++i) {  // row i predicts cont[i]
      const float* row = &logits[i * V];
      double mx = row[0], z = 0;
      for (int64_t j = 1; j < V; ++j) mx = std::max(mx, static_cast<double>(row[j]));
      for (int64_t j = 0; j < V; ++j) z += std::exp(row[j] - mx);
      want += mx + std::log(z) - row[cont[i]];
    }
    want /= static_cast<double>(k);
    for (int64_t chunk : {7, 70, 1000}) {
      auto cache = m.make_cache(80, 4, 16, StreamingPrefill::kExact);
      EXPECT_NEAR(continuation_nll(m, *cache, prompt, cont, chunk), want, 1e-4 * want + 1e-6)
          << "chunk " << chunk;
    }
  }
  Model m(dir, *be, HeadLayout::all_retrieval(c));
  auto cache = m.make_cache(80, 4, 16, StreamingPrefill::kExact);
  EXPECT_THROW(continuation_nll(m, *cache, prompt, {}, 8), Error);
  (void)continuation_nll(m, *cache, prompt, cont, 8);
  EXPECT_THROW(continuation_nll(m, *cache, prompt, cont, 8), Error);  // cache no longer empty
}

TEST(Niah, CliRunsAndWritesJson) {
  testing::TempDir t("niah");
  auto r =
      testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() +
                       " --task passkey --lengths 120,200 --depths 0,50 --max-answer 4 --json " +
                       (t / "out.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("mean score"), std::string::npos);
  auto j = read_json_file(t / "out.json");
  EXPECT_EQ(j["results"].size(), 4u);
  EXPECT_EQ(j["attention"], "full attention");
  auto bad =
      testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() + " --lengths 10");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("too short"), std::string::npos) << bad.err;
  bad = testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() +
                         " --task passkey --kv-pairs 4");
  EXPECT_NE(bad.err.find("--kv-pairs applies to --task kv only"), std::string::npos) << bad.err;
  bad = testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() +
                         " --task kv --kv-pairs 0");
  EXPECT_NE(bad.err.find("--kv-pairs must be in [1, 256]"), std::string::npos) << bad.err;
  auto nll = testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() +
                              " --task passkey --lengths 120 --depths 50 --max-answer 4 "
                              "--answer-nll --json " +
                              (t / "nll.json").string());
  ASSERT_EQ(nll.exit_code, 0) << nll.err;
  EXPECT_NE(nll.out.find("mean answer NLL"), std::string::npos) << nll.out;
  auto jn = read_json_file(t / "nll.json");
  EXPECT_GT(jn["results"][0]["answer_nll"].get<double>(), 0.0);
  EXPECT_EQ(jn["mean_answer_nll"], jn["results"][0]["answer_nll"]);
  EXPECT_TRUE(j["mean_answer_nll"].is_null());  // not asked for
  auto kv = testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() +
                             " --task kv --kv-pairs 3 --lengths 300 --depths 50 --max-answer 4 "
                             "--json " +
                             (t / "kv.json").string());
  ASSERT_EQ(kv.exit_code, 0) << kv.err;
  auto jk = read_json_file(t / "kv.json");
  EXPECT_EQ(jk["task"], "kv");
  EXPECT_EQ(jk["kv_pairs"], 3);
  EXPECT_EQ(jk["results"][0]["answer"].get<std::string>().size(), 6u);
  bad = testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() + " --needle x");
  EXPECT_NE(bad.err.find("go together"), std::string::npos) << bad.err;
  bad = testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() +
                         " --haystack /no/dir");
  EXPECT_NE(bad.err.find("/no/dir: haystack directory not found"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace duo
