// `duo bench` end to end on the CPU backend (tiny fixture config, random weights), and its errors.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "test_util.h"

namespace duo {
namespace {

using testing::fixture;
using testing::run_duo;

const std::string kConfig = fixture("models/llama3_gqa/config.json").string();

TEST(CliBench, CpuRandomWeightsJson) {
  auto r = run_duo("bench --backend cpu --random-weights --config " + kConfig +
                   " --contexts 40,100 --chunk 32 --decode-steps 3 --sink 4 --recent 8 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["sparsity_realised"], 0.0);
  ASSERT_EQ(j["results"].size(), 2u);
  for (const auto& res : j["results"]) {
    EXPECT_GT(res["prefill_seconds"].get<double>(), 0.0);
    EXPECT_GT(res["decode_ms_per_token_median"].get<double>(), 0.0);
    // Full attention: KV bytes = layers * 2 * kv_heads * head_dim * 2 bytes * capacity.
    const int64_t cap = res["context"].get<int64_t>() + 5 + 3;
    EXPECT_EQ(res["cache_capacity_tokens"], cap);
    EXPECT_EQ(res["kv_bytes_total"].get<int64_t>(), 2 * 2 * 2 * 16 * 4 * cap);  // CPU stores fp32
    EXPECT_EQ(res["kv_bytes_full_attention_bf16"].get<int64_t>(), 2 * 2 * 2 * 16 * 2 * cap);
    // The like-for-like figure (the one printed): the cache's own element size.
    EXPECT_EQ(res["kv_bytes_full_attention"], res["kv_bytes_total"]);
  }
  // The printed line compares like with like: full attention's KV equals what was allocated.
  EXPECT_NE(
      r.err.find("KV 24.00 KiB (retrieval 24.00 KiB, streaming 0 B; full attention 24.00 KiB)"),
      std::string::npos)
      << r.err;
  EXPECT_NE(j["command"].get<std::string>().find("--contexts 40,100"), std::string::npos);
}

TEST(CliBench, StreamingOnlyUsesConstantCache) {
  auto r =
      run_duo("bench --backend cpu --random-weights --config " + kConfig +
              " --contexts 30,90 --decode-steps 2 --streaming-only --sink 2 --recent 6 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["sparsity_realised"], 1.0);
  EXPECT_EQ(j["results"][0]["kv_bytes_retrieval"], 0);
  EXPECT_EQ(j["results"][0]["kv_bytes_streaming"], j["results"][1]["kv_bytes_streaming"]);
}

TEST(CliBench, BadArgumentsFailClearly) {
  auto r = run_duo("bench --backend cpu --contexts 10");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("-m DIR or --random-weights"), std::string::npos) << r.err;
  r = run_duo("bench --backend cpu --random-weights --config " + kConfig + " --contexts 10,x");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--contexts"), std::string::npos) << r.err;
  r = run_duo("bench --backend tpu --random-weights --config " + kConfig + " --contexts 10");
  EXPECT_NE(r.exit_code, 0);  // rejected by the flag parser
  EXPECT_NE(r.err.find("--backend"), std::string::npos) << r.err;
  r = run_duo("bench --backend cpu --random-weights --config " + kConfig +
              " --contexts 10 --pattern " +
              fixture("patterns/Llama-3-8B-Instruct-Gradient-1048k").string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("does not match"), std::string::npos) << r.err;
}

TEST(CliBench, MalformedContextListsAndCpuSyntheticPrefixFail) {
  const std::string base = "bench --backend cpu --random-weights --config " + kConfig;
  for (const std::string& ctx :
       {std::string("10,"), std::string(",10"), std::string("10,,20"), std::string("' 10'"),
        std::string("+10"), std::string("0"), std::string("99999999999999999999")}) {
    auto r = run_duo(base + " --contexts " + ctx);
    EXPECT_EQ(r.exit_code, 1) << ctx;
    EXPECT_NE(r.err.find("--contexts"), std::string::npos) << ctx << ": " << r.err;
  }
  auto r = run_duo(base + " --contexts 40 --synthetic-prefix");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--synthetic-prefix"), std::string::npos) << r.err;
}

TEST(CliBench, CudaBackendWithoutGpuIsAClearError) {
  // On a machine with a GPU this runs the CUDA backend instead; without one (CI) it must fail
  // with one clear line and exit 1.
  auto r = run_duo("bench --backend cuda --random-weights --config " + kConfig +
                   " --contexts 20 --decode-steps 1 --json");
  if (r.exit_code == 0) GTEST_SKIP() << "a CUDA device is present";
  EXPECT_EQ(r.exit_code, 1);
  const bool clear = r.err.find("no CUDA device") != std::string::npos ||
                     r.err.find("built without CUDA") != std::string::npos;
  EXPECT_TRUE(clear) << r.err;
}

}  // namespace
}  // namespace duo
