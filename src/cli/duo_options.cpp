#include "cli/duo_options.h"

#include <cmath>
#include <sstream>

#include "core/error.h"

namespace duo::cli {

void DuoOptions::add_to(CLI::App* cmd) {
  cmd->add_option("--pattern", pattern,
                  "Head pattern directory (full_attention_heads.tsv + config.json)");
  cmd->add_option(
      "--sparsity", sparsity,
      "Fraction of KV heads made streaming, over all layers (default 0.5 with --pattern)");
  cmd->add_option("--threshold", threshold, "Retrieval iff gate >= T (instead of --sparsity)");
  cmd->add_option("--sink", sink,
                  "Sink tokens S of streaming heads (default: pattern config, else 64)");
  cmd->add_option("--recent", recent,
                  "Recent window R of streaming heads (default: pattern config, else 256)");
  cmd->add_option("--streaming-prefill", streaming_prefill,
                  "exact (token-exact, chunk-size invariant) or chunk (the authors' release)")
      ->check(CLI::IsMember({"exact", "chunk"}));
  cmd->add_flag("--streaming-only", streaming_only,
                "Every head streaming (the StreamingLLM baseline)");
}

ResolvedDuo resolve(const DuoOptions& o, const ModelConfig& c, const std::string& model_dir) {
  ResolvedDuo r;
  check(!(o.sparsity && o.threshold), "give either --sparsity or --threshold, not both");
  check(!(o.streaming_only && (!o.pattern.empty() || o.sparsity || o.threshold)),
        "--streaming-only makes every head streaming; it takes no --pattern, --sparsity or "
        "--threshold");
  check(o.pattern.empty() ? !(o.sparsity || o.threshold) : true,
        "--sparsity and --threshold need --pattern");
  if (o.sparsity) {
    check(std::isfinite(*o.sparsity) && *o.sparsity >= 0 && *o.sparsity <= 1,
          "--sparsity must be in [0, 1], got ", *o.sparsity);
  }
  if (o.threshold) check(std::isfinite(*o.threshold), "--threshold must be a finite number");
  if (o.sink)
    check(*o.sink >= 0 && *o.sink <= kMaxContext, "--sink must be in [0, ", kMaxContext, "], got ",
          *o.sink);
  if (o.recent)
    check(*o.recent >= 0 && *o.recent <= kMaxContext, "--recent must be in [0, ", kMaxContext,
          "], got ", *o.recent);
  r.prefill = o.streaming_prefill == "chunk" ? StreamingPrefill::kChunk : StreamingPrefill::kExact;
  r.sink = o.sink.value_or(o.default_sink);
  r.recent = o.recent.value_or(o.default_recent);
  if (!o.pattern.empty()) {
    HeadPattern p = load_head_pattern(o.pattern);
    validate_against(p, c, model_dir);
    r.sink = o.sink.value_or(p.sink_size.value_or(o.default_sink));
    r.recent = o.recent.value_or(p.recent_size.value_or(o.default_recent));
    std::ostringstream rule;
    if (o.threshold) {
      r.partition = binarize_by_threshold(p, *o.threshold);
      rule << "threshold " << *o.threshold;
    } else {
      const double s = o.sparsity.value_or(kDefaultSparsity);
      r.partition = binarize_by_sparsity(p, s);
      rule << "sparsity " << s;
    }
    r.rule = rule.str();
    r.pattern_path = p.source.string();
    r.mode = "DuoAttention";
  } else if (o.streaming_only) {
    r.partition = all_streaming(c.num_layers, c.num_kv_heads);
    r.mode = "streaming only";
  } else {
    r.partition = all_retrieval(c.num_layers, c.num_kv_heads);
    r.mode = "full attention";
  }
  if (r.partition.total_retrieval() < c.num_layers * c.num_kv_heads) {
    check(r.sink + r.recent > 0, "streaming heads need --sink + --recent >= 1");
  }
  return r;
}

std::string ResolvedDuo::describe() const {
  if (mode == "DuoAttention") return mode + ", " + pattern_path + " (" + rule + ")";
  return mode;
}

nlohmann::json ResolvedDuo::json() const {
  return {{"attention", mode},
          {"pattern", pattern_path},
          {"rule", rule},
          {"sink", sink},
          {"recent", recent},
          {"streaming_prefill", prefill == StreamingPrefill::kExact ? "exact" : "chunk"},
          {"retrieval_kv_heads", partition.total_retrieval()},
          {"sparsity", partition.sparsity()}};
}

}  // namespace duo::cli
