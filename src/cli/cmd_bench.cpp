// `duo bench`: efficiency protocol of duoattention.md section 5 (batch 1). For each context N: a
// cache sized for N + warm-up + decode steps; prefill of N random tokens in chunks (timed, device
// synchronised); then warm-up decode steps (not counted) and --decode-steps timed decode steps
// (median ms/token; a step is token in, greedy token out: a replayed CUDA graph unless
// --no-decode-graph, argmax on the device); peak device memory; KV bytes allocated (retrieval /
// streaming); realised sparsity. --synthetic-prefix replaces all but the last prefill chunk by
// random K/V written into the cache, so decode at contexts whose full prefill would take minutes
// can be timed. Progress on stderr; --json prints one JSON object on stdout.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "cli/backend_choice.h"
#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/duo_options.h"
#include "cli/int_list.h"
#include "core/error.h"
#include "core/file_util.h"
#include "duo/head_pattern.h"
#include "engine/model.h"
#include "model/config.h"

namespace duo::cli {

namespace {

struct BenchArgs {
  std::string model_dir;
  bool random_weights = false;
  std::string config_file;
  DuoOptions duo;
  std::string contexts = "20000";
  int64_t chunk = 32768;
  int64_t decode_steps = 100;
  int64_t warmup_steps = 5;
  std::string backend = "auto";
  uint64_t seed = 0;
  bool json = false;
  bool synthetic_prefix = false;
  bool no_decode_graph = false;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

void run_bench(const BenchArgs& a) {
  using clock = std::chrono::steady_clock;
  check(a.model_dir.empty() != !a.random_weights,
        "give either -m DIR or --random-weights --config FILE");
  check(!a.random_weights || !a.config_file.empty(), "--random-weights needs --config FILE");
  check(a.chunk > 0, "--chunk must be positive, got ", a.chunk);
  constexpr int64_t kMaxSteps = 1000000;
  check(a.decode_steps >= 1 && a.decode_steps <= kMaxSteps, "--decode-steps must be in [1, ",
        kMaxSteps, "], got ", a.decode_steps);
  check(a.warmup_steps >= 0 && a.warmup_steps <= kMaxSteps, "--warmup-steps must be in [0, ",
        kMaxSteps, "], got ", a.warmup_steps);
  const std::vector<int64_t> contexts = parse_positive_int_list("--contexts", a.contexts);
  for (const int64_t N : contexts)
    check(N <= kMaxContext, "--contexts: ", N, " is beyond duo's limit of ", kMaxContext,
          " tokens");

  const ModelConfig cfg = a.random_weights
                              ? ModelConfig::from_json(read_json_file(a.config_file), a.config_file)
                              : ModelConfig::load(a.model_dir);

  const ResolvedDuo duo = resolve(a.duo, cfg, a.random_weights ? a.config_file : a.model_dir);
  const HeadPartition& part = duo.partition;
  const std::string pattern_desc = duo.describe();
  const int64_t sink = duo.sink, recent = duo.recent;
  const HeadLayout layout = HeadLayout::from_partition(cfg, part);

  const std::string resolved = resolve_backend(a.backend);
  check(!a.synthetic_prefix || resolved == "cuda",
        "--synthetic-prefix writes random K/V into a device cache: it needs --backend cuda");
  auto backend = make_backend(resolved);
  const std::string card = device_name(resolved);
  std::fprintf(stderr, "duo bench: %s on %s; %s; S=%lld R=%lld; realised sparsity %.4f\n",
               cfg.model_type.c_str(), card.c_str(), pattern_desc.c_str(),
               static_cast<long long>(sink), static_cast<long long>(recent), part.sparsity());
  const auto tl0 = clock::now();
  std::unique_ptr<Model> model = a.random_weights
                                     ? std::make_unique<Model>(cfg, *backend, layout, a.seed)
                                     : std::make_unique<Model>(a.model_dir, *backend, layout);
  model->set_decode_graphs(!a.no_decode_graph);
  backend->synchronize();
  const double load_s = std::chrono::duration<double>(clock::now() - tl0).count();
  const int64_t weights_bytes = backend->device_memory_in_use();
  std::fprintf(stderr, "duo bench: weights loaded in %.1f s (%s on the device)\n", load_s,
               human_bytes(weights_bytes).c_str());

  std::mt19937 rng(static_cast<uint32_t>(a.seed + 1));
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(cfg.vocab_size - 1));

  // Warm-up (not timed): library handles, GEMM plans, module loading.
  {
    const int64_t n = std::min<int64_t>(512, contexts.front());
    auto cache = model->make_cache(n + 2, sink, recent, duo.prefill);
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = tok(rng);
    int32_t next = model->forward_greedy(t, *cache);
    for (int i = 0; i < 2; ++i)
      next = model->forward_greedy(std::span<const int32_t>(&next, 1), *cache);
    backend->synchronize();
  }

  nlohmann::json results = nlohmann::json::array();
  for (const int64_t N : contexts) {
    nlohmann::json r = {{"context", N}};
    try {
      backend->reset_memory_peak();
      const int64_t capacity = N + a.warmup_steps + a.decode_steps;
      auto cache = model->make_cache(capacity, sink, recent, duo.prefill);
      const CacheBytes kv = cache->allocated_bytes();
      std::vector<int32_t> prompt(static_cast<size_t>(N));
      for (auto& x : prompt) x = tok(rng);
      backend->synchronize();
      // --synthetic-prefix: every token before the last chunk is random K/V written straight into
      // the cache (no prefill); the last chunk is prefilled for real and timed.
      const int64_t last_chunk = (N - 1) % a.chunk + 1;
      const int64_t prefix = a.synthetic_prefix ? N - last_chunk : 0;
      if (prefix > 0) {
        backend->fill_cache_random(*cache, prefix, a.seed + 7);
        std::fprintf(stderr, "  N=%lld: %lld tokens of random K/V (synthetic prefix)\n",
                     static_cast<long long>(N), static_cast<long long>(prefix));
      }
      std::fprintf(stderr, "  N=%lld: prefilling in chunks of %lld ...\n",
                   static_cast<long long>(N), static_cast<long long>(a.chunk));
      const auto t0 = clock::now();
      int32_t next = -1;
      for (int64_t p = prefix; p < N; p += a.chunk) {
        const int64_t len = std::min(a.chunk, N - p);
        const std::span<const int32_t> part(prompt.data() + p, static_cast<size_t>(len));
        if (p + len == N) {
          next = model->forward_greedy(part, *cache);
        } else {
          model->forward(part, *cache, 0);
        }
        backend->synchronize();
        std::fprintf(stderr, "\r  N=%lld prefill %lld/%lld (%.1f s)", static_cast<long long>(N),
                     static_cast<long long>(p + len), static_cast<long long>(N),
                     std::chrono::duration<double>(clock::now() - t0).count());
      }
      const double prefill_s = std::chrono::duration<double>(clock::now() - t0).count();
      std::fprintf(stderr, "\n");
      // Each step: one token in, the greedy next token out (argmax on the device; only the id is
      // downloaded, which also synchronises).
      std::vector<double> ms;
      for (int64_t i = 0; i < a.warmup_steps + a.decode_steps; ++i) {
        const auto s0 = clock::now();
        next = model->forward_greedy(std::span<const int32_t>(&next, 1), *cache);
        const double dt = std::chrono::duration<double, std::milli>(clock::now() - s0).count();
        if (i >= a.warmup_steps) ms.push_back(dt);
      }
      // Full attention's KV in the cache's own element size (fp32 on the CPU backend, bf16 on
      // CUDA), so the printed comparison is like for like; the bf16 figure stays in the JSON.
      const int64_t full_kv = cfg.kv_bytes_per_token(backend->kv_bytes_per_element()) * capacity;
      r["synthetic_prefix_tokens"] = prefix;
      r["prefill_seconds"] = prefill_s;
      r["prefill_tokens_per_second"] = static_cast<double>(N - prefix) / prefill_s;
      r["decode_ms_per_token_median"] = median(ms);
      r["decode_ms_per_token_p10"] = percentile(ms, 0.1);
      r["decode_ms_per_token_p90"] = percentile(ms, 0.9);
      r["cache_capacity_tokens"] = capacity;
      r["kv_bytes_retrieval"] = kv.retrieval;
      r["kv_bytes_streaming"] = kv.streaming;
      r["kv_bytes_total"] = kv.total();
      r["kv_bytes_full_attention"] = full_kv;
      r["kv_bytes_full_attention_bf16"] = cfg.kv_bytes_per_token(2) * capacity;
      r["peak_device_bytes"] = backend->device_memory_peak();
      r["device_used_bytes_driver"] = driver_used_bytes(resolved);
      std::fprintf(
          stderr,
          "  N=%lld: prefill %.3f s (%.0f tok/s), decode %.2f ms/token (median of %lld), "
          "KV %s (retrieval %s, streaming %s; full attention %s), peak %s\n",
          static_cast<long long>(N), prefill_s, static_cast<double>(N - prefix) / prefill_s,
          median(ms), static_cast<long long>(a.decode_steps), human_bytes(kv.total()).c_str(),
          human_bytes(kv.retrieval).c_str(), human_bytes(kv.streaming).c_str(),
          human_bytes(full_kv).c_str(), human_bytes(backend->device_memory_peak()).c_str());
    } catch (const Error& e) {
      // Out of memory at one context (as the paper's OOM points) is a result, not a failure.
      r["error"] = e.what();
      r["peak_device_bytes"] = backend->device_memory_peak();
      std::fprintf(stderr, "\n  N=%lld: %s\n", static_cast<long long>(N), e.what());
    }
    results.push_back(r);
  }

  if (a.json) {
    nlohmann::json j = {
        {"command", command_line()},
        {"backend", backend->name()},
        {"device", card},
        {"model", a.random_weights ? a.config_file : a.model_dir},
        {"weights",
         a.random_weights ? "random (seed " + std::to_string(a.seed) + ")" : "checkpoint"},
        {"model_type", cfg.model_type},
        {"layers", cfg.num_layers},
        {"heads", cfg.num_heads},
        {"kv_heads", cfg.num_kv_heads},
        {"head_dim", cfg.head_dim},
        {"pattern", pattern_desc},
        {"sparsity_realised", part.sparsity()},
        {"retrieval_heads", part.total_retrieval()},
        {"sink", sink},
        {"recent", recent},
        {"chunk", a.chunk},
        {"decode_steps", a.decode_steps},
        {"decode_graph", !a.no_decode_graph},
        {"synthetic_prefix", a.synthetic_prefix},
        {"warmup_steps", a.warmup_steps},
        {"weights_device_bytes", weights_bytes},
        {"load_seconds", load_s},
        {"results", results},
    };
    std::cout << j.dump(2) << "\n";
  }
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* sub =
      app.add_subcommand("bench", "Prefill latency, decode ms/token and memory at given contexts");
  sub->add_option("-m,--model", a->model_dir, "Model directory (config.json + safetensors)");
  sub->add_flag("--random-weights", a->random_weights,
                "Random weights (N(0, 0.02)) from --config alone");
  sub->add_option("--config", a->config_file, "config.json for --random-weights");
  a->duo.default_sink = 128;  // the efficiency runs' window (the published patterns' config.json)
  a->duo.add_to(sub);
  sub->add_option("--contexts", a->contexts, "Comma-separated context lengths, e.g. 20000,60000");
  sub->add_option("--chunk", a->chunk, "Prefill chunk size (default 32768)");
  sub->add_option("--decode-steps", a->decode_steps, "Timed decode steps (default 100)");
  sub->add_option("--warmup-steps", a->warmup_steps,
                  "Untimed decode steps before them (default 5)");
  add_backend_option(sub, a->backend);
  sub->add_option("--seed", a->seed, "Seed of the random weights and tokens (default 0)");
  sub->add_flag("--json", a->json, "Print one JSON object with every number");
  sub->add_flag("--synthetic-prefix", a->synthetic_prefix,
                "Fill the cache with random K/V up to the last prefill chunk instead of "
                "prefilling it (decode and last-chunk timing at long contexts; CUDA only)");
  sub->add_flag("--no-decode-graph", a->no_decode_graph,
                "Run decode steps op by op instead of replaying a captured CUDA graph");
  sub->callback([a] { run_bench(*a); });
}

}  // namespace duo::cli
