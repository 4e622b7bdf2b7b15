// Decode steps replayed from a captured CUDA graph (Model::set_decode_graphs, Backend::
// capture_decode_step) against the same steps run op by op, and greedy generation on the GPU
// against the CPU reference. Every test skips ("no CUDA device") where the driver reports no GPU.
//
//   check                                                bound
//   graph replay vs op by op: 40 steps after a 37-token   bitwise equal logits (same kernels and
//     prefill in chunks of 16, ring S=4 R=8 wrapping;     launch shapes; only where the token and
//     fixtures MHA / GQA / dynamic NTK (naive attention,  position come from differs)
//     head_dim 16) and random-weight GQA models with
//     head_dim 64 and 128 (split-KV decode kernels);
//     mixed retrieval/streaming and all-retrieval
//     layers, exact and chunk streaming modes
//   forward_greedy vs argmax of forward()'s logits         equal ids
//   argmax_rows on ties / long rows                        lowest index of the maximum
//   graph after clear(), on a second cache, alternating    bitwise equal to op by op
//     caches, after scratch growth by a longer chunk
//   generate() greedy on CUDA (graphs) vs CPU, the         identical tokens up to the first step
//     trained demo models, full and mixed pattern,         where the CPU's top-2 logit margin is
//     160 tokens                                           below 0.3 (a near tie bf16 may flip)
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>

#include "cuda/cuda_backend.h"
#include "duo/head_pattern.h"
#include "engine/generate.h"
#include "engine/model.h"

namespace duo {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

constexpr double kGreedyMargin = 0.3;

std::filesystem::path fixtures() {
  if (const char* e = std::getenv("DUO_FIXTURES")) return e;
  return std::filesystem::path(DUO_SOURCE_DIR) / "tests/fixtures";
}

// The demo models (models/ of the repository): the source tree, or the working directory (the GPU
// machine runs the tests from a copy of the repository root).
std::filesystem::path demo_model(const std::string& name) {
  const auto src = std::filesystem::path(DUO_SOURCE_DIR) / "models" / name;
  if (std::filesystem::exists(src / "config.json")) return src;
  return std::filesystem::path("models") / name;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> u(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = u(rng);
  return t;
}

// Layer l: no retrieval head (l % 3 == 0), only the last KV head (l % 3 == 1), odd heads (else).
HeadPartition mixed_partition(const ModelConfig& c) {
  HeadPartition p = all_retrieval(c.num_layers, c.num_kv_heads);
  for (int64_t l = 0; l < c.num_layers; ++l)
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      const bool r = l % 3 == 0 ? false : (l % 3 == 1 ? h == c.num_kv_heads - 1 : h % 2 == 1);
      p.retrieval[static_cast<size_t>(l * c.num_kv_heads + h)] = r ? 1 : 0;
    }
  return p;
}

// A small GQA config for random weights whose head_dim takes the fast attention kernels.
ModelConfig random_config(int64_t head_dim) {
  ModelConfig c = ModelConfig::load(fixtures() / "models/llama3_gqa");
  c.num_layers = 3;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = head_dim;
  return c;
}

// Prefills `prompt` in chunks, then one forward() per teacher-forced token; returns every decode
// step's logits, concatenated.
std::vector<float> decode_logits(Model& m, KVCache& cache, const std::vector<int32_t>& prompt,
                                 int64_t chunk, const std::vector<int32_t>& steps) {
  for (size_t p = 0; p < prompt.size(); p += static_cast<size_t>(chunk)) {
    const size_t len = std::min(static_cast<size_t>(chunk), prompt.size() - p);
    m.forward(std::span<const int32_t>(prompt.data() + p, len), cache, 0);
  }
  std::vector<float> all;
  for (const int32_t t : steps) {
    const auto l = m.forward(std::span<const int32_t>(&t, 1), cache, 1);
    all.insert(all.end(), l.begin(), l.end());
  }
  return all;
}

// Index of the first element whose bits differ (-1: none; 0 when the sizes differ).
int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return static_cast<int64_t>(i);
  return -1;
}

struct GraphCase {
  std::string name;
  ModelConfig config;
  std::filesystem::path dir;  // empty: random weights (seed 11)
};

std::vector<GraphCase> graph_cases() {
  std::vector<GraphCase> cases;
  for (const char* f : {"llama_mha_linear", "llama3_gqa", "llama_dynamic"})
    cases.push_back({f, ModelConfig::load(fixtures() / "models" / f), fixtures() / "models" / f});
  cases.push_back({"random gqa hd64", random_config(64), {}});
  cases.push_back({"random gqa hd128", random_config(128), {}});
  return cases;
}

std::unique_ptr<Model> make_model(const GraphCase& gc, Backend& b, const HeadLayout& layout) {
  if (gc.dir.empty()) return std::make_unique<Model>(gc.config, b, layout, 11);
  return std::make_unique<Model>(gc.dir, b, layout);
}

TEST(DecodeGraph, ReplayIsBitIdenticalToOpByOp) {
  SKIP_WITHOUT_GPU();
  const int64_t S = 4, R = 8, prompt_len = 37, chunk = 16, steps = 40;
  for (const GraphCase& gc : graph_cases()) {
    const ModelConfig& c = gc.config;
    struct P {
      const char* what;
      HeadPartition part;
      StreamingPrefill mode;
    };
    const std::vector<P> parts = {
        {"mixed, exact", mixed_partition(c), StreamingPrefill::kExact},
        {"mixed, chunk mode", mixed_partition(c), StreamingPrefill::kChunk},
        {"all retrieval", all_retrieval(c.num_layers, c.num_kv_heads), StreamingPrefill::kExact},
    };
    const auto prompt = random_tokens(prompt_len, c.vocab_size, 21);
    const auto toks = random_tokens(steps, c.vocab_size, 22);
    for (const P& p : parts) {
      auto gpu = make_cuda_backend(0);
      const HeadLayout layout = HeadLayout::from_partition(c, p.part);
      auto plain = make_model(gc, *gpu, layout);
      auto graphed = make_model(gc, *gpu, layout);
      plain->set_decode_graphs(false);
      ASSERT_TRUE(graphed->decode_graphs());
      auto c1 = plain->make_cache(prompt_len + steps, S, R, p.mode);
      auto c2 = graphed->make_cache(prompt_len + steps, S, R, p.mode);
      const auto want = decode_logits(*plain, *c1, prompt, chunk, toks);
      const auto got = decode_logits(*graphed, *c2, prompt, chunk, toks);
      EXPECT_EQ(c2->length(), prompt_len + steps) << gc.name << ": " << p.what;
      const int64_t diff = first_difference(got, want);
      EXPECT_EQ(diff, -1) << gc.name << ": " << p.what << ": first differing logit at step "
                          << (diff < 0 ? -1 : diff / c.vocab_size);
      std::printf("  [measured] %-18s %-18s graph vs op by op: %s over %lld steps\n",
                  gc.name.c_str(), p.what, diff < 0 ? "bitwise equal" : "DIFFERENT",
                  static_cast<long long>(steps));
    }
  }
}

TEST(DecodeGraph, GreedyOnDeviceMatchesHostArgmax) {
  SKIP_WITHOUT_GPU();
  for (const GraphCase& gc : graph_cases()) {
    const ModelConfig& c = gc.config;
    auto gpu = make_cuda_backend(0);
    const HeadLayout layout = HeadLayout::from_partition(c, mixed_partition(c));
    auto a = make_model(gc, *gpu, layout);
    auto b = make_model(gc, *gpu, layout);
    auto ca = a->make_cache(80, 4, 8, StreamingPrefill::kExact);
    auto cb = b->make_cache(80, 4, 8, StreamingPrefill::kExact);
    const auto prompt = random_tokens(29, c.vocab_size, 23);
    auto logits = a->forward(prompt, *ca, 1);
    int32_t next = b->forward_greedy(prompt, *cb);
    for (int i = 0; i < 30; ++i) {
      const int32_t host =
          static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      ASSERT_EQ(next, host) << gc.name << ": step " << i;
      logits = a->forward(std::span<const int32_t>(&host, 1), *ca, 1);
      next = b->forward_greedy(std::span<const int32_t>(&next, 1), *cb);
    }
  }
}

TEST(DecodeGraph, ArgmaxRowsTakesTheLowestIndexOfTheMaximum) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend(0);
  const int64_t cols = 128256;  // a Llama-3 vocabulary row: many columns per thread
  std::vector<float> x(static_cast<size_t>(3 * cols), -1.0f);
  x[5] = 2.0f;  // row 0: ties at 5 and 70000 -> 5
  x[70000] = 2.0f;
  x[cols + cols - 1] = 0.5f;                                  // row 1: maximum in the last column
  for (int64_t i = 0; i < cols; ++i) x[2 * cols + i] = 3.0f;  // row 2: all equal -> 0
  const Tensor t = gpu->upload(x.data(), 3, cols);
  const int32_t last = static_cast<int32_t>(cols - 1);
  EXPECT_EQ(gpu->argmax_rows(t, 0, 3), (std::vector<int32_t>{5, last, 0}));
  EXPECT_EQ(gpu->argmax_rows(t, 1, 2), (std::vector<int32_t>{last}));
  auto cpu = make_cpu_backend(CpuMode::kReference);
  const Tensor tc = cpu->upload(x.data(), 3, cols);
  EXPECT_EQ(cpu->argmax_rows(tc, 0, 3), gpu->argmax_rows(t, 0, 3));
}

TEST(DecodeGraph, RecapturesForOtherCachesAndMovedBuffers) {
  SKIP_WITHOUT_GPU();
  const GraphCase gc{"random gqa hd64", random_config(64), {}};
  const ModelConfig& c = gc.config;
  auto gpu = make_cuda_backend(0);
  const HeadLayout layout = HeadLayout::from_partition(c, mixed_partition(c));
  auto plain = make_model(gc, *gpu, layout);
  auto graphed = make_model(gc, *gpu, layout);
  plain->set_decode_graphs(false);
  const auto prompt = random_tokens(21, c.vocab_size, 31);
  const auto toks = random_tokens(12, c.vocab_size, 32);
  const int64_t S = 4, R = 8;
  auto ref_cache = plain->make_cache(40, S, R, StreamingPrefill::kExact);
  const auto want = decode_logits(*plain, *ref_cache, prompt, 8, toks);

  // Same cache twice, the second time after clear(): the graph stays valid (position from replay).
  auto c1 = graphed->make_cache(40, S, R, StreamingPrefill::kExact);
  EXPECT_EQ(first_difference(decode_logits(*graphed, *c1, prompt, 8, toks), want), -1);
  c1->clear();
  EXPECT_EQ(first_difference(decode_logits(*graphed, *c1, prompt, 8, toks), want), -1)
      << "after clear()";

  // A second cache with another capacity (another split-KV grid): captured again.
  auto c2 = graphed->make_cache(200, S, R, StreamingPrefill::kExact);
  auto ref2 = plain->make_cache(200, S, R, StreamingPrefill::kExact);
  const auto want2 = decode_logits(*plain, *ref2, prompt, 8, toks);
  EXPECT_EQ(first_difference(decode_logits(*graphed, *c2, prompt, 8, toks), want2), -1)
      << "second cache";

  // Two caches decoded alternately, with a longer prefill on a third cache in between (the
  // model's scratch tensors and the backend's attention workspace grow and move).
  c1->clear();
  c2->clear();
  for (KVCache* cc : {c1.get(), c2.get()}) graphed->forward(prompt, *cc, 0);
  std::vector<float> got1, got2;
  for (size_t i = 0; i < toks.size(); ++i) {
    const auto l1 = graphed->forward(std::span<const int32_t>(&toks[i], 1), *c1, 1);
    got1.insert(got1.end(), l1.begin(), l1.end());
    if (i == 5) {
      auto c3 = graphed->make_cache(3000, S, R, StreamingPrefill::kExact);
      graphed->forward(random_tokens(2500, c.vocab_size, 33), *c3, 1);
    }
    const auto l2 = graphed->forward(std::span<const int32_t>(&toks[i], 1), *c2, 1);
    got2.insert(got2.end(), l2.begin(), l2.end());
  }
  EXPECT_EQ(first_difference(got1, want), -1) << "alternating, cache 1";
  EXPECT_EQ(first_difference(got2, want2), -1) << "alternating, cache 2";
}

// Greedy generation (generate(): device argmax, graph replay) on the GPU vs the CPU. bf16 may flip
// a near tie, after which the sequences legitimately differ; so they must agree up to the first
// step where the CPU's top-2 margin is below kGreedyMargin.
TEST(DecodeGraph, GenerateMatchesCpuGreedyOnTheDemoModels) {
  SKIP_WITHOUT_GPU();
  for (const char* name : {"duo-demo-mha", "duo-demo-gqa"}) {
    const auto dir = demo_model(name);
    if (!std::filesystem::exists(dir / "config.json")) GTEST_SKIP() << "no " << dir;
    const ModelConfig c = ModelConfig::load(dir);
    for (const bool duo_pattern : {false, true}) {
      const HeadLayout layout = duo_pattern ? HeadLayout::from_partition(c, mixed_partition(c))
                                            : HeadLayout::all_retrieval(c);
      const int64_t S = 16, R = 64, n_prompt = 300, n_new = 160;
      const auto prompt = random_tokens(n_prompt, c.vocab_size, 41);
      auto gpu = make_cuda_backend(0);
      Model mg(dir, *gpu, layout);
      auto cg = mg.make_cache(n_prompt + n_new, S, R, StreamingPrefill::kExact);
      GenerateOptions opt;
      opt.max_new_tokens = n_new;
      opt.chunk = 128;
      const GenerateResult r = generate(mg, *cg, prompt, opt);
      ASSERT_EQ(static_cast<int64_t>(r.tokens.size()), n_new);

      auto cpu = make_cpu_backend(CpuMode::kFast);
      Model mc(dir, *cpu, layout);
      auto cc = mc.make_cache(n_prompt + n_new, S, R, StreamingPrefill::kExact);
      std::vector<float> logits = mc.forward(prompt, *cc, 1);
      int64_t same = 0;
      double margin_at_split = 0;
      for (int64_t i = 0; i < n_new; ++i) {
        const int32_t want =
            static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        if (r.tokens[static_cast<size_t>(i)] != want) {
          std::vector<float> top = logits;
          std::partial_sort(top.begin(), top.begin() + 2, top.end(), std::greater<>());
          margin_at_split = top[0] - top[1];
          break;
        }
        ++same;
        if (i + 1 < n_new) logits = mc.forward(std::span<const int32_t>(&want, 1), *cc, 1);
      }
      if (same < n_new)
        EXPECT_LT(margin_at_split, kGreedyMargin)
            << name << (duo_pattern ? " (mixed pattern)" : " (full)") << ": GPU and CPU greedy "
            << "tokens split at step " << same << " where the CPU's top-2 margin is "
            << margin_at_split;
      std::printf("  [measured] %-13s %-14s GPU (graph) vs CPU greedy: %lld/%lld tokens equal%s\n",
                  name, duo_pattern ? "mixed pattern" : "full", static_cast<long long>(same),
                  static_cast<long long>(n_new), same < n_new ? " (split at a near tie)" : "");
    }
  }
}

}  // namespace
}  // namespace duo
