// Golden parity on the committed demo models (models/duo-demo-{mha,gqa}): duo's CPU engine against
// transformers fp32 on a ~200-token NIAH prompt (tools/fixtures/make_demo_golden.py). Unlike the
// random-weight fixtures, these are trained weights: the greedy answer must be the needle sentence.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/file_util.h"
#include "engine/model.h"
#include "eval/niah.h"
#include "model/safetensors.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#include "tolerances.h"

namespace duo {
namespace {

using Param = std::tuple<std::string, CpuMode>;

struct DemoGolden {
  std::filesystem::path model_dir;
  nlohmann::json meta;
  std::unique_ptr<SafetensorsFile> logits;
};

DemoGolden load(const std::string& name) {
  const auto dir = testing::fixture("demo_models/" + name);
  return {testing::source_dir() / "models" / name, read_json_file(dir / "golden.json"),
          std::make_unique<SafetensorsFile>(dir / "golden.safetensors")};
}

class DemoModelParity : public ::testing::TestWithParam<Param> {};

TEST_P(DemoModelParity, LogitsMatchTransformers) {
  const auto [name, mode] = GetParam();
  DemoGolden g = load(name);
  auto backend = make_cpu_backend(mode);
  const ModelConfig cfg = ModelConfig::load(g.model_dir);
  Model model(g.model_dir, *backend, HeadLayout::all_retrieval(cfg));
  const std::vector<int32_t> prompt = g.meta["prompt"].get<std::vector<int32_t>>();
  const int64_t T = static_cast<int64_t>(prompt.size()), V = cfg.vocab_size;
  auto cache = model.make_cache(T, 0, 0, StreamingPrefill::kExact);
  const std::vector<float> got = model.forward(prompt, *cache, T);  // [T, V]
  ASSERT_EQ(static_cast<int64_t>(got.size()), T * V);

  // Every position: argmax, max logit and logsumexp.
  const auto& rows = g.meta["rows"];
  const auto want_argmax = rows["argmax"].get<std::vector<int32_t>>();
  const auto want_max = rows["max"].get<std::vector<double>>();
  const auto want_lse = rows["logsumexp"].get<std::vector<double>>();
  ASSERT_EQ(static_cast<int64_t>(want_argmax.size()), T);
  double worst_stats = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = &got[static_cast<size_t>(t * V)];
    const float* top = std::max_element(row, row + V);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row[v] - *top));
    const double lse = *top + std::log(sum);
    worst_stats =
        std::max({worst_stats, std::fabs(*top - want_max[t]), std::fabs(lse - want_lse[t])});
    EXPECT_EQ(top - row, want_argmax[t]) << name << " position " << t;
  }
  EXPECT_LE(worst_stats, tolerances::kLogitsVsTransformers) << name << " max / logsumexp per row";

  // The last rows in full.
  const TensorView last = g.logits->tensors().at("logits_last");
  const int64_t L = g.meta["last_rows"].get<int64_t>();
  ASSERT_EQ(last.numel(), L * V);
  std::vector<float> want(static_cast<size_t>(L * V));
  std::memcpy(want.data(), last.data, want.size() * sizeof(float));
  float worst = 0;
  for (size_t i = 0; i < want.size(); ++i)
    worst = std::max(worst, std::fabs(got[static_cast<size_t>((T - L) * V) + i] - want[i]));
  EXPECT_LE(worst, tolerances::kLogitsVsTransformers) << name << " last " << L << " rows";
  RecordProperty("max_abs_diff_last_rows", std::to_string(worst));
  RecordProperty("max_abs_diff_row_stats", std::to_string(worst_stats));
}

TEST_P(DemoModelParity, GreedyAnswerMatchesTransformers) {
  const auto [name, mode] = GetParam();
  DemoGolden g = load(name);
  auto backend = make_cpu_backend(mode);
  const ModelConfig cfg = ModelConfig::load(g.model_dir);
  Model model(g.model_dir, *backend, HeadLayout::all_retrieval(cfg));
  const std::vector<int32_t> prompt = g.meta["prompt"].get<std::vector<int32_t>>();
  const auto want = g.meta["greedy"]["continuation"].get<std::vector<int32_t>>();
  auto cache = model.make_cache(static_cast<int64_t>(prompt.size() + want.size()), 0, 0,
                                StreamingPrefill::kExact);
  std::vector<float> logits = model.forward(prompt, *cache, 1);
  std::vector<int32_t> got;
  while (got.size() < want.size()) {
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    got.push_back(next);
    if (got.size() == want.size()) break;
    logits = model.forward(std::span<const int32_t>(&next, 1), *cache, 1);
  }
  EXPECT_EQ(got, want) << name;
  // Trained weights: the answer is the needle sentence itself.
  auto tok = Tokenizer::load(g.model_dir);
  EXPECT_EQ(score_answer(tok->decode(got, true), g.meta["needle"].get<std::string>()).exact, true)
      << name << " answered '" << tok->decode(got, true) << "'";
}

// duo's tokenizer and NIAH prompt builder produce the prompt the golden was computed on.
TEST(DemoModelGolden, NiahPromptMatchesPython) {
  for (const std::string name : {"duo-demo-mha", "duo-demo-gqa"}) {
    DemoGolden g = load(name);
    auto tok = Tokenizer::load(g.model_dir);
    const std::string text =
        read_text_file(testing::source_dir() / "data/haystack/austen-persuasion.txt")
            .substr(0, 4000);
    std::vector<int32_t> hay = tok->encode(text, false);
    ASSERT_GE(hay.size(), 160u);
    hay.resize(160);  // HAY_TOKENS, needle at token 60 (tools/fixtures/make_demo_golden.py)
    const Needle n{g.meta["needle"].get<std::string>(),
                   g.meta["question"].get<std::string>(),
                   g.meta["needle"].get<std::string>(),
                   {}};
    const auto want = g.meta["prompt"].get<std::vector<int32_t>>();
    const NiahPrompt p =
        build_niah_prompt(*tok, hay, n, static_cast<int64_t>(want.size()), 60.0 / 160.0 * 100.0);
    EXPECT_EQ(p.ids, want) << name;
    EXPECT_EQ(p.needle_position, 61) << name;
  }
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  std::string n = std::get<0>(info.param);
  std::replace(n.begin(), n.end(), '-', '_');
  return n + (std::get<1>(info.param) == CpuMode::kFast ? "_fast" : "_reference");
}

INSTANTIATE_TEST_SUITE_P(DemoModels, DemoModelParity,
                         ::testing::Combine(::testing::Values("duo-demo-mha", "duo-demo-gqa"),
                                            ::testing::Values(CpuMode::kReference, CpuMode::kFast)),
                         param_name);

}  // namespace
}  // namespace duo
