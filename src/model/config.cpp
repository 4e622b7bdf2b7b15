#include "model/config.h"

#include <cmath>

#include "core/error.h"
#include "core/file_util.h"

namespace duo {

using nlohmann::json;

const char* rope_type_name(RopeType t) {
  switch (t) {
    case RopeType::kDefault:
      return "default";
    case RopeType::kLinear:
      return "linear";
    case RopeType::kDynamic:
      return "dynamic";
    case RopeType::kLlama3:
      return "llama3";
    case RopeType::kYarn:
      return "yarn";
  }
  return "?";
}

namespace {

struct Reader {
  const json& j;
  const std::string& source;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }

  const json& get(const char* key) const {
    check(has(key), source, ": required field '", key, "' is missing");
    return j.at(key);
  }

  int64_t integer(const char* key) const {
    const json& v = get(key);
    check(v.is_number_integer(), source, ": field '", key, "': expected an integer, got ",
          v.dump());
    return v.get<int64_t>();
  }
  int64_t positive(const char* key) const {
    int64_t v = integer(key);
    check(v > 0, source, ": field '", key, "': expected a positive integer, got ", v);
    return v;
  }
  int64_t positive_or(const char* key, int64_t fallback) const {
    return has(key) ? positive(key) : fallback;
  }
  // A positive integer no larger than `limit`: sizes beyond any real checkpoint would only
  // overflow the size arithmetic downstream.
  int64_t bounded(const char* key, int64_t limit) const {
    const int64_t v = positive(key);
    check(v <= limit, source, ": field '", key, "': ", v, " is beyond duo's limit of ", limit);
    return v;
  }
  int64_t bounded_or(const char* key, int64_t fallback, int64_t limit) const {
    return has(key) ? bounded(key, limit) : fallback;
  }
  double number(const char* key) const {
    const json& v = get(key);
    check(v.is_number(), source, ": field '", key, "': expected a number, got ", v.dump());
    double d = v.get<double>();
    check(std::isfinite(d), source, ": field '", key, "': expected a finite number");
    return d;
  }
  double number_or(const char* key, double fallback) const {
    return has(key) ? number(key) : fallback;
  }
  bool boolean_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    check(v.is_boolean(), source, ": field '", key, "': expected true or false, got ", v.dump());
    return v.get<bool>();
  }
};

RopeType parse_rope_type(const std::string& s, const std::string& where) {
  if (s == "default") return RopeType::kDefault;
  if (s == "linear") return RopeType::kLinear;
  if (s == "dynamic") return RopeType::kDynamic;
  if (s == "llama3") return RopeType::kLlama3;
  if (s == "yarn") return RopeType::kYarn;
  fail(where, ": unsupported rope type '", s,
       "' (expected default, linear, dynamic, llama3 or yarn)");
}

// rope_scaling (transformers 4) or rope_parameters (transformers 5) into RopeScaling.
RopeScaling parse_rope(const json& r, const std::string& where, int64_t max_pos) {
  RopeScaling rs;
  check(r.is_object(), where, ": expected an object, got ", r.dump());
  Reader rd{r, where};
  std::string type = "default";
  if (rd.has("rope_type")) {
    type = r.at("rope_type").get<std::string>();
  } else if (rd.has("type")) {
    type = r.at("type").get<std::string>();
  }
  rs.type = parse_rope_type(type, where);
  if (rs.type == RopeType::kDefault) return rs;
  rs.factor = rd.number("factor");
  check(rs.factor > 0, where, ": field 'factor': expected > 0, got ", rs.factor);
  rs.original_max_position_embeddings = rd.has("original_max_position_embeddings")
                                            ? rd.positive("original_max_position_embeddings")
                                            : 0;
  if (rs.type == RopeType::kLlama3) {
    rs.low_freq_factor = rd.number("low_freq_factor");
    rs.high_freq_factor = rd.number("high_freq_factor");
    check(rs.original_max_position_embeddings > 0, where,
          ": llama3 rope scaling needs 'original_max_position_embeddings'");
    check(rs.high_freq_factor != rs.low_freq_factor, where,
          ": llama3 rope scaling needs high_freq_factor != low_freq_factor");
  }
  if (rs.type == RopeType::kYarn) {
    rs.beta_fast = rd.number_or("beta_fast", 32.0);
    rs.beta_slow = rd.number_or("beta_slow", 1.0);
    if (rd.has("mscale")) rs.mscale = rd.number("mscale");
    if (rd.has("mscale_all_dim")) rs.mscale_all_dim = rd.number("mscale_all_dim");
    if (rd.has("attention_factor")) rs.attention_factor = rd.number("attention_factor");
    rs.truncate = rd.boolean_or("truncate", true);
    if (rs.original_max_position_embeddings == 0) rs.original_max_position_embeddings = max_pos;
  }
  if (rs.type == RopeType::kDynamic && rs.original_max_position_embeddings == 0) {
    rs.original_max_position_embeddings = max_pos;
  }
  return rs;
}

std::vector<int32_t> token_id_list(const json& v, const std::string& where) {
  std::vector<int32_t> out;
  if (v.is_null()) return out;
  if (v.is_number_integer()) {
    out.push_back(v.get<int32_t>());
    return out;
  }
  check(v.is_array(), where, ": expected an integer or a list of integers, got ", v.dump());
  for (const json& e : v) {
    check(e.is_number_integer(), where, ": expected integers in the list, got ", e.dump());
    out.push_back(e.get<int32_t>());
  }
  return out;
}

}  // namespace

int64_t ModelConfig::parameter_count() const {
  int64_t attn = hidden_size * q_dim() + 2 * hidden_size * kv_dim() + q_dim() * hidden_size;
  if (qkv_bias) attn += q_dim() + 2 * kv_dim();
  if (o_bias) attn += hidden_size;
  int64_t mlp = 3 * hidden_size * intermediate_size;
  if (mlp_bias) mlp += 2 * intermediate_size + hidden_size;
  int64_t per_layer = attn + mlp + 2 * hidden_size;
  int64_t emb = vocab_size * hidden_size;
  return num_layers * per_layer + hidden_size + emb * (tie_word_embeddings ? 1 : 2);
}

namespace {

ModelConfig parse_config(const json& j, const std::string& source) {
  check(j.is_object(), source, ": expected a JSON object at the top level");
  Reader rd{j, source};
  ModelConfig c;
  c.model_type = rd.get("model_type").is_string() ? j.at("model_type").get<std::string>() : "";
  check(c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2", source,
        ": unsupported model_type '", c.model_type, "' (expected llama, mistral or qwen2)");
  c.hidden_size = rd.bounded("hidden_size", kMaxHidden);
  c.intermediate_size = rd.bounded("intermediate_size", kMaxIntermediate);
  c.num_layers = rd.bounded("num_hidden_layers", kMaxLayers);
  c.num_heads = rd.bounded("num_attention_heads", kMaxHeads);
  c.num_kv_heads = rd.bounded_or("num_key_value_heads", c.num_heads, kMaxHeads);
  check(c.num_heads % c.num_kv_heads == 0, source, ": num_attention_heads (", c.num_heads,
        ") must be a multiple of num_key_value_heads (", c.num_kv_heads, ")");
  if (rd.has("head_dim")) {
    c.head_dim = rd.bounded("head_dim", kMaxHeadDim);
  } else {
    check(c.hidden_size % c.num_heads == 0, source, ": hidden_size (", c.hidden_size,
          ") is not divisible by num_attention_heads (", c.num_heads,
          ") and head_dim is not given");
    c.head_dim = c.hidden_size / c.num_heads;
    check(c.head_dim <= kMaxHeadDim, source, ": head_dim ", c.head_dim,
          " (hidden_size / num_attention_heads) is beyond duo's limit of ", kMaxHeadDim);
  }
  check(c.head_dim % 2 == 0, source, ": head_dim must be even for RoPE, got ", c.head_dim);
  c.vocab_size = rd.bounded("vocab_size", kMaxVocab);
  c.max_position_embeddings = rd.bounded("max_position_embeddings", kMaxContext);
  c.rms_norm_eps = rd.number("rms_norm_eps");
  // The kernels use it in fp32, where 1e300 would be inf (and every output uniform).
  check(c.rms_norm_eps > 0 && c.rms_norm_eps < 1, source,
        ": field 'rms_norm_eps': expected a number in (0, 1), got ", c.rms_norm_eps);

  // transformers 5 writes rope_parameters (with rope_theta inside); older files rope_theta +
  // rope_scaling. Accept both; rope_parameters wins when both are present.
  if (rd.has("rope_parameters")) {
    const json& rp = j.at("rope_parameters");
    std::string where = source + ": rope_parameters";
    check(rp.is_object(), where, ": expected an object");
    Reader rr{rp, where};
    c.rope_theta =
        rr.has("rope_theta") ? rr.number("rope_theta") : rd.number_or("rope_theta", 10000.0);
    c.rope = parse_rope(rp, where, c.max_position_embeddings);
  } else {
    c.rope_theta = rd.number_or("rope_theta", 10000.0);
    if (rd.has("rope_scaling")) {
      c.rope =
          parse_rope(j.at("rope_scaling"), source + ": rope_scaling", c.max_position_embeddings);
    }
  }
  check(c.rope_theta >= 1 && c.rope_theta < 1e30, source, ": rope_theta must be in [1, 1e30), got ",
        c.rope_theta);

  c.tie_word_embeddings = rd.boolean_or("tie_word_embeddings", false);
  if (c.model_type == "qwen2") {
    c.qkv_bias = true;
    check(!rd.boolean_or("use_sliding_window", false), source,
          ": use_sliding_window=true is not supported");
  } else if (c.model_type == "llama") {
    c.qkv_bias = c.o_bias = rd.boolean_or("attention_bias", false);
    c.mlp_bias = rd.boolean_or("mlp_bias", false);
  }
  if (c.model_type == "mistral" && rd.has("sliding_window")) {
    c.sliding_window = rd.bounded("sliding_window", kMaxContext);
  }
  if (rd.has("hidden_act")) {
    std::string act = j.at("hidden_act").is_string() ? j.at("hidden_act").get<std::string>() : "";
    check(act == "silu", source, ": field 'hidden_act': only 'silu' is supported, got ",
          j.at("hidden_act").dump());
  }
  if (rd.has("bos_token_id")) {
    auto ids = token_id_list(j.at("bos_token_id"), source + ": field 'bos_token_id'");
    if (!ids.empty()) c.bos_token_id = ids.front();
  }
  if (rd.has("eos_token_id")) {
    c.eos_token_ids = token_id_list(j.at("eos_token_id"), source + ": field 'eos_token_id'");
  }
  if (rd.has("torch_dtype") && j.at("torch_dtype").is_string()) {
    c.torch_dtype = j.at("torch_dtype").get<std::string>();
  } else if (rd.has("dtype") && j.at("dtype").is_string()) {
    c.torch_dtype = j.at("dtype").get<std::string>();
  }
  return c;
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& source) {
  try {
    return parse_config(j, source);
  } catch (const nlohmann::json::exception& e) {  // a nested field of the wrong JSON type
    fail(source, ": unexpected structure (", e.what(), ")");
  }
}

ModelConfig ModelConfig::load(const std::filesystem::path& model_dir) {
  std::error_code ec;
  check(std::filesystem::is_directory(model_dir, ec), model_dir.string(),
        ": model directory not found");
  auto path = model_dir / "config.json";
  return from_json(read_json_file(path), path.string());
}

}  // namespace duo
