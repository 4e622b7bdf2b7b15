// `duo perplexity` on the GPU: the pattern model and its full-attention base are two Models on one
// CUDA backend; their perplexities, KL(full || pattern) and top-token agreement must match the CPU
// engine's on the trained MHA demo model over held-out text (bf16 on the GPU, fp32 on the CPU).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "core/file_util.h"
#include "cuda/cuda_backend.h"
#include "engine/model.h"
#include "eval/perplexity.h"
#include "tokenizer/tokenizer.h"

namespace duo {
namespace {

std::filesystem::path repo_path(const std::string& rel) {  // source tree, or the working copy
  const auto src = std::filesystem::path(DUO_SOURCE_DIR) / rel;
  return std::filesystem::exists(src) ? src : std::filesystem::path(rel);
}

TEST(CudaPerplexity, PatternAndFullModelsOnOneBackendMatchTheCpu) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto dir = repo_path("models/duo-demo-mha");
  const auto text_file = repo_path("data/haystack/austen-persuasion.txt");
  if (!std::filesystem::exists(dir / "config.json")) GTEST_SKIP() << "no " << dir;
  const ModelConfig c = ModelConfig::load(dir);
  auto tok = Tokenizer::load(dir);
  const std::vector<int32_t> text = tok->encode(read_text_file(text_file), false);
  const std::vector<int32_t> prefix = tok->encode("", true);
  HeadPartition p;  // the last two layers' KV head 2 retrieval (the demo model's retrieval heads)
  p.num_layers = c.num_layers;
  p.num_kv_heads = c.num_kv_heads;
  p.retrieval.assign(static_cast<size_t>(c.num_layers * c.num_kv_heads), 0);
  p.retrieval[static_cast<size_t>((c.num_layers - 1) * c.num_kv_heads + 2)] = 1;
  p.retrieval[static_cast<size_t>((c.num_layers - 2) * c.num_kv_heads + 2)] = 1;
  PerplexityOptions o;
  o.ctx = 2048;
  o.max_windows = 2;
  o.chunk = 700;
  o.sink = 64;
  o.recent = 256;
  const auto measure = [&](Backend& be) {
    Model test(dir, be, HeadLayout::from_partition(c, p));
    Model base(dir, be, HeadLayout::all_retrieval(c));
    return evaluate_perplexity(test, &base, text, prefix, o);
  };
  auto gpu = make_cuda_backend(0);
  auto cpu = make_cpu_backend(CpuMode::kFast);
  const PerplexityResult g = measure(*gpu), h = measure(*cpu);
  std::printf(
      "  [measured] CUDA vs CPU: NLL %.5f / %.5f, full NLL %.5f / %.5f, KL %.6f / %.6f, same top "
      "%.4f / %.4f\n",
      g.nll, h.nll, g.base_nll, h.base_nll, g.kl, h.kl, g.same_top, h.same_top);
  ASSERT_EQ(g.tokens, h.tokens);
  EXPECT_NEAR(g.nll, h.nll, 0.02);
  EXPECT_NEAR(g.base_nll, h.base_nll, 0.02);
  EXPECT_GT(h.kl, 1e-3);  // the streaming heads change the distribution measurably
  EXPECT_NEAR(g.kl, h.kl, 0.15 * h.kl + 1e-3);
  EXPECT_NEAR(g.same_top, h.same_top, 0.03);
}

}  // namespace
}  // namespace duo
