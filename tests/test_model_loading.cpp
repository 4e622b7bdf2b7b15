// Model loading: config.json variants, safetensors parsing, and every bad input giving one clear
// duo::Error that names the file/field.
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "core/file_util.h"
#include "engine/model.h"
#include "engine/rope.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace duo {
namespace {

using testing::fixture;
using testing::TempDir;
using testing::write_file;

// Expects fn to throw duo::Error whose message contains every fragment.
template <class Fn>
void expect_error(Fn&& fn, std::initializer_list<std::string> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected duo::Error";
  } catch (const Error& e) {
    for (const auto& f : fragments)
      EXPECT_NE(std::string(e.what()).find(f), std::string::npos)
          << "message: " << e.what() << "\nmissing: " << f;
  }
}

nlohmann::json base_config() {
  return read_json_file(fixture("models/llama_mha_linear/config.json"));
}

TEST(Config, ParsesAllFixtures) {
  for (const char* name : {"llama_mha_linear", "llama3_gqa", "mistral_gqa", "qwen2_bias_tied",
                           "llama_attn_bias", "llama_dynamic", "llama_yarn"}) {
    const auto dir = fixture(std::string("models/") + name);
    ModelConfig c = ModelConfig::load(dir);
    auto golden = read_json_file(dir / "golden.json");
    EXPECT_EQ(c.parameter_count(), golden["num_parameters"].get<int64_t>()) << name;
  }
  ModelConfig q = ModelConfig::load(fixture("models/qwen2_bias_tied"));
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  EXPECT_TRUE(q.tie_word_embeddings);
  ModelConfig l3 = ModelConfig::load(fixture("models/llama3_gqa"));
  EXPECT_EQ(l3.rope.type, RopeType::kLlama3);
  EXPECT_EQ(l3.rope.original_max_position_embeddings, 64);
  EXPECT_EQ(l3.head_dim, 16);
  EXPECT_EQ(l3.group_size(), 4);
  EXPECT_EQ(l3.eos_token_ids, (std::vector<int32_t>{1020, 1021}));
  EXPECT_EQ(l3.kv_bytes_per_token(2), 2 * 2 * 2 * 16 * 2);
}

TEST(Config, LegacyRopeScalingEqualsRopeParameters) {
  // transformers 4 wrote rope_theta + rope_scaling {"type": ...}; transformers 5 rope_parameters.
  nlohmann::json v5 = read_json_file(fixture("models/llama3_gqa/config.json"));
  nlohmann::json v4 = v5;
  v4.erase("rope_parameters");
  v4["rope_theta"] = 500000.0;
  v4["rope_scaling"] = {{"type", "llama3"},
                        {"factor", 8.0},
                        {"low_freq_factor", 1.0},
                        {"high_freq_factor", 4.0},
                        {"original_max_position_embeddings", 64}};
  ModelConfig a = ModelConfig::from_json(v5, "v5"), b = ModelConfig::from_json(v4, "v4");
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_EQ(a.rope.factor, b.rope.factor);
  EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
  auto fa = compute_rope_frequencies(a, 100), fb = compute_rope_frequencies(b, 100);
  EXPECT_EQ(fa.inv_freq, fb.inv_freq);
}

TEST(Config, BadInput) {
  auto j = base_config();
  j["model_type"] = "gpt_neox";
  expect_error([&] { ModelConfig::from_json(j, "config.json"); },
               {"config.json", "model_type", "gpt_neox"});
  j = base_config();
  j.erase("hidden_size");
  expect_error([&] { ModelConfig::from_json(j, "config.json"); },
               {"config.json", "hidden_size", "missing"});
  j = base_config();
  j["num_attention_heads"] = "four";
  expect_error([&] { ModelConfig::from_json(j, "config.json"); },
               {"num_attention_heads", "integer"});
  j = base_config();
  j["num_key_value_heads"] = 3;
  expect_error([&] { ModelConfig::from_json(j, "config.json"); },
               {"multiple of num_key_value_heads"});
  j = base_config();
  j["rope_parameters"]["rope_type"] = "longrope";
  expect_error([&] { ModelConfig::from_json(j, "config.json"); }, {"rope", "longrope"});
  j = base_config();
  j["rope_parameters"]["rope_type"] = 5;  // wrong JSON type deep inside: the file is named
  expect_error([&] { ModelConfig::from_json(j, "config.json"); },
               {"config.json", "unexpected structure"});
  j = base_config();
  j["hidden_act"] = "gelu";
  expect_error([&] { ModelConfig::from_json(j, "config.json"); }, {"hidden_act", "silu"});
  // Sizes beyond any checkpoint, which used to wrap the size arithmetic (2^62 layers: a crash;
  // 2^31 heads: a hang), and values that are finite in double but not in the fp32 kernels.
  for (const char* key : {"num_hidden_layers", "num_attention_heads", "vocab_size", "hidden_size",
                          "intermediate_size", "max_position_embeddings"}) {
    j = base_config();
    j[key] = int64_t{1} << 62;
    expect_error([&] { ModelConfig::from_json(j, "config.json"); }, {key, "beyond duo's limit"});
  }
  j = base_config();
  j["rms_norm_eps"] = 1e300;
  expect_error([&] { ModelConfig::from_json(j, "config.json"); }, {"rms_norm_eps", "(0, 1)"});
  j = base_config();
  j["rope_parameters"]["rope_theta"] = 1e-300;
  expect_error([&] { ModelConfig::from_json(j, "config.json"); }, {"rope_theta", "[1, 1e30)"});
  // Scaling parameters that are each valid but give NaN frequencies (yarn with beta_fast 0).
  j = base_config();
  j["rope_parameters"] = {{"rope_type", "yarn"},
                          {"rope_theta", 10000.0},
                          {"factor", 4.0},
                          {"beta_fast", 0},
                          {"original_max_position_embeddings", 64}};
  const ModelConfig yarn = ModelConfig::from_json(j, "config.json");
  expect_error([&] { RopeState r(yarn); }, {"rope:", "frequency", "nan"});
  expect_error([] { ModelConfig::load("/nonexistent/model"); },
               {"/nonexistent/model", "not found"});
  TempDir t("cfg");
  expect_error([&] { ModelConfig::load(t.path()); }, {"config.json", "not found"});
  write_file(t / "config.json", "{\"model_type\": \"llama\", ");
  expect_error(
      [&] { ModelConfig::load(t.path()); },
      {"config.json", "invalid JSON"});  // A document nested deeper than any config (copying it
                                         // recursed until the stack overflowed).
  std::string deep = "{\"model_type\": \"llama\", \"x\": ";
  for (int i = 0; i < 20000; ++i) deep += "[";
  for (int i = 0; i < 20000; ++i) deep += "]";
  write_file(t / "config.json", deep + "}");
  expect_error([&] { ModelConfig::load(t.path()); }, {"config.json", "nested deeper than 256"});
}

// Caches the engine cannot serve exactly: beyond 2^31 tokens (the size arithmetic wrapped before),
// and beyond a Mistral sliding window, which duo does not implement (it ran full attention there
// and answered differently from the model without a word).
TEST(Model, RefusesCachesItCannotServe) {
  auto be = make_cpu_backend(CpuMode::kReference);
  const auto dir = fixture("models/mistral_gqa");
  const ModelConfig plain = ModelConfig::load(dir);
  Model m(dir, *be, HeadLayout::all_retrieval(plain));
  expect_error([&] { m.make_cache(int64_t{1} << 58, 0, 0, StreamingPrefill::kExact); },
               {"beyond duo's limit of 2147483648"});
  TempDir t("swa");
  std::filesystem::copy(
      dir, t.path(),
      std::filesystem::copy_options::recursive | std::filesystem::copy_options::overwrite_existing);
  auto j = read_json_file(dir / "config.json");
  j["sliding_window"] = 16;
  write_file(t / "config.json", j.dump());
  const ModelConfig swa = ModelConfig::load(t.path());
  Model w(t.path(), *be, HeadLayout::all_retrieval(swa));
  EXPECT_NO_THROW(w.make_cache(16, 0, 0, StreamingPrefill::kExact));
  expect_error([&] { w.make_cache(17, 0, 0, StreamingPrefill::kExact); },
               {"sliding-window attention over 16 tokens", "got 17"});
}

// A model dir whose weights we can corrupt: config of llama_mha_linear + a copy of its weights.
std::string fixture_weights() {
  return testing::read_file(fixture("models/llama_mha_linear/model.safetensors"));
}

void make_model_dir(const TempDir& t, const std::string& weights) {
  write_file(t / "config.json", testing::read_file(fixture("models/llama_mha_linear/config.json")));
  write_file(t / "model.safetensors", weights);
}

void load(const TempDir& t) {
  auto be = make_cpu_backend(CpuMode::kReference);
  ModelConfig c = ModelConfig::load(t.path());
  Model m(t.path(), *be, HeadLayout::all_retrieval(c));
}

TEST(Safetensors, LoadsIntactCopy) {
  TempDir t("st_ok");
  make_model_dir(t, fixture_weights());
  EXPECT_NO_THROW(load(t));
}

TEST(Safetensors, TruncatedFile) {
  TempDir t("st_trunc");
  std::string w = fixture_weights();
  make_model_dir(t, w.substr(0, w.size() / 2));
  expect_error([&] { load(t); }, {"model.safetensors", "outside the data section"});
  make_model_dir(t, w.substr(0, 5));
  expect_error([&] { load(t); }, {"model.safetensors", "truncated"});
}

TEST(Safetensors, CorruptHeader) {
  TempDir t("st_hdr");
  std::string w = fixture_weights();
  std::string bad = w;
  uint64_t huge = 1ull << 40;
  std::memcpy(bad.data(), &huge, 8);
  make_model_dir(t, bad);
  expect_error([&] { load(t); }, {"model.safetensors", "header length"});
  bad = w;
  bad[9] = '#';  // inside the JSON header
  make_model_dir(t, bad);
  expect_error([&] { load(t); }, {"model.safetensors", "invalid JSON"});
}

// Rewrites the header of the fixture: fn edits the JSON; data section kept.
std::string edit_header(const std::function<void(nlohmann::json&)>& fn) {
  std::string w = fixture_weights();
  uint64_t n;
  std::memcpy(&n, w.data(), 8);
  auto h = nlohmann::json::parse(w.substr(8, n));
  fn(h);
  std::string hs = h.dump();
  while (hs.size() < n) hs += ' ';  // keep the data offsets valid
  uint64_t m = hs.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &m, 8);
  return out + hs + w.substr(8 + n);
}

TEST(Safetensors, WrongShape) {
  TempDir t("st_shape");
  make_model_dir(t, edit_header([](nlohmann::json& h) {
                   auto& e = h["model.layers.0.self_attn.q_proj.weight"];
                   e["shape"] = {32, 128};  // same bytes, wrong shape
                 }));
  expect_error([&] { load(t); }, {"model.safetensors", "model.layers.0.self_attn.q_proj.weight",
                                  "expected shape [64, 64]", "got [32, 128]"});
}

TEST(Safetensors, WrongDtype) {
  TempDir t("st_dtype");
  make_model_dir(t,
                 edit_header([](nlohmann::json& h) { h["model.norm.weight"]["dtype"] = "I16"; }));
  expect_error([&] { load(t); }, {"model.norm.weight", "unsupported dtype I16"});
  make_model_dir(t,
                 edit_header([](nlohmann::json& h) { h["model.norm.weight"]["dtype"] = "F32"; }));
  expect_error([&] { load(t); }, {"model.norm.weight", "bytes"});
}

// Extra tensors are fine, but not ones whose byte count wraps 64 bits ([2^62, 4] of 0 bytes passed
// as empty) or that share bytes with another tensor.
TEST(Safetensors, OverflowingShapeAndOverlapAreErrors) {
  TempDir t("st_overflow");
  make_model_dir(t, edit_header([](nlohmann::json& h) {
                   h["extra"] = {{"dtype", "BF16"},
                                 {"shape", {int64_t{1} << 62, 4}},
                                 {"data_offsets", {0, 0}}};
                 }));
  expect_error([&] { load(t); }, {"tensor 'extra'", "does not fit in 64-bit"});
  make_model_dir(t, edit_header([](nlohmann::json& h) {
                   h["extra"] = h["model.norm.weight"];  // the same bytes under a second name
                 }));
  expect_error([&] { load(t); }, {"model.safetensors", "overlap"});
}

// A NaN or Inf weight is refused at load, naming the tensor (generation silently produced token 0
// at every step before).
TEST(Safetensors, NonFiniteWeightIsAnError) {
  TempDir t("st_nan");
  const std::string w = fixture_weights();
  uint64_t n;
  std::memcpy(&n, w.data(), 8);
  const auto h = nlohmann::json::parse(w.substr(8, n));
  const auto& e = h["model.norm.weight"];
  ASSERT_EQ(e["dtype"], "BF16");
  const size_t at = 8 + n + e["data_offsets"][0].get<size_t>() + 2 * 5;  // element 5
  for (const uint16_t bits : {uint16_t{0x7fc0}, uint16_t{0xff80}}) {     // NaN, -Inf
    std::string bad = w;
    std::memcpy(bad.data() + at, &bits, 2);
    make_model_dir(t, bad);
    expect_error([&] { load(t); }, {"model.safetensors", "model.norm.weight", "element 5"});
  }
  make_model_dir(t, w);
  EXPECT_NO_THROW(load(t));
}

TEST(Safetensors, MissingTensorAndFiles) {
  TempDir t("st_missing");
  make_model_dir(t, edit_header([](nlohmann::json& h) {
                   h["model.layers.1.mlp.up_proj.weight_renamed"] =
                       h["model.layers.1.mlp.up_proj.weight"];
                   h.erase("model.layers.1.mlp.up_proj.weight");
                 }));
  expect_error([&] { load(t); }, {"model.layers.1.mlp.up_proj.weight", "not found"});
  std::filesystem::remove(t / "model.safetensors");
  expect_error([&] { load(t); }, {"no weights found"});
  // Sharded: index names a shard that is not there.
  write_file(t / "model.safetensors.index.json",
             R"({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})");
  expect_error([&] { load(t); }, {"model-00001-of-00002.safetensors", "missing"});
}

TEST(Safetensors, ShardedCheckpointLoads) {
  WeightStore ws = WeightStore::open(fixture("models/mistral_gqa"));
  EXPECT_TRUE(ws.contains("model.norm.weight"));
  EXPECT_EQ(ws.main_dtype(), WeightDType::kF16);
}

TEST(Numerics, HalfConversions) {
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), 5.9604644775390625e-08f);  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);  // halfway, rounds to even
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3f82);  // halfway, rounds to even (up)
}

}  // namespace
}  // namespace duo
