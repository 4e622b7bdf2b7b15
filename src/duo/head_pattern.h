// DuoAttention head patterns: the learned per-KV-head gates (full_attention_heads.tsv +
// config.json, duoattention.md section 2), their binarisation into retrieval / streaming heads, the
// KV-byte formula of section 1 and the per-layer head permutation the engine uses (section 3).
//
// Binarisation by sparsity (binarize_by_sparsity). N = L * H_kv gates, clipped to [0,1].
//   The paper's rule is: threshold = the `sparsity` quantile (linear interpolation, numpy default)
//   of all N gates, retrieval iff gate >= threshold. On distinct gates that makes exactly
//     k = 0                      if sparsity == 0,
//     k = N                      if sparsity == 1,
//     k = ceil(sparsity * (N-1)) otherwise        (the numpy "virtual index" rounded up)
//   heads streaming. With ties (many GQA gates are exactly 1.0, negatives clip to 0) the quantile
//   rule can miss that count, and the release breaks ties with unseeded noise. We instead make
//   EXACTLY k heads streaming: sort all heads by (gate ascending, layer ascending, head ascending)
//   and the first k become streaming, the rest retrieval. Among tied gates, the lower (layer, head)
//   index therefore becomes streaming first. On distinct gates this is identical to the quantile
//   rule; k differs from round(sparsity * N) by at most one (equal for every published operating
//   point: 0.5 of 256 -> 128, 0.75 of 1024 -> 768).
// Binarisation by threshold (binarize_by_threshold): retrieval iff clipped gate >= threshold.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace duo {

struct ModelConfig;

struct HeadPattern {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  std::vector<double> gates;           // row-major num_layers x num_kv_heads, clipped to [0,1]
  std::optional<int64_t> sink_size;    // from config.json when it is an integer
  std::optional<int64_t> recent_size;  // from config.json when it is an integer
  nlohmann::json config;               // config.json as read (null when absent)
  std::filesystem::path source;        // the .tsv file the gates came from

  double gate(int64_t layer, int64_t head) const {
    return gates[static_cast<size_t>(layer * num_kv_heads + head)];
  }
};

// `p` may be the directory holding full_attention_heads.tsv, a directory with exactly one
// subdirectory holding it (the published <Model>/<run-name>/ layout), or the .tsv file itself.
// The TSV is parsed strictly (same column count on every row, finite numbers only, >= 1 row);
// gates are clipped to [0,1]. config.json next to the .tsv is optional but must be valid JSON.
// Throws duo::Error naming the file, row, column and offending text.
HeadPattern load_head_pattern(const std::filesystem::path& p);

// Writes dir/full_attention_heads.tsv ("%.18e", tab separated, one row per layer) and
// dir/config.json (pattern.config, with sink_size / recent_size set from the pattern when known).
// Creates dir if needed.
void write_head_pattern(const HeadPattern& pattern, const std::filesystem::path& dir);

// Throws duo::Error unless the pattern is num_layers x num_kv_heads of the model.
// `model_name` names the model in the message (e.g. its directory).
void validate_against(const HeadPattern& pattern, const ModelConfig& model,
                      const std::string& model_name = "");

struct HeadPartition {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  std::vector<uint8_t> retrieval;  // row-major num_layers x num_kv_heads, 1 = retrieval head

  bool is_retrieval(int64_t layer, int64_t head) const {
    return retrieval[static_cast<size_t>(layer * num_kv_heads + head)] != 0;
  }
  int64_t retrieval_count(int64_t layer) const;
  int64_t total_retrieval() const;
  double sparsity() const;  // fraction of all KV heads that are streaming
};

// Exactly k streaming heads, k as in the header comment. sparsity outside [0,1] or NaN -> Error.
HeadPartition binarize_by_sparsity(const HeadPattern& pattern, double sparsity);
// Number of streaming heads binarize_by_sparsity makes out of n heads.
int64_t streaming_head_count(int64_t n, double sparsity);
// Retrieval iff gate >= threshold. NaN threshold -> Error.
HeadPartition binarize_by_threshold(const HeadPattern& pattern, double threshold);
HeadPartition all_retrieval(int64_t num_layers, int64_t num_kv_heads);
HeadPartition all_streaming(int64_t num_layers, int64_t num_kv_heads);

// Per-layer permutation so retrieval heads form one contiguous range in front.
struct LayerHeadOrder {
  std::vector<int32_t> kv_order;  // new KV position -> original KV head: retrieval heads first
                                  // (original order), then streaming heads (original order)
  int64_t num_retrieval = 0;
  std::vector<int32_t> q_order;  // new query head -> original query head; the group of original
                                 // KV head h (query heads h*G .. h*G+G-1) moves with it
};

LayerHeadOrder layer_head_order(const HeadPartition& partition, int64_t layer, int64_t group_size);

// KV bytes of duoattention.md section 1:
//   sum_l 2 * d * b * (R_l * N + (H_kv - R_l) * min(N, S + R)).
// Negative arguments or int64 overflow -> Error.
int64_t duo_kv_bytes(const HeadPartition& partition, int64_t n_tokens, int64_t head_dim,
                     int64_t bytes_per_element, int64_t S, int64_t R);

}  // namespace duo
