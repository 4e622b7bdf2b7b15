// Head patterns: loading (published layout and bad input), writing, binarisation, head ordering,
// KV bytes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "duo/head_pattern.h"
#include "model/config.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;

namespace {

const fs::path kFixtures = fs::path(DUO_SOURCE_DIR) / "tests/fixtures/patterns";
const fs::path kLlama3Model = kFixtures / "Llama-3-8B-Instruct-Gradient-1048k";
const fs::path kLlama3Run = kLlama3Model / "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10";
const fs::path kLlama2Model = kFixtures / "Llama-2-7B-32K-Instruct";

// A fresh empty directory per call, removed by the destructor.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() / ("duo_pat_" + std::to_string(::getpid()) + "_" +
                                        info->name() + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary);
  f << text;
}

// Message of the duo::Error thrown by f, or "" (and a test failure) when none is thrown.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const duo::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected duo::Error";
  return "";
}

duo::HeadPattern make_pattern(int64_t L, int64_t H, std::vector<double> gates) {
  duo::HeadPattern p;
  p.num_layers = L;
  p.num_kv_heads = H;
  p.gates = std::move(gates);
  return p;
}

// numpy.quantile(..., method="linear") written out independently of the library.
double numpy_quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double idx = q * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(idx));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  const double g = idx - static_cast<double>(lo);
  return v[lo] + (v[hi] - v[lo]) * g;
}

}  // namespace

TEST(HeadPattern, LoadsPublishedLayoutThreeWays) {
  const auto a = duo::load_head_pattern(kLlama3Model);  // <Model>/ with one run subdirectory
  const auto b = duo::load_head_pattern(kLlama3Run);    // the run directory
  const auto c = duo::load_head_pattern(kLlama3Run / "full_attention_heads.tsv");
  for (const auto* p : {&a, &b, &c}) {
    EXPECT_EQ(p->num_layers, 32);
    EXPECT_EQ(p->num_kv_heads, 8);
    ASSERT_EQ(p->gates.size(), 256u);
    EXPECT_EQ(p->source.filename(), "full_attention_heads.tsv");
    EXPECT_EQ(p->sink_size, 128);
    EXPECT_EQ(p->recent_size, 256);
    EXPECT_EQ(p->config.at("seed"), 42);
  }
  EXPECT_EQ(a.gates, c.gates);
  // Row 0 of the file: 8.59375e-01 6.5234375e-01 1.0 3.3984375e-01 -9.25e-05 ...
  EXPECT_EQ(a.gate(0, 0), 0.859375);
  EXPECT_EQ(a.gate(0, 1), 0.65234375);
  EXPECT_EQ(a.gate(0, 2), 1.0);
  EXPECT_EQ(a.gate(0, 4), 0.0);  // -9.250640869140625e-05 clipped
  EXPECT_EQ(a.gate(1, 3), 1.0);
  for (double g : a.gates) {
    EXPECT_GE(g, 0.0);
    EXPECT_LE(g, 1.0);
  }
  const auto m = duo::load_head_pattern(kLlama2Model);
  EXPECT_EQ(m.num_layers, 32);
  EXPECT_EQ(m.num_kv_heads, 32);
}

TEST(HeadPattern, WriteReadRoundTrip) {
  TempDir tmp;
  const auto a = duo::load_head_pattern(kLlama3Model);
  duo::write_head_pattern(a, tmp.path / "out");
  const auto b = duo::load_head_pattern(tmp.path / "out");
  EXPECT_EQ(b.num_layers, a.num_layers);
  EXPECT_EQ(b.num_kv_heads, a.num_kv_heads);
  EXPECT_EQ(b.gates, a.gates);  // bit-exact through %.18e
  EXPECT_EQ(b.sink_size, 128);
  EXPECT_EQ(b.recent_size, 256);
  EXPECT_EQ(b.config, a.config);
  // Format: %.18e, tab separated, newline per row.
  std::ifstream f(tmp.path / "out/full_attention_heads.tsv");
  std::string line;
  std::getline(f, line);
  EXPECT_EQ(line.substr(0, 50), "8.593750000000000000e-01\t6.523437500000000000e-01\t");
  EXPECT_EQ(std::count(line.begin(), line.end(), '\t'), 7);

  // A pattern with no config gets one holding the window sizes.
  auto p = make_pattern(1, 2, {0.25, 1.0});
  p.sink_size = 4;
  p.recent_size = 8;
  duo::write_head_pattern(p, tmp.path / "small");
  const auto q = duo::load_head_pattern(tmp.path / "small/full_attention_heads.tsv");
  EXPECT_EQ(q.gates, (std::vector<double>{0.25, 1.0}));
  EXPECT_EQ(q.sink_size, 4);
  EXPECT_EQ(q.recent_size, 8);
}

TEST(HeadPattern, ConfigIsOptionalAndClipsBothWays) {
  TempDir tmp;
  write_file(tmp.path / "full_attention_heads.tsv", "1.5\t-0.25\n0.5\t2e-1\n");
  const auto p = duo::load_head_pattern(tmp.path);
  EXPECT_EQ(p.gates, (std::vector<double>{1.0, 0.0, 0.5, 0.2}));
  EXPECT_FALSE(p.sink_size.has_value());
  EXPECT_FALSE(p.recent_size.has_value());
  EXPECT_TRUE(p.config.is_null());
  // null window sizes (as deploy_* in the published files) mean "not given".
  write_file(tmp.path / "config.json", R"({"sink_size": null, "recent_size": 32})");
  const auto q = duo::load_head_pattern(tmp.path);
  EXPECT_FALSE(q.sink_size.has_value());
  EXPECT_EQ(q.recent_size, 32);
}

TEST(HeadPattern, BadInputNamesTheProblem) {
  TempDir tmp;
  auto tsv = tmp.path / "full_attention_heads.tsv";
  auto load = [&] { duo::load_head_pattern(tmp.path); };

  write_file(tsv, "0.1\t0.2\n0.3\tnan\n");
  auto msg = error_of(load);
  EXPECT_THAT(msg, HasSubstr("row 2, column 2"));
  EXPECT_THAT(msg, HasSubstr("finite"));
  EXPECT_THAT(msg, HasSubstr("'nan'"));
  EXPECT_THAT(msg, HasSubstr("full_attention_heads.tsv"));

  write_file(tsv, "0.1\tinf\n");
  EXPECT_THAT(error_of(load), HasSubstr("row 1, column 2: expected a finite number, got 'inf'"));

  write_file(tsv, "0.1\t0.2\n0.3\tabc\n");
  EXPECT_THAT(error_of(load), HasSubstr("row 2, column 2: expected a number, got 'abc'"));

  write_file(tsv, "0.1\t0.2x\n");
  EXPECT_THAT(error_of(load), HasSubstr("row 1, column 2: expected a number, got '0.2x'"));

  write_file(tsv, "0.1\t\t0.2\n");
  EXPECT_THAT(error_of(load), HasSubstr("row 1, column 2: expected a number, got ''"));

  write_file(tsv, "0.1\t0.2\t0.3\n0.4\t0.5\n");
  msg = error_of(load);
  EXPECT_THAT(msg, HasSubstr("row 2 has 2 tab-separated columns, expected 3"));

  write_file(tsv, "0.1\t0.2\n\n0.4\t0.5\n");
  EXPECT_THAT(error_of(load), HasSubstr("row 2 is empty"));

  write_file(tsv, "");
  EXPECT_THAT(error_of(load), HasSubstr("empty file"));
  write_file(tsv, "\n");
  EXPECT_THAT(error_of(load), HasSubstr("empty file"));

  write_file(tsv, "0.1\t0.2\n");
  write_file(tmp.path / "config.json", "{\"sink_size\": 12,");
  EXPECT_THAT(error_of(load), HasSubstr("invalid JSON"));
  write_file(tmp.path / "config.json", R"({"sink_size": -1, "recent_size": 256})");
  msg = error_of(load);
  EXPECT_THAT(msg, HasSubstr("config.json"));
  EXPECT_THAT(msg, HasSubstr("sink_size"));
  write_file(tmp.path / "config.json", R"({"sink_size": 1, "recent_size": -256})");
  EXPECT_THAT(error_of(load), HasSubstr("recent_size"));
}

TEST(HeadPattern, MissingOrAmbiguousPath) {
  TempDir tmp;
  EXPECT_THAT(error_of([&] { duo::load_head_pattern(tmp.path / "nope"); }), HasSubstr("not found"));
  EXPECT_THAT(error_of([&] { duo::load_head_pattern(tmp.path); }),
              HasSubstr("no full_attention_heads.tsv"));
  write_file(tmp.path / "run-a/full_attention_heads.tsv", "1\n");
  write_file(tmp.path / "run-b/full_attention_heads.tsv", "1\n");
  auto msg = error_of([&] { duo::load_head_pattern(tmp.path); });
  EXPECT_THAT(msg, HasSubstr("2 subdirectories (run-a, run-b)"));
}

TEST(HeadPattern, ValidateAgainstModel) {
  TempDir tmp;
  write_file(tmp.path / "config.json", R"({
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
    "vocab_size": 100, "max_position_embeddings": 256, "rms_norm_eps": 1e-5})");
  const auto model = duo::ModelConfig::load(tmp.path);
  const auto pat = duo::load_head_pattern(kLlama2Model);
  auto msg = error_of([&] { duo::validate_against(pat, model, tmp.path.string()); });
  EXPECT_THAT(msg, HasSubstr("shape 32x32 (layers x KV heads) does not match model " +
                             tmp.path.string() + ": 2 layers x 4 KV heads"));
  EXPECT_THAT(msg, HasSubstr("full_attention_heads.tsv"));
  const auto ok = make_pattern(2, 4, std::vector<double>(8, 0.5));
  EXPECT_NO_THROW(duo::validate_against(ok, model));
}

TEST(HeadPartition, StreamingHeadCountTable) {
  // k = 0 at 0, n at 1, else ceil(sparsity * (n - 1)); worked by hand.
  EXPECT_EQ(duo::streaming_head_count(256, 0.5), 128);    // ceil(127.5)
  EXPECT_EQ(duo::streaming_head_count(1024, 0.75), 768);  // ceil(767.25)
  EXPECT_EQ(duo::streaming_head_count(13, 0.5), 6);       // 6.0 exactly
  EXPECT_EQ(duo::streaming_head_count(10, 0.25), 3);      // ceil(2.25)
  EXPECT_EQ(duo::streaming_head_count(4, 0.1), 1);        // ceil(0.3)
  EXPECT_EQ(duo::streaming_head_count(1, 0.5), 0);
  EXPECT_EQ(duo::streaming_head_count(10, 0.0), 0);
  EXPECT_EQ(duo::streaming_head_count(10, 1.0), 10);
}

TEST(HeadPartition, Llama3At50PercentIsExactly128) {
  const auto pat = duo::load_head_pattern(kLlama3Model);
  const auto part = duo::binarize_by_sparsity(pat, 0.5);
  EXPECT_EQ(part.num_layers, 32);
  EXPECT_EQ(part.num_kv_heads, 8);
  EXPECT_EQ(part.total_retrieval(), 128);
  EXPECT_DOUBLE_EQ(part.sparsity(), 0.5);
  // Some layers keep a single retrieval head (0 and 1, by inspection of the file), layer 30 all 8.
  EXPECT_EQ(part.retrieval_count(0), 1);
  EXPECT_EQ(part.retrieval_count(1), 1);
  EXPECT_EQ(part.retrieval_count(30), 8);
  EXPECT_TRUE(part.is_retrieval(0, 2));  // the only 1.0 gate of layer 0
  EXPECT_TRUE(part.is_retrieval(1, 3));  // the only 1.0 gate of layer 1
  // Every streaming gate <= every retrieval gate.
  double max_stream = 0, min_ret = 1;
  for (int64_t i = 0; i < 256; ++i) {
    if (part.retrieval[static_cast<size_t>(i)]) {
      min_ret = std::min(min_ret, pat.gates[static_cast<size_t>(i)]);
    } else {
      max_stream = std::max(max_stream, pat.gates[static_cast<size_t>(i)]);
    }
  }
  EXPECT_LE(max_stream, min_ret);
  // Llama-2 (MHA) at the published 25% retrieval.
  const auto l2 = duo::binarize_by_sparsity(duo::load_head_pattern(kLlama2Model), 0.75);
  EXPECT_EQ(l2.total_retrieval(), 256);
}

TEST(HeadPartition, SparsityEndsAndBadValues) {
  const auto pat = duo::load_head_pattern(kLlama3Model);
  EXPECT_EQ(duo::binarize_by_sparsity(pat, 0.0).total_retrieval(), 256);
  EXPECT_EQ(duo::binarize_by_sparsity(pat, 1.0).total_retrieval(), 0);
  EXPECT_THAT(error_of([&] { duo::binarize_by_sparsity(pat, -0.1); }),
              HasSubstr("sparsity must be in [0, 1]"));
  EXPECT_THAT(error_of([&] { duo::binarize_by_sparsity(pat, 1.5); }),
              HasSubstr("sparsity must be in [0, 1]"));
  EXPECT_THAT(error_of([&] { duo::binarize_by_sparsity(pat, std::nan("")); }),
              HasSubstr("sparsity must be in [0, 1]"));
  EXPECT_THROW(duo::binarize_by_threshold(pat, std::nan("")), duo::Error);
}

TEST(HeadPartition, EqualsQuantileRuleWithoutTies) {
  // 3 x 4 distinct gates in scrambled order, and 13 distinct gates (odd count, integral indices).
  const auto p12 =
      make_pattern(3, 4, {0.55, 0.05, 0.95, 0.35, 0.15, 0.75, 0.45, 0.85, 0.25, 0.65, 0.0, 1.0});
  const auto p13 = make_pattern(
      1, 13, {0.3, 0.91, 0.12, 0.77, 0.5, 0.05, 0.66, 0.24, 0.99, 0.41, 0.58, 0.83, 0.17});
  for (const auto* p : {&p12, &p13}) {
    for (int i = 1; i < 40; ++i) {
      const double s = i / 40.0;
      const double thr = numpy_quantile(p->gates, s);
      const auto part = duo::binarize_by_sparsity(*p, s);
      for (size_t k = 0; k < p->gates.size(); ++k) {
        EXPECT_EQ(part.retrieval[k] != 0, p->gates[k] >= thr)
            << "sparsity " << s << " head " << k << " threshold " << thr;
      }
    }
    const auto half = duo::binarize_by_sparsity(*p, 0.5);
    const double thr = numpy_quantile(p->gates, 0.5);
    for (size_t k = 0; k < p->gates.size(); ++k) {
      EXPECT_EQ(half.retrieval[k] != 0, p->gates[k] >= thr);
    }
  }
}

TEST(HeadPartition, TiesBrokenByLayerThenHead) {
  // All gates 1.0, 2 x 4, sparsity 0.5: k = ceil(3.5) = 4 streaming = layer 0 entirely.
  const auto ones = make_pattern(2, 4, std::vector<double>(8, 1.0));
  auto part = duo::binarize_by_sparsity(ones, 0.5);
  EXPECT_EQ(part.retrieval, (std::vector<uint8_t>{0, 0, 0, 0, 1, 1, 1, 1}));
  // Mixed: sorted order is 0.1 (1,1), 0.2 (0,0), then the 1.0 tie in (layer, head) order:
  // (0,1), (0,2), (0,3), (1,0), ... -> with k = 4: (1,1), (0,0), (0,1), (0,2) are streaming.
  const auto mixed = make_pattern(2, 4, {0.2, 1, 1, 1, 1, 0.1, 1, 1});
  part = duo::binarize_by_sparsity(mixed, 0.5);
  EXPECT_EQ(part.retrieval, (std::vector<uint8_t>{0, 0, 0, 1, 1, 0, 1, 1}));
  // The plain quantile rule would keep 6 here (threshold 1.0): ours hits the target.
  EXPECT_EQ(part.total_retrieval(), 4);
}

TEST(HeadPartition, ThresholdAndConstantPartitions) {
  const auto p = make_pattern(2, 3, {0.2, 0.5, 0.9, 0.49, 1.0, 0.0});
  EXPECT_EQ(duo::binarize_by_threshold(p, 0.5).retrieval, (std::vector<uint8_t>{0, 1, 1, 0, 1, 0}));
  EXPECT_EQ(duo::binarize_by_threshold(p, 0.0).total_retrieval(), 6);
  EXPECT_EQ(duo::binarize_by_threshold(p, 1.5).total_retrieval(), 0);
  const auto r = duo::all_retrieval(2, 3);
  EXPECT_EQ(r.total_retrieval(), 6);
  EXPECT_EQ(r.retrieval_count(1), 3);
  EXPECT_DOUBLE_EQ(r.sparsity(), 0.0);
  const auto s = duo::all_streaming(2, 3);
  EXPECT_EQ(s.total_retrieval(), 0);
  EXPECT_DOUBLE_EQ(s.sparsity(), 1.0);
  const auto t = duo::binarize_by_threshold(p, 0.5);
  EXPECT_EQ(t.retrieval_count(0), 2);
  EXPECT_EQ(t.retrieval_count(1), 1);
  EXPECT_DOUBLE_EQ(t.sparsity(), 0.5);
}

TEST(HeadPartition, LayerHeadOrder) {
  duo::HeadPartition part;
  part.num_layers = 2;
  part.num_kv_heads = 4;
  part.retrieval = {1, 0, 1, 0, 0, 0, 0, 1};
  auto o = duo::layer_head_order(part, 0, 2);
  EXPECT_EQ(o.kv_order, (std::vector<int32_t>{0, 2, 1, 3}));
  EXPECT_EQ(o.num_retrieval, 2);
  EXPECT_EQ(o.q_order, (std::vector<int32_t>{0, 1, 4, 5, 2, 3, 6, 7}));
  o = duo::layer_head_order(part, 1, 1);
  EXPECT_EQ(o.kv_order, (std::vector<int32_t>{3, 0, 1, 2}));
  EXPECT_EQ(o.num_retrieval, 1);
  EXPECT_EQ(o.q_order, (std::vector<int32_t>{3, 0, 1, 2}));
  o = duo::layer_head_order(part, 1, 3);
  EXPECT_EQ(o.q_order, (std::vector<int32_t>{9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_THROW(duo::layer_head_order(part, 2, 1), duo::Error);
  EXPECT_THROW(duo::layer_head_order(part, 0, 0), duo::Error);
}

TEST(KvBytes, HandWorked) {
  duo::HeadPartition part;
  part.num_layers = 2;
  part.num_kv_heads = 4;
  part.retrieval = {1, 1, 0, 0, 0, 0, 0, 1};
  // N=10, d=2, b=2, S=2, R=3: window 5. Layer 0: 2*10 + 2*5 = 30 token-heads, layer 1:
  // 1*10 + 3*5 = 25; 55 * (2*2*2 = 8) = 440 bytes.
  EXPECT_EQ(duo::duo_kv_bytes(part, 10, 2, 2, 2, 3), 440);
  // N=3 < S+R: every head holds 3 tokens: 8 * 3 * 8 = 192.
  EXPECT_EQ(duo::duo_kv_bytes(part, 3, 2, 2, 2, 3), 192);
  EXPECT_EQ(duo::duo_kv_bytes(part, 0, 2, 2, 2, 3), 0);
  // Llama-3-8B full attention in bf16: 128 KiB per token -> 4 GiB at 32768 tokens.
  EXPECT_EQ(duo::duo_kv_bytes(duo::all_retrieval(32, 8), 32768, 128, 2, 128, 256),
            int64_t{4} << 30);
  // All streaming at 32768 tokens, S+R = 384: 32 * 8 * 384 * 2 * 128 * 2 = 50331648.
  EXPECT_EQ(duo::duo_kv_bytes(duo::all_streaming(32, 8), 32768, 128, 2, 128, 256), 50331648);
}

TEST(KvBytes, OverflowAndNegativeArguments) {
  const auto full = duo::all_retrieval(32, 8);
  const int64_t big = std::numeric_limits<int64_t>::max() / 4;
  EXPECT_THAT(error_of([&] { duo::duo_kv_bytes(full, big, 128, 2, 64, 256); }),
              HasSubstr("overflow"));
  EXPECT_THAT(error_of([&] { duo::duo_kv_bytes(full, 10, 128, 2, -1, 256); }),
              HasSubstr("non-negative"));
  EXPECT_THROW(duo::duo_kv_bytes(full, 10, 128, 2, 64, -1), duo::Error);
  EXPECT_THROW(duo::duo_kv_bytes(full, -10, 128, 2, 64, 256), duo::Error);
}
