// `duo perplexity`: perplexity on a text, and with --kl-divergence how far a head pattern (or
// streaming only) moves each next-token distribution from full attention.
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/backend_choice.h"
#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/duo_options.h"
#include "core/error.h"
#include "core/file_util.h"
#include "eval/perplexity.h"
#include "tokenizer/tokenizer.h"

namespace duo::cli {

namespace {

struct PerplexityArgs {
  std::string model_dir;
  std::string text;
  int64_t ctx = 4096;
  std::optional<int64_t> score_from;
  int64_t windows = 0;
  int64_t chunk = 1024;
  bool kl = false;
  std::string json_file;
  std::string backend = "auto";
  DuoOptions duo;
};

void run(const PerplexityArgs& a) {
  const ModelConfig cfg = ModelConfig::load(a.model_dir);
  const ResolvedDuo duo = resolve(a.duo, cfg, a.model_dir);
  check(!a.text.empty(), "--text PATH is required (a .txt file or a directory of them)");
  check(!a.kl || duo.mode != "full attention",
        "--kl-divergence compares a head pattern (--pattern or --streaming-only) with full "
        "attention; none was given");
  check(a.chunk > 0, "--chunk must be positive, got ", a.chunk);
  check(a.ctx <= kMaxContext, "--ctx must be at most ", kMaxContext, ", got ", a.ctx);
  auto tok = Tokenizer::load(a.model_dir);
  const std::vector<int32_t> text = tok->encode(read_text_corpus(a.text), false);
  const std::vector<int32_t> prefix = tok->encode("", true);  // BOS, where the model has one
  PerplexityOptions o;
  o.ctx = a.ctx;
  o.first_target = a.score_from.value_or(a.ctx / 2);
  o.max_windows = a.windows;
  o.chunk = a.chunk;
  o.sink = duo.sink;
  o.recent = duo.recent;
  o.prefill = duo.prefill;
  // Check the plan before loading weights, so a short text fails fast.
  const PerplexityPlan plan =
      plan_perplexity(static_cast<int64_t>(text.size()), static_cast<int64_t>(prefix.size()), o.ctx,
                      o.first_target, o.max_windows);
  if (a.ctx > cfg.max_position_embeddings)
    std::fprintf(stderr, "duo: warning: --ctx %lld exceeds max_position_embeddings %lld of %s\n",
                 static_cast<long long>(a.ctx), static_cast<long long>(cfg.max_position_embeddings),
                 a.model_dir.c_str());
  auto backend = make_backend(a.backend);
  Model model(a.model_dir, *backend, HeadLayout::from_partition(cfg, duo.partition));
  std::unique_ptr<Model> base;  // the same weights under full attention, run beside the pattern
  if (a.kl) base = std::make_unique<Model>(a.model_dir, *backend, HeadLayout::all_retrieval(cfg));
  const bool tty = stderr_is_terminal();
  const auto t0 = std::chrono::steady_clock::now();
  const auto progress = [&](int64_t done, int64_t total) {
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr,
                 tty ? "\r\033[Kperplexity: window %lld/%lld, %.1f s, ETA %.0f s"
                     : "perplexity: window %lld/%lld, %.1f s, ETA %.0f s\n",
                 static_cast<long long>(done), static_cast<long long>(total), el,
                 el / static_cast<double>(done) * static_cast<double>(total - done));
  };
  const PerplexityResult r = evaluate_perplexity(model, base.get(), text, prefix, o, progress);
  if (tty) std::fprintf(stderr, "\r\033[K");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("perplexity: %s, model %s, text %s\n", duo.describe().c_str(), a.model_dir.c_str(),
              a.text.c_str());
  std::printf("%lld windows of %lld tokens, positions %lld..%lld scored: %lld tokens (of %lld)\n",
              static_cast<long long>(plan.windows), static_cast<long long>(plan.ctx),
              static_cast<long long>(plan.first_target), static_cast<long long>(plan.ctx - 1),
              static_cast<long long>(r.tokens), static_cast<long long>(text.size()));
  std::printf("PPL %.4f  (mean NLL %.5f +/- %.5f nats/token)\n", r.perplexity(), r.nll,
              r.nll_stderr);
  if (r.compared) {
    std::printf("full attention PPL %.4f  (mean NLL %.5f +/- %.5f)\n", r.base_perplexity(),
                r.base_nll, r.base_nll_stderr);
    std::printf("KL(full || this) mean %.6f +/- %.6f, median %.6f, 99%% %.6f, max %.6f nats\n",
                r.kl, r.kl_stderr, r.kl_median, r.kl_p99, r.kl_max);
    std::printf("same top token as full attention: %.2f%% +/- %.2f%%\n", 100 * r.same_top,
                100 * r.same_top_stderr);
  }
  std::printf("%.1f s on %s\n", seconds, backend->name().c_str());
  if (a.json_file.empty()) return;
  nlohmann::json windows = nlohmann::json::array();
  for (const PerplexityWindow& w : r.windows) {
    windows.push_back({{"window", w.index}, {"nll", w.nll}});
    if (r.compared) {
      windows.back()["base_nll"] = w.base_nll;
      windows.back()["kl"] = w.kl;
      windows.back()["same_top"] = w.same_top;
    }
  }
  const auto opt = [&](double v) {
    return r.compared ? nlohmann::json(v) : nlohmann::json(nullptr);
  };
  nlohmann::json j = {{"model", a.model_dir},
                      {"text", a.text},
                      {"ctx", plan.ctx},
                      {"score_from", plan.first_target},
                      {"windows", plan.windows},
                      {"tokens_scored", r.tokens},
                      {"text_tokens", text.size()},
                      {"backend", backend->name()},
                      {"seconds", seconds},
                      {"perplexity", r.perplexity()},
                      {"nll", r.nll},
                      {"nll_stderr", r.nll_stderr},
                      {"full_perplexity", opt(r.base_perplexity())},
                      {"full_nll", opt(r.base_nll)},
                      {"kl", opt(r.kl)},
                      {"kl_stderr", opt(r.kl_stderr)},
                      {"kl_median", opt(r.kl_median)},
                      {"kl_p99", opt(r.kl_p99)},
                      {"kl_max", opt(r.kl_max)},
                      {"same_top", opt(r.same_top)},
                      {"same_top_stderr", opt(r.same_top_stderr)},
                      {"per_window", windows}};
  j.update(duo.json());
  write_json_file(a.json_file, j);
}

}  // namespace

void add_perplexity_command(CLI::App& app) {
  auto a = std::make_shared<PerplexityArgs>();
  CLI::App* cmd = app.add_subcommand(
      "perplexity",
      "Perplexity on a text; with --kl-divergence, KL and top-token agreement of a head pattern vs "
      "full attention");
  cmd->add_option("-m,--model", a->model_dir, "Hugging Face model directory")->required();
  cmd->add_option("--text", a->text, "A .txt file, or a directory of them (read in path order)")
      ->required();
  cmd->add_option("-c,--ctx", a->ctx, "Tokens per window, BOS included (default 4096)");
  cmd->add_option("--score-from", a->score_from,
                  "First scored position of each window (default ctx/2: the second half)");
  cmd->add_option("--windows", a->windows, "Windows to score at most (default 0 = all)");
  cmd->add_option(
      "--chunk", a->chunk,
      "Prefill chunk size (default 1024); the scored rows' logits of one chunk are held "
      "at once: chunk x vocab x 4 bytes per model, on the device and the host");
  cmd->add_flag("--kl-divergence", a->kl,
                "Also run full attention (a second copy of the weights) and report KL(full || "
                "pattern) and top-token agreement per scored token");
  cmd->add_option("--json", a->json_file, "Write the results (and per-window values) as JSON");
  add_backend_option(cmd, a->backend);
  a->duo.add_to(cmd);
  cmd->callback([a] { run(*a); });
}

}  // namespace duo::cli
