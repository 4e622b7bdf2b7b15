// `duo pattern`: load a DuoAttention head pattern, binarise it and report what it means — gate
// statistics, per-layer retrieval heads and the KV-cache size at a given context.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/duo_options.h"
#include "core/error.h"
#include "duo/head_pattern.h"
#include "model/config.h"

namespace duo::cli {

namespace {

struct PatternArgs {
  std::string pattern;
  std::string model_dir;
  double sparsity = 0.5;
  double threshold = 0.5;
  int64_t context = 32768;
  int64_t sink = 0;
  int64_t recent = 0;
  int64_t head_dim = 128;
  bool json = false;
  CLI::Option* sparsity_opt = nullptr;
  CLI::Option* threshold_opt = nullptr;
  CLI::Option* sink_opt = nullptr;
  CLI::Option* recent_opt = nullptr;
  CLI::Option* head_dim_opt = nullptr;
};

constexpr int64_t kBytesPerElement = 2;  // bf16 KV cache

std::string human_bytes(int64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[64];
  if (u == 0) {
    std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(b));
  } else {
    std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  }
  return buf;
}

// "0-3,5,7" — runs of three or more as ranges; "-" when empty.
std::string compact_list(const std::vector<int64_t>& v) {
  if (v.empty()) return "-";
  std::string out;
  size_t i = 0;
  while (i < v.size()) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!out.empty()) out += ',';
    if (j - i >= 2) {
      out += std::to_string(v[i]) + "-" + std::to_string(v[j]);
    } else {
      for (size_t k = i; k <= j; ++k) out += (k > i ? "," : "") + std::to_string(v[k]);
    }
    i = j + 1;
  }
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

void run_pattern(const PatternArgs& a) {
  check(!(a.sparsity_opt->count() && a.threshold_opt->count()),
        "--sparsity and --threshold are mutually exclusive; give one");
  const bool by_threshold = a.threshold_opt->count() > 0;
  if (!by_threshold) {
    check(!std::isnan(a.sparsity) && a.sparsity >= 0.0 && a.sparsity <= 1.0,
          "--sparsity: expected a fraction in [0, 1] (share of KV heads made streaming), got ",
          a.sparsity);
  } else {
    check(std::isfinite(a.threshold), "--threshold: expected a finite number, got ", a.threshold);
  }
  check(a.context > 0, "--context: expected a positive number of tokens, got ", a.context);
  if (a.sink_opt->count()) check(a.sink >= 0, "--sink: expected >= 0 tokens, got ", a.sink);
  if (a.recent_opt->count()) {
    check(a.recent >= 0, "--recent: expected >= 0 tokens, got ", a.recent);
  }
  check(a.head_dim > 0, "--head-dim: expected a positive integer, got ", a.head_dim);

  HeadPattern pat = load_head_pattern(a.pattern);

  int64_t head_dim = a.head_dim;
  std::string head_dim_source = "default: no model given, set with --head-dim";
  std::optional<ModelConfig> model;
  if (!a.model_dir.empty()) {
    check(!a.head_dim_opt->count(), "--head-dim cannot be combined with -m/--model: the model's ",
          "config.json gives head_dim");
    model = ModelConfig::load(a.model_dir);
    validate_against(pat, *model, a.model_dir);
    head_dim = model->head_dim;
    head_dim_source = "from model " + a.model_dir;
  } else if (a.head_dim_opt->count()) {
    head_dim_source = "from --head-dim";
  }

  auto window = [](CLI::Option* opt, int64_t flag, std::optional<int64_t> cfg, int64_t def,
                   std::string& src) {
    if (opt->count()) {
      src = "flag";
      return flag;
    }
    if (cfg) {
      src = "config.json";
      return *cfg;
    }
    src = "default";
    return def;
  };
  std::string sink_src, recent_src;
  const int64_t S = window(a.sink_opt, a.sink, pat.sink_size, kDefaultSink, sink_src);
  const int64_t R = window(a.recent_opt, a.recent, pat.recent_size, kDefaultRecent, recent_src);

  const int64_t L = pat.num_layers, H = pat.num_kv_heads, N = L * H;
  HeadPartition part = by_threshold ? binarize_by_threshold(pat, a.threshold)
                                    : binarize_by_sparsity(pat, a.sparsity);
  const bool default_rule = !by_threshold && !a.sparsity_opt->count();
  std::string rule;
  if (by_threshold) {
    rule = "threshold " + fmt("%g", a.threshold) + ": retrieval iff clipped gate >= threshold";
  } else {
    rule = "sparsity " + fmt("%g", a.sparsity) + (default_rule ? " (default)" : "") + ": " +
           std::to_string(streaming_head_count(N, a.sparsity)) + " of " + std::to_string(N) +
           " KV heads streaming = lowest gates, ties by (layer, head) index";
  }

  const double gmin = *std::min_element(pat.gates.begin(), pat.gates.end());
  const double gmax = *std::max_element(pat.gates.begin(), pat.gates.end());
  const double gmed = median(pat.gates);
  const auto ones = std::count(pat.gates.begin(), pat.gates.end(), 1.0);
  const auto zeros = std::count(pat.gates.begin(), pat.gates.end(), 0.0);

  const HeadPartition full = all_retrieval(L, H);
  const int64_t full_bytes = duo_kv_bytes(full, a.context, head_dim, kBytesPerElement, S, R);
  const int64_t duo_bytes = duo_kv_bytes(part, a.context, head_dim, kBytesPerElement, S, R);
  const double ratio = duo_bytes > 0 ? static_cast<double>(full_bytes) / duo_bytes : INFINITY;

  struct LayerRow {
    int64_t count;
    std::vector<int64_t> heads;
    double mean;
  };
  std::vector<LayerRow> rows;
  for (int64_t l = 0; l < L; ++l) {
    LayerRow r{part.retrieval_count(l), {}, 0.0};
    for (int64_t h = 0; h < H; ++h) {
      if (part.is_retrieval(l, h)) r.heads.push_back(h);
      r.mean += pat.gate(l, h);
    }
    r.mean /= static_cast<double>(H);
    rows.push_back(std::move(r));
  }
  const int64_t total_r = part.total_retrieval();

  if (a.json) {
    nlohmann::json j;
    j["pattern"] = pat.source.string();
    j["shape"] = {{"layers", L}, {"kv_heads", H}};
    j["model"] = model ? nlohmann::json(a.model_dir) : nlohmann::json(nullptr);
    if (model) j["query_heads"] = model->num_heads;
    j["sink_size"] = S;
    j["sink_size_source"] = sink_src;
    j["recent_size"] = R;
    j["recent_size_source"] = recent_src;
    j["gates"] = {
        {"min", gmin}, {"median", gmed}, {"max", gmax}, {"count_one", ones}, {"count_zero", zeros}};
    if (by_threshold) {
      j["rule"] = {{"mode", "threshold"}, {"threshold", a.threshold}};
    } else {
      j["rule"] = {{"mode", "sparsity"},
                   {"sparsity", a.sparsity},
                   {"default", default_rule},
                   {"streaming_target", streaming_head_count(N, a.sparsity)},
                   {"tie_break", "lowest gate first, ties by (layer, head) index"}};
    }
    j["retrieval_heads"] = total_r;
    j["kv_heads_total"] = N;
    j["realised_sparsity"] = part.sparsity();
    nlohmann::json layers = nlohmann::json::array();
    for (int64_t l = 0; l < L; ++l) {
      const auto& r = rows[static_cast<size_t>(l)];
      layers.push_back({{"layer", l},
                        {"retrieval", r.count},
                        {"retrieval_heads", r.heads},
                        {"mean_gate", r.mean}});
    }
    j["layers"] = layers;
    j["kv_cache"] = {{"context", a.context},
                     {"head_dim", head_dim},
                     {"head_dim_source", head_dim_source},
                     {"bytes_per_element", kBytesPerElement},
                     {"full_bytes", full_bytes},
                     {"duo_bytes", duo_bytes},
                     {"ratio", duo_bytes > 0 ? nlohmann::json(ratio) : nlohmann::json(nullptr)}};
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }

  std::printf("pattern   %s\n", pat.source.string().c_str());
  if (model) {
    std::printf("shape     %lld layers x %lld KV heads (matches model %s: %lld query heads, %s)\n",
                static_cast<long long>(L), static_cast<long long>(H), a.model_dir.c_str(),
                static_cast<long long>(model->num_heads),
                model->num_heads == model->num_kv_heads ? "MHA" : "GQA");
  } else {
    std::printf("shape     %lld layers x %lld KV heads = %lld gates (no model given)\n",
                static_cast<long long>(L), static_cast<long long>(H), static_cast<long long>(N));
  }
  std::printf("window    sink %lld (%s), recent %lld (%s)\n", static_cast<long long>(S),
              sink_src.c_str(), static_cast<long long>(R), recent_src.c_str());
  std::printf(
      "gates     min %.4f  median %.4f  max %.4f  (%lld exactly 1, %lld at 0 after clipping)\n",
      gmin, gmed, gmax, static_cast<long long>(ones), static_cast<long long>(zeros));
  std::printf("rule      %s\n", rule.c_str());
  std::printf("result    %lld of %lld KV heads retrieval (%.1f%%), realised sparsity %.4f\n",
              static_cast<long long>(total_r), static_cast<long long>(N),
              100.0 * static_cast<double>(total_r) / static_cast<double>(N), part.sparsity());
  std::printf("\nlayer  retrieval  mean gate  retrieval heads\n");
  for (int64_t l = 0; l < L; ++l) {
    const auto& r = rows[static_cast<size_t>(l)];
    char frac[32];
    std::snprintf(frac, sizeof frac, "%lld/%lld", static_cast<long long>(r.count),
                  static_cast<long long>(H));
    std::printf("%5lld  %9s  %9.4f  %s\n", static_cast<long long>(l), frac, r.mean,
                compact_list(r.heads).c_str());
  }
  std::printf("\nKV cache at %lld tokens, head_dim %lld (%s), bf16 (%lld bytes/element):\n",
              static_cast<long long>(a.context), static_cast<long long>(head_dim),
              head_dim_source.c_str(), static_cast<long long>(kBytesPerElement));
  std::printf("  full attention  %12s  (%lld bytes)\n", human_bytes(full_bytes).c_str(),
              static_cast<long long>(full_bytes));
  std::printf("  DuoAttention    %12s  (%lld bytes)\n", human_bytes(duo_bytes).c_str(),
              static_cast<long long>(duo_bytes));
  if (duo_bytes > 0) {
    std::printf("  ratio           %.3fx smaller (duo / full = %.4f)\n", ratio,
                static_cast<double>(duo_bytes) / static_cast<double>(full_bytes));
  } else {
    std::printf("  ratio           n/a (DuoAttention cache is empty)\n");
  }
}

}  // namespace

void add_pattern_command(CLI::App& app) {
  auto a = std::make_shared<PatternArgs>();
  auto* cmd = app.add_subcommand(
      "pattern",
      "Inspect a DuoAttention head pattern: binarise it (default --sparsity 0.5), show per-layer "
      "retrieval heads and the KV-cache size vs full attention");
  cmd->add_option("-p,--pattern", a->pattern,
                  "Pattern: directory with full_attention_heads.tsv, its <Model>/ parent with one "
                  "run subdirectory, or the .tsv file")
      ->required();
  cmd->add_option("-m,--model", a->model_dir,
                  "Model directory (config.json): validate the pattern's shape, take head_dim");
  a->sparsity_opt = cmd->add_option(
      "--sparsity", a->sparsity,
      "Fraction of KV heads (over all layers) made streaming, in [0,1]; default 0.5");
  a->threshold_opt = cmd->add_option("--threshold", a->threshold,
                                     "Instead of --sparsity: retrieval iff gate >= threshold");
  cmd->add_option("-c,--context", a->context, "Context length in tokens for the KV size report")
      ->capture_default_str();
  a->sink_opt =
      cmd->add_option("--sink", a->sink, "Sink tokens S (default: config.json sink_size, else 64)");
  a->recent_opt = cmd->add_option("--recent", a->recent,
                                  "Recent tokens R (default: config.json recent_size, else 256)");
  a->head_dim_opt = cmd->add_option("--head-dim", a->head_dim,
                                    "Head dimension when no model is given (default 128)");
  cmd->add_flag("--json", a->json, "Print one JSON object instead of text");
  cmd->callback([a] { run_pattern(*a); });
}

}  // namespace duo::cli
