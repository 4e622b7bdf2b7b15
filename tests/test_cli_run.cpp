// `duo run` and `duo info` end to end through the binary: transformers parity from text, the
// JSON report, DuoAttention flags, and bad input (one clear error line, non-zero exit).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/file_util.h"
#include "test_util.h"

namespace duo {
namespace {

using testing::fixture;
using testing::run_duo;

std::string model(const std::string& name) {
  return fixture("models/" + name).string();
}

TEST(CliRun, GreedyTextMatchesTransformersEndToEnd) {
  for (const char* name : {"llama_mha_linear", "llama3_gqa", "mistral_gqa", "qwen2_bias_tied"}) {
    auto g = read_json_file(fixture(std::string("models/") + name + "/golden.json"))["text_greedy"];
    auto r = run_duo("run -m " + model(name) + " -p '" + g["prompt"].get<std::string>() +
                     "' -n 16 --ignore-eos --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["prompt_tokens"].get<int64_t>(), static_cast<int64_t>(g["prompt_ids"].size()))
        << name;
    EXPECT_EQ(j["tokens"], g["continuation"]) << name;
    EXPECT_EQ(j["text"], g["text"]) << name;
    EXPECT_EQ(j["attention"], "full attention");
    EXPECT_EQ(j["kv_bytes"]["total"], j["kv_bytes"]["full_attention"]);
  }
}

TEST(CliRun, StreamsTextAndSummarises) {
  auto g = read_json_file(fixture("models/llama3_gqa/golden.json"))["text_greedy"];
  auto r = run_duo("run -m " + model("llama3_gqa") + " -p '" + g["prompt"].get<std::string>() +
                   "' -n 16 --ignore-eos");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, g["text"].get<std::string>() + "\n");
  EXPECT_NE(r.err.find("KV"), std::string::npos);
}

TEST(CliRun, PatternReportsKvBytesAndSparsity) {
  auto r = run_duo("run -m " + model("llama_mha_linear") +
                   " -p 'hello there' -n 8 -c 64 --json --pattern " +
                   fixture("patterns/fixtures/llama_mha_linear").string() + " --sparsity 0.5");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["attention"], "DuoAttention");
  EXPECT_EQ(j["sink"], 4);  // from the pattern's config.json
  EXPECT_EQ(j["recent"], 8);
  EXPECT_EQ(j["retrieval_kv_heads"], 4);
  EXPECT_EQ(j["total_kv_heads"], 8);
  // 2 layers, head_dim 16, fp32 on the CPU: 4 retrieval heads x 64 tokens + 4 streaming x (4 + 8).
  EXPECT_EQ(j["kv_bytes"]["total"], 2 * 16 * 4 * (4 * 64 + 4 * 12));
  EXPECT_EQ(j["kv_bytes"]["full_attention"], 2 * 16 * 4 * 8 * 64);
  auto s = run_duo("run -m " + model("llama_mha_linear") +
                   " -p 'hello there' -n 8 --json --streaming-only --sink 2 --recent 3");
  ASSERT_EQ(s.exit_code, 0) << s.err;
  auto js = nlohmann::json::parse(s.out);
  EXPECT_EQ(js["attention"], "streaming only");
  EXPECT_EQ(js["retrieval_kv_heads"], 0);
  EXPECT_DOUBLE_EQ(js["sparsity"].get<double>(), 1.0);
}

TEST(CliRun, ChatTemplateRuns) {
  auto r = run_duo("run -m " + model("qwen2_bias_tied") + " -p 'hi' -n 4 --chat --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // ChatML with Qwen's default system prompt is far longer than the two-token prompt.
  EXPECT_GT(nlohmann::json::parse(r.out)["prompt_tokens"].get<int64_t>(), 10);
}

TEST(CliRun, Info) {
  auto r = run_duo("info -m " + model("qwen2_bias_tied") + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  auto g = read_json_file(fixture("models/qwen2_bias_tied/golden.json"));
  EXPECT_EQ(j["parameters"], g["num_parameters"]);
  EXPECT_EQ(j["model_type"], "qwen2");
  EXPECT_EQ(j["kv_bytes_per_token_bf16"], 2 * 2 * 2 * 16 * 2);
  auto t = run_duo("info -m " + model("mistral_gqa"));
  EXPECT_EQ(t.exit_code, 0);
  EXPECT_NE(t.out.find("GQA 2:1"), std::string::npos);
}

struct BadCase {
  std::string args;
  std::string fragment;  // must appear in the single error line
};

TEST(CliRun, BadInputGivesOneClearError) {
  const std::string m = model("llama_mha_linear");
  const std::string pat = fixture("patterns/fixtures/llama_mha_linear").string();
  const BadCase cases[] = {
      {"run -m /no/such/model -p hi", "/no/such/model: model directory not found"},
      {"run -m " + m + " -p ''", "empty prompt"},
      {"run -m " + m, "empty prompt"},
      {"run -m " + m + " -f /no/such/file.txt", "/no/such/file.txt: file not found"},
      {"run -m " + m + " -p 'a long prompt with many words in it' -c 3",
       "longer than the context length -c 3"},
      {"run -m " + m + " -p hi -n 100 -c 20", "exceeds the context length -c 20"},
      {"run -m " + m + " -p hi --temp -1", "--temp must be >= 0"},
      {"run -m " + m + " -p hi --top-p 0", "--top-p must be in (0, 1]"},
      {"run -m " + m + " -p hi --chunk 0", "--chunk must be positive"},
      {"run -m " + m + " -p hi --pattern " + pat + " --sparsity 1.5",
       "--sparsity must be in [0, 1]"},
      {"run -m " + m + " -p hi --pattern " + pat + " --sparsity -0.1",
       "--sparsity must be in [0, 1]"},
      {"run -m " + m + " -p hi --pattern " + pat + " --sink -1", "--sink must be in [0, "},
      {"run -m " + m + " -p hi --pattern " + pat + " --recent -5", "--recent must be in [0, "},
      // Values whose sums would wrap int64 (these crashed or slipped past the checks before).
      {"run -m " + m + " -p hi --pattern " + pat + " --sink 9223372036854775800 --recent 100",
       "--sink must be in [0, 2147483648]"},
      {"run -m " + m + " -p hi -n 9223372036854775807 -c 100", "-n must be in [0, 2147483648]"},
      {"run -m " + m + " -p hi -c 288230376151711744", "-c must be in [1, 2147483648]"},
      {"run -m " + m + " -f /dev/zero", "/dev/zero: not a regular file"},
      {"run -m " + m + " -p hi --pattern " + pat + " --sparsity 0.5 --threshold 0.5",
       "either --sparsity or --threshold"},
      {"run -m " + m + " -p hi --pattern " + fixture("patterns/Llama-2-7B-32K-Instruct").string(),
       "shape 32x32"},
      {"run -m " + m + " -p hi --pattern /no/such/pattern", "/no/such/pattern"},
      {"run -m " + m + " -p hi --streaming-only --sink 0 --recent 0", "--sink + --recent >= 1"},
      {"info -m /no/such/model", "/no/such/model: model directory not found"},
  };
  for (const auto& c : cases) {
    auto r = run_duo(c.args);
    EXPECT_NE(r.exit_code, 0) << c.args;
    EXPECT_EQ(r.err.rfind("duo: error: ", 0), 0u) << c.args << "\nstderr: " << r.err;
    EXPECT_NE(r.err.find(c.fragment), std::string::npos) << c.args << "\nstderr: " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\nstderr: " << r.err;
  }
}

}  // namespace
}  // namespace duo
