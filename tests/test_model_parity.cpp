// Golden parity: duo's CPU engine on checkpoints written by transformers, compared with the logits
// and greedy continuations transformers computed (tools/fixtures/make_model_fixtures.py).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/file_util.h"
#include "engine/model.h"
#include "model/safetensors.h"
#include "test_util.h"
#include "tolerances.h"

namespace duo {
namespace {

struct Golden {
  nlohmann::json meta;
  std::unique_ptr<SafetensorsFile> logits;
};

Golden load_golden(const std::filesystem::path& dir) {
  return {read_json_file(dir / "golden.json"),
          std::make_unique<SafetensorsFile>(dir / "golden.safetensors")};
}

std::vector<float> as_floats(const TensorView& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), t.data, v.size() * 4);
  return v;
}

int32_t argmax(const float* x, int64_t n) {
  return static_cast<int32_t>(std::max_element(x, x + n) - x);
}

class ModelParity : public ::testing::TestWithParam<std::tuple<std::string, CpuMode>> {};

TEST_P(ModelParity, LogitsMatchTransformers) {
  const auto [name, mode] = GetParam();
  const auto dir = testing::fixture("models/" + name);
  Golden g = load_golden(dir);
  auto backend = make_cpu_backend(mode);
  const ModelConfig cfg = ModelConfig::load(dir);
  Model model(dir, *backend, HeadLayout::all_retrieval(cfg));
  const int64_t V = cfg.vocab_size;
  for (auto& [len, entry] : g.meta["logits"].items()) {
    std::vector<int32_t> prompt = entry["prompt"].get<std::vector<int32_t>>();
    const int64_t first_row = entry["first_row"].get<int64_t>();
    const int64_t rows = static_cast<int64_t>(prompt.size()) - first_row;
    std::vector<float> want = as_floats(g.logits->tensors().at("logits_" + len));
    ASSERT_EQ(static_cast<int64_t>(want.size()), rows * V);
    auto cache =
        model.make_cache(static_cast<int64_t>(prompt.size()), 0, 0, StreamingPrefill::kExact);
    std::vector<float> got = model.forward(prompt, *cache, rows);
    float worst = 0;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
    EXPECT_LE(worst, tolerances::kLogitsVsTransformers) << name << " prompt length " << len;
    RecordProperty("max_abs_diff_" + len, std::to_string(worst));
    for (int64_t r = 0; r < rows; ++r)
      EXPECT_EQ(argmax(&got[r * V], V), argmax(&want[r * V], V)) << name << " row " << r;
  }
}

TEST_P(ModelParity, GreedyContinuationMatchesTransformers) {
  const auto [name, mode] = GetParam();
  const auto dir = testing::fixture("models/" + name);
  Golden g = load_golden(dir);
  auto backend = make_cpu_backend(mode);
  const ModelConfig cfg = ModelConfig::load(dir);
  Model model(dir, *backend, HeadLayout::all_retrieval(cfg));
  std::vector<int32_t> prompt = g.meta["greedy"]["prompt"].get<std::vector<int32_t>>();
  std::vector<int32_t> want = g.meta["greedy"]["continuation"].get<std::vector<int32_t>>();
  auto cache = model.make_cache(static_cast<int64_t>(prompt.size() + want.size()), 0, 0,
                                StreamingPrefill::kExact);
  std::vector<float> logits = model.forward(prompt, *cache, 1);
  std::vector<int32_t> got;
  while (got.size() < want.size()) {
    int32_t next = argmax(logits.data(), cfg.vocab_size);
    got.push_back(next);
    if (got.size() == want.size()) break;
    logits = model.forward(std::span<const int32_t>(&next, 1), *cache, 1);
  }
  EXPECT_EQ(got, want) << name;
}

std::string param_name(const ::testing::TestParamInfo<std::tuple<std::string, CpuMode>>& info) {
  return std::get<0>(info.param) +
         (std::get<1>(info.param) == CpuMode::kFast ? "_fast" : "_reference");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelParity,
                         ::testing::Combine(::testing::Values("llama_mha_linear", "llama3_gqa",
                                                              "mistral_gqa", "qwen2_bias_tied",
                                                              "llama_attn_bias", "llama_dynamic",
                                                              "llama_yarn"),
                                            ::testing::Values(CpuMode::kReference, CpuMode::kFast)),
                         param_name);

}  // namespace
}  // namespace duo
