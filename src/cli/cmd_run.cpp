// `duo run`: load a model, optionally a head pattern, and generate text for a prompt.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/backend_choice.h"
#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/duo_options.h"
#include "core/error.h"
#include "core/file_util.h"
#include "engine/generate.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/streaming_decoder.h"
#include "tokenizer/tokenizer.h"

namespace duo::cli {

namespace {

struct RunArgs {
  std::string model_dir;
  std::string prompt;
  std::string prompt_file;
  std::string system;
  int64_t max_new = 128;
  std::optional<int64_t> context;
  int64_t chunk = 32768;
  bool chat = false;
  float temperature = 0.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool json = false;
  bool ignore_eos = false;
  std::string backend = "auto";
  DuoOptions duo;
};

void run(const RunArgs& a) {
  const ModelConfig cfg = ModelConfig::load(a.model_dir);
  std::string text;
  if (!a.prompt_file.empty()) text = read_text_file(a.prompt_file);
  if (!a.prompt.empty()) text += (text.empty() ? "" : "\n") + a.prompt;
  check(!text.empty(), "empty prompt: give -p TEXT or -f FILE with some text");
  check(a.max_new >= 0 && a.max_new <= kMaxContext, "-n must be in [0, ", kMaxContext, "], got ",
        a.max_new);
  check(a.chunk > 0, "--chunk must be positive, got ", a.chunk);
  SamplingParams sp{a.temperature, a.top_k, a.top_p, a.seed};
  validate(sp);
  const ResolvedDuo duo = resolve(a.duo, cfg, a.model_dir);

  auto tok = Tokenizer::load(a.model_dir);
  std::vector<int32_t> prompt;
  if (a.chat) {
    std::vector<ChatMessage> msgs;
    if (!a.system.empty()) msgs.push_back({"system", a.system});
    msgs.push_back({"user", text});
    const ChatFamily fam = detect_chat_family(*tok, cfg.model_type);
    prompt = tok->encode(apply_chat_template(fam, msgs, true), false);
  } else {
    prompt = tok->encode(text, true);
  }
  check(!prompt.empty(), "empty prompt after tokenization");
  const int64_t n = static_cast<int64_t>(prompt.size());
  const int64_t ctx = a.context.value_or(n + a.max_new);
  check(ctx > 0 && ctx <= kMaxContext, "-c must be in [1, ", kMaxContext,
        "] (duo's limit of 2^31 tokens), got ", ctx);
  check(n <= ctx, "prompt is ", n, " tokens, longer than the context length -c ", ctx);
  check(n + a.max_new <= ctx, "prompt (", n, " tokens) + -n ", a.max_new,
        " exceeds the context length -c ", ctx, " (raise -c or lower -n)");
  if (ctx > cfg.max_position_embeddings && !a.json) {
    std::fprintf(stderr, "duo: warning: context %lld exceeds max_position_embeddings %lld of %s\n",
                 static_cast<long long>(ctx), static_cast<long long>(cfg.max_position_embeddings),
                 a.model_dir.c_str());
  }

  auto backend = make_backend(a.backend);
  Model model(a.model_dir, *backend, HeadLayout::from_partition(cfg, duo.partition));
  auto cache = model.make_cache(ctx, duo.sink, duo.recent, duo.prefill);

  GenerateOptions opt;
  opt.max_new_tokens = a.max_new;
  opt.chunk = a.chunk;
  opt.sampling = sp;
  if (!a.ignore_eos) {
    opt.stop_ids = cfg.eos_token_ids;
    for (int32_t e : tok->eos_ids())
      if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), e) == opt.stop_ids.end())
        opt.stop_ids.push_back(e);
  }
  const bool tty = stderr_is_terminal() && !a.json;
  StreamingDecoder dec(*tok, true);
  std::string generated_text;
  GenerateCallbacks cb;
  const auto start = std::chrono::steady_clock::now();
  if (tty) {
    cb.on_prefill = [&](int64_t done, int64_t total) {
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::fprintf(stderr, "\rprefill %lld/%lld tokens (%.0f tok/s)", static_cast<long long>(done),
                   static_cast<long long>(total), static_cast<double>(done) / std::max(s, 1e-9));
      if (done == total) std::fprintf(stderr, "\r\033[K");
    };
  }
  cb.on_token = [&](int32_t id) {
    std::string piece = dec.push(id);
    generated_text += piece;
    if (!a.json) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
  };
  GenerateResult r = generate(model, *cache, prompt, opt, cb);
  std::string tail = dec.flush();
  generated_text += tail;
  const CacheBytes kv = cache->allocated_bytes();
  const int64_t elem = backend->kv_bytes_per_element();
  const int64_t full_kv = cfg.kv_bytes_per_token(elem) * ctx;
  const double decode_tps =
      r.tokens.size() > 1 ? static_cast<double>(r.tokens.size() - 1) / r.decode_seconds : 0.0;
  if (a.json) {
    nlohmann::json j = {
        {"text", generated_text},
        {"prompt_tokens", r.prompt_tokens},
        {"generated_tokens", static_cast<int64_t>(r.tokens.size())},
        {"tokens", r.tokens},
        {"stopped_at_eos", r.stopped},
        {"prefill_seconds", r.prefill_seconds},
        {"decode_seconds", r.decode_seconds},
        {"prefill_tokens_per_second",
         static_cast<double>(r.prompt_tokens) / std::max(r.prefill_seconds, 1e-9)},
        {"decode_tokens_per_second", decode_tps},
        {"context", ctx},
        {"backend", backend->name()},
        {"total_kv_heads", cfg.num_layers * cfg.num_kv_heads},
        {"kv_bytes",
         {{"retrieval", kv.retrieval},
          {"streaming", kv.streaming},
          {"total", kv.total()},
          {"full_attention", full_kv},
          {"bytes_per_element", elem}}},
    };
    j.update(duo.json());
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::fwrite(tail.data(), 1, tail.size(), stdout);
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(
      stderr,
      "[%s] prompt %lld tok, prefill %.2f s (%.0f tok/s); generated %zu tok, %.1f tok/s%s\n"
      "[%s] KV %s allocated (retrieval %s, streaming %s) vs %s full attention at -c %lld; "
      "%lld/%lld KV heads retrieval (sparsity %.3f)%s\n",
      duo.mode.c_str(), static_cast<long long>(r.prompt_tokens), r.prefill_seconds,
      static_cast<double>(r.prompt_tokens) / std::max(r.prefill_seconds, 1e-9), r.tokens.size(),
      decode_tps, r.stopped ? ", stopped at EOS" : "", backend->name().c_str(),
      human_bytes(kv.total()).c_str(), human_bytes(kv.retrieval).c_str(),
      human_bytes(kv.streaming).c_str(), human_bytes(full_kv).c_str(), static_cast<long long>(ctx),
      static_cast<long long>(duo.partition.total_retrieval()),
      static_cast<long long>(cfg.num_layers * cfg.num_kv_heads), duo.partition.sparsity(),
      duo.mode == "full attention"
          ? ""
          : (", S=" + std::to_string(duo.sink) + " R=" + std::to_string(duo.recent)).c_str());
}

}  // namespace

void add_run_command(CLI::App& app) {
  auto a = std::make_shared<RunArgs>();
  CLI::App* cmd =
      app.add_subcommand("run", "Generate text from a prompt (full attention or DuoAttention)");
  cmd->add_option("-m,--model", a->model_dir, "Hugging Face model directory")->required();
  cmd->add_option("-p,--prompt", a->prompt, "Prompt text (appended after -f)");
  cmd->add_option("-f,--file", a->prompt_file, "Read the prompt from a file");
  cmd->add_option("-n,--max-tokens", a->max_new, "Tokens to generate (default 128)");
  cmd->add_option("-c,--context", a->context,
                  "Context length: KV cache capacity (default prompt + n)");
  cmd->add_option("--chunk", a->chunk, "Prefill chunk size in tokens (default 32768)");
  cmd->add_flag("--chat", a->chat, "Wrap the prompt in the model family's chat template");
  cmd->add_option("--system", a->system, "System prompt for --chat");
  cmd->add_option("--temp", a->temperature, "Sampling temperature (0 = greedy, the default)");
  cmd->add_option("--top-k", a->top_k, "Keep the k most likely tokens (0 = off)");
  cmd->add_option("--top-p", a->top_p, "Nucleus sampling mass (1 = off)");
  cmd->add_option("--seed", a->seed, "Random seed for sampling");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "Do not stop at EOS");
  cmd->add_flag("--json", a->json, "Print one JSON result object instead of streaming text");
  add_backend_option(cmd, a->backend);
  a->duo.add_to(cmd);
  cmd->callback([a] { run(*a); });
}

}  // namespace duo::cli
