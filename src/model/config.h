// Model hyper-parameters read from a Hugging Face config.json (llama, mistral, qwen2).
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace duo {

enum class RopeType { kDefault, kLinear, kDynamic, kLlama3, kYarn };

const char* rope_type_name(RopeType t);

// rope_scaling / rope_parameters, with transformers' defaults filled in.
struct RopeScaling {
  RopeType type = RopeType::kDefault;
  double factor = 1.0;
  // llama3
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  // llama3, yarn, dynamic: the context the base model was trained at (0 = not given).
  int64_t original_max_position_embeddings = 0;
  // yarn
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  std::optional<double> mscale;
  std::optional<double> mscale_all_dim;
  std::optional<double> attention_factor;
  bool truncate = true;
};

// Limits on config.json sizes, far above any released checkpoint; beyond them the size arithmetic
// (KV bytes, weight shapes, head orders) would overflow or exhaust memory before any check.
constexpr int64_t kMaxHidden = int64_t{1} << 17;
constexpr int64_t kMaxIntermediate = int64_t{1} << 20;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxHeads = 1024;
constexpr int64_t kMaxHeadDim = 1024;
constexpr int64_t kMaxVocab = int64_t{1} << 24;
// Longest context (KV cache capacity, max_position_embeddings) duo accepts: 2^31 tokens.
constexpr int64_t kMaxContext = int64_t{1} << 31;

struct ModelConfig {
  std::string model_type;  // "llama", "mistral" or "qwen2"
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // llama attention_bias, qwen2 always
  bool o_bias = false;    // llama attention_bias only
  bool mlp_bias = false;
  std::optional<int64_t> sliding_window;  // mistral; null on the models we target
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;
  std::string torch_dtype;  // as written ("bfloat16", "float16", "float32"), may be empty

  int64_t group_size() const { return num_heads / num_kv_heads; }  // query heads per KV head
  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // Full-attention KV bytes per token: layers * 2 (K and V) * kv_heads * head_dim * bytes.
  int64_t kv_bytes_per_token(int64_t bytes_per_element) const {
    return num_layers * 2 * num_kv_heads * head_dim * bytes_per_element;
  }
  // Parameter count implied by the shapes (embeddings counted once when tied).
  int64_t parameter_count() const;

  // Parses and validates; `source` names the file in error messages.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
  // Reads DIR/config.json.
  static ModelConfig load(const std::filesystem::path& model_dir);
};

}  // namespace duo
