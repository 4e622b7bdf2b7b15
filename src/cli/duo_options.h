// The DuoAttention flags shared by `duo run`, `duo bench` and `duo niah`, and how they resolve
// against a model into a head partition and streaming window.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "duo/head_pattern.h"
#include "engine/backend.h"
#include "model/config.h"

namespace duo::cli {

// The streaming window used when neither the flags nor a pattern's config.json give one (every
// command that resolves a window starts from these).
constexpr int64_t kDefaultSink = 64;
constexpr int64_t kDefaultRecent = 256;

struct DuoOptions {
  std::string pattern;
  std::optional<double> sparsity;
  std::optional<double> threshold;
  std::optional<int64_t> sink;
  std::optional<int64_t> recent;
  std::string streaming_prefill = "exact";
  bool streaming_only = false;
  // Window used when neither the flags nor the pattern's config.json give one.
  int64_t default_sink = kDefaultSink;
  int64_t default_recent = kDefaultRecent;

  void add_to(CLI::App* cmd);
};

struct ResolvedDuo {
  HeadPartition partition;
  int64_t sink = 0;
  int64_t recent = 0;
  StreamingPrefill prefill = StreamingPrefill::kExact;
  std::string mode;  // "full attention", "DuoAttention", "streaming only"
  std::string pattern_path;
  std::string rule;              // e.g. "sparsity 0.5"
  std::string describe() const;  // "DuoAttention, <pattern> (sparsity 0.5)" etc.
  // The keys every command's --json writes about the attention: attention, pattern, rule, sink,
  // recent, streaming_prefill, retrieval_kv_heads, sparsity.
  nlohmann::json json() const;
};

constexpr double kDefaultSparsity = 0.5;

// Validates the flags (ranges, exclusive choices) and the pattern against the model.
ResolvedDuo resolve(const DuoOptions& o, const ModelConfig& c, const std::string& model_dir);

}  // namespace duo::cli
