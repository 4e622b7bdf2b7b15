// `duo pattern` end to end: runs the built binary, checks exit code, stdout and stderr.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace fs = std::filesystem;
using ::testing::HasSubstr;

namespace {

const fs::path kFixtures = fs::path(DUO_SOURCE_DIR) / "tests/fixtures/patterns";
const std::string kLlama3 = (kFixtures / "Llama-3-8B-Instruct-Gradient-1048k").string();
const std::string kLlama2 = (kFixtures / "Llama-2-7B-32K-Instruct").string();

struct Result {
  int rc = -1;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

class CliPattern : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    tmp_ = fs::temp_directory_path() /
           ("duo_cli_pat_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(tmp_);
    fs::create_directories(tmp_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }

  Result run(const std::string& args) {
    const auto out = tmp_ / "stdout", err = tmp_ / "stderr";
    std::string cmd = quote(DUO_BINARY) + " pattern " + args + " >" + quote(out.string()) + " 2>" +
                      quote(err.string());
    int status = std::system(cmd.c_str());
    Result r;
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = slurp(out);
    r.err = slurp(err);
    return r;
  }

  // A model directory with the given shape.
  std::string model(int layers, int heads, int kv_heads, int hidden) {
    const auto dir = tmp_ / ("model_" + std::to_string(layers) + "x" + std::to_string(kv_heads));
    fs::create_directories(dir);
    std::ofstream(dir / "config.json") << nlohmann::json{
        {"model_type", "llama"},
        {"hidden_size", hidden},
        {"intermediate_size", 4 * hidden},
        {"num_hidden_layers", layers},
        {"num_attention_heads", heads},
        {"num_key_value_heads", kv_heads},
        {"vocab_size", 1000},
        {"max_position_embeddings", 4096},
        {"rms_norm_eps", 1e-5}}.dump();
    return dir.string();
  }

  fs::path tmp_;
};

}  // namespace

TEST_F(CliPattern, Llama3At50Percent) {
  auto r = run("--pattern " + quote(kLlama3) + " --sparsity 0.5");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.err, "");
  EXPECT_THAT(r.out, HasSubstr("32 layers x 8 KV heads"));
  EXPECT_THAT(r.out, HasSubstr("sink 128 (config.json), recent 256 (config.json)"));
  EXPECT_THAT(r.out, HasSubstr("128 of 256 KV heads retrieval (50.0%)"));
  EXPECT_THAT(r.out, HasSubstr("    0        1/8"));    // layer 0 keeps one retrieval head
  EXPECT_THAT(r.out, HasSubstr("   30        8/8"));    // layer 30 keeps all
  EXPECT_THAT(r.out, HasSubstr("(4294967296 bytes)"));  // full attention at 32768 tokens
  EXPECT_THAT(r.out, HasSubstr("head_dim 128"));
  EXPECT_THAT(r.out, HasSubstr("no model given"));
}

TEST_F(CliPattern, DefaultRuleIsHalfSparsity) {
  auto r = run("-p " + quote(kLlama3));
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("sparsity 0.5 (default)"));
  EXPECT_THAT(r.out, HasSubstr("128 of 256 KV heads retrieval"));
}

TEST_F(CliPattern, JsonOutput) {
  auto r = run("-p " + quote(kLlama3) + " --json -c 65536 --sink 64 --recent 128");
  ASSERT_EQ(r.rc, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["shape"]["layers"], 32);
  EXPECT_EQ(j["shape"]["kv_heads"], 8);
  EXPECT_EQ(j["retrieval_heads"], 128);
  EXPECT_EQ(j["realised_sparsity"], 0.5);
  EXPECT_EQ(j["sink_size"], 64);
  EXPECT_EQ(j["sink_size_source"], "flag");
  EXPECT_EQ(j["recent_size"], 128);
  ASSERT_EQ(j["layers"].size(), 32u);
  EXPECT_EQ(j["layers"][0]["retrieval"], 1);
  EXPECT_EQ(j["layers"][0]["retrieval_heads"], nlohmann::json::array({2}));
  EXPECT_EQ(j["kv_cache"]["context"], 65536);
  EXPECT_EQ(j["kv_cache"]["full_bytes"], int64_t{8} << 30);
  // 128 retrieval heads * 65536 + 128 streaming heads * 192, times 2 * 128 * 2 bytes.
  EXPECT_EQ(j["kv_cache"]["duo_bytes"], (int64_t{128} * 65536 + 128 * 192) * 512);
}

TEST_F(CliPattern, ThresholdMode) {
  auto r = run("-p " + quote(kLlama3) + " --threshold 1.0 --json");
  ASSERT_EQ(r.rc, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["rule"]["mode"], "threshold");
  EXPECT_EQ(j["retrieval_heads"], 82);  // the gates exactly 1.0 in the file
}

TEST_F(CliPattern, MhaPatternAt25PercentRetrieval) {
  auto r = run("-p " + quote(kLlama2) + " --sparsity 0.75");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("256 of 1024 KV heads retrieval (25.0%)"));
}

TEST_F(CliPattern, ModelShapeMatchesAndGivesHeadDim) {
  auto m = model(32, 32, 8, 2048);  // head_dim 64
  auto r = run("-p " + quote(kLlama3) + " -m " + quote(m));
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("matches model"));
  EXPECT_THAT(r.out, HasSubstr("head_dim 64 (from model"));
  EXPECT_THAT(r.out, HasSubstr("(2147483648 bytes)"));  // 4 GiB / 2
}

TEST_F(CliPattern, WrongModelShapeFails) {
  auto m = model(2, 8, 4, 64);
  auto r = run("-p " + quote(kLlama2) + " -m " + quote(m));
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("duo: error: pattern "));
  EXPECT_THAT(r.err, HasSubstr("shape 32x32 (layers x KV heads) does not match model " + m +
                               ": 2 layers x 4 KV heads"));
}

TEST_F(CliPattern, BadArguments) {
  const std::string p = "-p " + quote(kLlama3);
  struct Case {
    std::string args, message;
  };
  const Case cases[] = {
      {p + " --sparsity -0.1", "--sparsity: expected a fraction in [0, 1]"},
      {p + " --sparsity=1.5", "--sparsity: expected a fraction in [0, 1]"},
      {p + " --sparsity 0.5 --threshold 0.5", "mutually exclusive"},
      {p + " --sink -1", "--sink: expected >= 0"},
      {p + " --recent=-5", "--recent: expected >= 0"},
      {p + " -c 0", "--context: expected a positive"},
      {p + " -c -5", "--context: expected a positive"},
      {p + " --head-dim 0", "--head-dim"},
      {"-p " + quote((tmp_ / "missing").string()), "not found"},
  };
  for (const auto& c : cases) {
    auto r = run(c.args);
    EXPECT_EQ(r.rc, 1) << c.args;
    EXPECT_THAT(r.err, HasSubstr("duo: error: ")) << c.args;
    EXPECT_THAT(r.err, HasSubstr(c.message)) << c.args;
  }
}

TEST_F(CliPattern, BadPatternFiles) {
  const auto dir = tmp_ / "pat";
  fs::create_directories(dir);
  std::ofstream(dir / "full_attention_heads.tsv") << "0.5\t0.5\n0.5\tNaN\n";
  auto r = run("-p " + quote(dir.string()));
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("row 2, column 2: expected a finite number, got 'NaN'"));
  std::ofstream(dir / "full_attention_heads.tsv") << "0.5\t0.5\n0.5\n";
  r = run("-p " + quote(dir.string()));
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("row 2 has 1 tab-separated columns, expected 2"));
}

TEST_F(CliPattern, DefaultWindowWithoutConfig) {
  const auto dir = tmp_ / "pat";
  fs::create_directories(dir);
  std::ofstream(dir / "full_attention_heads.tsv") << "0.1\t0.9\n0.8\t0.2\n";
  auto r = run("-p " + quote((dir / "full_attention_heads.tsv").string()) + " -c 1000");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("sink 64 (default), recent 256 (default)"));
  EXPECT_THAT(r.out, HasSubstr("2 of 4 KV heads retrieval"));
  // 2 retrieval * 1000 + 2 streaming * 320 tokens, times 2 * 128 * 2 bytes = 1351680.
  EXPECT_THAT(r.out, HasSubstr("(1351680 bytes)"));
}
