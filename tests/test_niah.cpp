// Needle-in-a-haystack harness: prompt construction at token depths, scoring, and the CLI.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_util.h"
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
  bad = testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() + " --needle x");
  EXPECT_NE(bad.err.find("go together"), std::string::npos) << bad.err;
  bad = testing::run_duo("niah -m " + fixture("models/llama_mha_linear").string() +
                         " --haystack /no/dir");
  EXPECT_NE(bad.err.find("/no/dir: haystack directory not found"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace duo
