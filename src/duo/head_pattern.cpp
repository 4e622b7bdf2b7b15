#include "duo/head_pattern.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <string_view>

#include "core/error.h"
#include "core/file_util.h"
#include "model/config.h"

namespace duo {

namespace fs = std::filesystem;

namespace {

constexpr const char* kTsvName = "full_attention_heads.tsv";

fs::path resolve_tsv(const fs::path& p) {
  std::error_code ec;
  check(fs::exists(p, ec), "pattern ", p.string(), ": not found");
  if (!fs::is_directory(p, ec)) return p;
  if (fs::exists(p / kTsvName, ec)) return p / kTsvName;
  std::vector<fs::path> subdirs;
  for (const auto& e : fs::directory_iterator(p, ec)) {
    if (e.is_directory(ec)) subdirs.push_back(e.path());
  }
  check(!ec, "pattern ", p.string(), ": cannot list directory (", ec.message(), ")");
  check(!subdirs.empty(), "pattern ", p.string(), ": no ", kTsvName,
        " in this directory and no run subdirectory holding one");
  if (subdirs.size() > 1) {
    std::sort(subdirs.begin(), subdirs.end());
    std::string names;
    for (const auto& s : subdirs) names += (names.empty() ? "" : ", ") + s.filename().string();
    fail("pattern ", p.string(), ": no ", kTsvName, " here and ", subdirs.size(),
         " subdirectories (", names, "); expected exactly one — pass the run directory itself");
  }
  check(fs::exists(subdirs[0] / kTsvName, ec), "pattern ", p.string(), ": its only subdirectory ",
        subdirs[0].filename().string(), " holds no ", kTsvName);
  return subdirs[0] / kTsvName;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (true) {
    size_t pos = s.find(sep, start);
    if (pos == std::string_view::npos) {
      out.push_back(s.substr(start));
      return out;
    }
    out.push_back(s.substr(start, pos - start));
    start = pos + 1;
  }
}

std::optional<int64_t> read_window_field(const nlohmann::json& cfg, const char* key,
                                         const fs::path& path) {
  if (!cfg.is_object() || !cfg.contains(key)) return std::nullopt;
  const auto& v = cfg.at(key);
  if (!v.is_number_integer()) return std::nullopt;  // null (or a non-integer) means "not given"
  int64_t x = v.get<int64_t>();
  check(x >= 0, path.string(), ": field '", key, "': expected a non-negative integer, got ", x);
  return x;
}

}  // namespace

HeadPattern load_head_pattern(const fs::path& p) {
  HeadPattern pat;
  pat.source = resolve_tsv(p);
  const std::string where = pat.source.string();
  std::string text = read_text_file(pat.source);
  std::string_view body = text;
  if (!body.empty() && body.back() == '\n')
    body.remove_suffix(1);  // final newline ends the last row
  check(!trim(body).empty(), where, ": empty file, expected at least one row of gates");

  auto lines = split(body, '\n');
  int64_t row = 0;
  for (std::string_view raw_line : lines) {
    ++row;
    std::string_view line = trim(raw_line);
    check(!line.empty(), where, ": row ", row, " is empty");
    auto cells = split(line, '\t');
    const auto ncols = static_cast<int64_t>(cells.size());
    if (row == 1) {
      pat.num_kv_heads = ncols;
    } else {
      check(ncols == pat.num_kv_heads, where, ": row ", row, " has ", ncols,
            " tab-separated columns, expected ", pat.num_kv_heads, " (as in row 1)");
    }
    int64_t col = 0;
    for (std::string_view raw_cell : cells) {
      ++col;
      std::string cell(trim(raw_cell));
      char* end = nullptr;
      errno = 0;
      double v = cell.empty() ? 0.0 : std::strtod(cell.c_str(), &end);
      bool ok = !cell.empty() && end == cell.c_str() + cell.size();
      check(ok, where, ": row ", row, ", column ", col, ": expected a number, got '", cell, "'");
      check(std::isfinite(v), where, ": row ", row, ", column ", col,
            ": expected a finite number, got '", cell, "'");
      pat.gates.push_back(std::clamp(v, 0.0, 1.0));
    }
  }
  pat.num_layers = row;

  fs::path cfg_path = pat.source.parent_path() / "config.json";
  std::error_code ec;
  if (fs::exists(cfg_path, ec)) {
    pat.config = read_json_file(cfg_path);
    check(pat.config.is_object(), cfg_path.string(), ": expected a JSON object at the top level");
    pat.sink_size = read_window_field(pat.config, "sink_size", cfg_path);
    pat.recent_size = read_window_field(pat.config, "recent_size", cfg_path);
  }
  return pat;
}

void write_head_pattern(const HeadPattern& pattern, const fs::path& dir) {
  check(pattern.num_layers > 0 && pattern.num_kv_heads > 0 &&
            static_cast<int64_t>(pattern.gates.size()) == pattern.num_layers * pattern.num_kv_heads,
        "write_head_pattern: gates hold ", pattern.gates.size(), " values, expected ",
        pattern.num_layers, " x ", pattern.num_kv_heads);
  std::error_code ec;
  fs::create_directories(dir, ec);
  check(!ec, dir.string(), ": cannot create directory (", ec.message(), ")");
  std::string out;
  char buf[64];
  for (int64_t l = 0; l < pattern.num_layers; ++l) {
    for (int64_t h = 0; h < pattern.num_kv_heads; ++h) {
      std::snprintf(buf, sizeof buf, "%.18e", pattern.gate(l, h));
      if (h > 0) out += '\t';
      out += buf;
    }
    out += '\n';
  }
  const fs::path tsv = dir / kTsvName;
  {
    std::ofstream f(tsv, std::ios::binary);
    check(f.good(), tsv.string(), ": cannot open for writing");
    f << out;
    check(f.good(), tsv.string(), ": write failed");
  }
  nlohmann::json cfg = pattern.config.is_object() ? pattern.config : nlohmann::json::object();
  if (pattern.sink_size) cfg["sink_size"] = *pattern.sink_size;
  if (pattern.recent_size) cfg["recent_size"] = *pattern.recent_size;
  const fs::path cj = dir / "config.json";
  std::ofstream f(cj, std::ios::binary);
  check(f.good(), cj.string(), ": cannot open for writing");
  f << cfg.dump(2) << '\n';
  check(f.good(), cj.string(), ": write failed");
}

void validate_against(const HeadPattern& pattern, const ModelConfig& model,
                      const std::string& model_name) {
  if (pattern.num_layers == model.num_layers && pattern.num_kv_heads == model.num_kv_heads) return;
  fail("pattern ", pattern.source.string(), ": shape ", pattern.num_layers, "x",
       pattern.num_kv_heads, " (layers x KV heads) does not match model",
       model_name.empty() ? std::string() : " " + model_name, ": ", model.num_layers, " layers x ",
       model.num_kv_heads, " KV heads");
}

int64_t HeadPartition::retrieval_count(int64_t layer) const {
  check(layer >= 0 && layer < num_layers, "retrieval_count: layer ", layer, " out of range [0, ",
        num_layers, ")");
  int64_t c = 0;
  for (int64_t h = 0; h < num_kv_heads; ++h) c += is_retrieval(layer, h) ? 1 : 0;
  return c;
}

int64_t HeadPartition::total_retrieval() const {
  return std::count_if(retrieval.begin(), retrieval.end(), [](uint8_t r) { return r != 0; });
}

double HeadPartition::sparsity() const {
  if (retrieval.empty()) return 0.0;
  return 1.0 - static_cast<double>(total_retrieval()) / static_cast<double>(retrieval.size());
}

int64_t streaming_head_count(int64_t n, double sparsity) {
  check(!std::isnan(sparsity) && sparsity >= 0.0 && sparsity <= 1.0,
        "sparsity must be in [0, 1] (fraction of KV heads that become streaming), got ", sparsity);
  check(n >= 0, "streaming_head_count: negative head count ", n);
  if (sparsity == 0.0 || n == 0) return 0;
  if (sparsity == 1.0) return n;
  // numpy's linear quantile sits at virtual index v = sparsity * (n - 1); on distinct values
  // exactly ceil(v) of them lie strictly below it.
  const double v = sparsity * static_cast<double>(n - 1);
  return std::min<int64_t>(n, static_cast<int64_t>(std::ceil(v)));
}

HeadPartition binarize_by_sparsity(const HeadPattern& pattern, double sparsity) {
  const auto n = static_cast<int64_t>(pattern.gates.size());
  const int64_t k = streaming_head_count(n, sparsity);
  std::vector<int64_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  // Stable: equal gates keep row-major (layer, head) order.
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return pattern.gates[static_cast<size_t>(a)] < pattern.gates[static_cast<size_t>(b)];
  });
  HeadPartition part = all_retrieval(pattern.num_layers, pattern.num_kv_heads);
  for (int64_t i = 0; i < k; ++i)
    part.retrieval[static_cast<size_t>(idx[static_cast<size_t>(i)])] = 0;
  return part;
}

HeadPartition binarize_by_threshold(const HeadPattern& pattern, double threshold) {
  check(!std::isnan(threshold), "threshold must be a number, got NaN");
  HeadPartition part = all_retrieval(pattern.num_layers, pattern.num_kv_heads);
  for (size_t i = 0; i < pattern.gates.size(); ++i) {
    part.retrieval[i] = pattern.gates[i] >= threshold ? 1 : 0;
  }
  return part;
}

HeadPartition all_retrieval(int64_t num_layers, int64_t num_kv_heads) {
  check(num_layers >= 0 && num_kv_heads >= 0, "head partition: negative shape ", num_layers, "x",
        num_kv_heads);
  HeadPartition p;
  p.num_layers = num_layers;
  p.num_kv_heads = num_kv_heads;
  p.retrieval.assign(static_cast<size_t>(num_layers * num_kv_heads), 1);
  return p;
}

HeadPartition all_streaming(int64_t num_layers, int64_t num_kv_heads) {
  HeadPartition p = all_retrieval(num_layers, num_kv_heads);
  std::fill(p.retrieval.begin(), p.retrieval.end(), 0);
  return p;
}

LayerHeadOrder layer_head_order(const HeadPartition& partition, int64_t layer, int64_t group_size) {
  check(layer >= 0 && layer < partition.num_layers, "layer_head_order: layer ", layer,
        " out of range [0, ", partition.num_layers, ")");
  check(group_size >= 1, "layer_head_order: group size must be >= 1, got ", group_size);
  LayerHeadOrder o;
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t h = 0; h < partition.num_kv_heads; ++h) {
      if (partition.is_retrieval(layer, h) == (pass == 0)) {
        o.kv_order.push_back(static_cast<int32_t>(h));
      }
    }
    if (pass == 0) o.num_retrieval = static_cast<int64_t>(o.kv_order.size());
  }
  for (int32_t h : o.kv_order) {
    for (int64_t g = 0; g < group_size; ++g) {
      o.q_order.push_back(static_cast<int32_t>(h * group_size + g));
    }
  }
  return o;
}

int64_t duo_kv_bytes(const HeadPartition& partition, int64_t n_tokens, int64_t head_dim,
                     int64_t bytes_per_element, int64_t S, int64_t R) {
  check(n_tokens >= 0 && head_dim >= 0 && bytes_per_element >= 0 && S >= 0 && R >= 0,
        "duo_kv_bytes: arguments must be non-negative (tokens ", n_tokens, ", head_dim ", head_dim,
        ", bytes ", bytes_per_element, ", sink ", S, ", recent ", R, ")");
  auto overflow = [&] { fail("KV bytes for ", n_tokens, " tokens overflow a 64-bit integer"); };
  int64_t window = 0;
  if (__builtin_add_overflow(S, R, &window)) overflow();
  const int64_t stream_tokens = std::min(n_tokens, window);
  int64_t per = 0;  // 2 * d * b
  if (__builtin_mul_overflow(head_dim, bytes_per_element, &per) ||
      __builtin_mul_overflow(per, int64_t{2}, &per)) {
    overflow();
  }
  int64_t total = 0;
  for (int64_t l = 0; l < partition.num_layers; ++l) {
    const int64_t r = partition.retrieval_count(l);
    int64_t a = 0, b = 0, tokens = 0, bytes = 0;
    if (__builtin_mul_overflow(r, n_tokens, &a) ||
        __builtin_mul_overflow(partition.num_kv_heads - r, stream_tokens, &b) ||
        __builtin_add_overflow(a, b, &tokens) || __builtin_mul_overflow(tokens, per, &bytes) ||
        __builtin_add_overflow(total, bytes, &total)) {
      overflow();
    }
  }
  return total;
}

}  // namespace duo
