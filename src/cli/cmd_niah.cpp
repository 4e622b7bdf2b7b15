// `duo niah`: needle-in-a-haystack over lengths x depths, full attention or DuoAttention.
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
#include "eval/niah.h"
#include "tokenizer/streaming_decoder.h"

namespace duo::cli {

namespace {

struct NiahArgs {
  std::string model_dir;
  std::string haystack;
  std::string needle, question, answer;
  std::string task = "sentence";
  int64_t kv_pairs = 8;
  bool kv_pairs_set = false;
  std::vector<int64_t> lengths{1000, 2000, 4000};
  std::vector<double> depths{0, 11.1, 22.2, 33.3, 44.4, 55.6, 66.7, 77.8, 88.9, 100};
  int64_t max_answer = 32;
  int64_t chunk = 32768;
  uint64_t seed = 42;
  std::string json_file;
  std::string backend = "auto";
  bool answer_nll = false;
  DuoOptions duo;
};

void run(const NiahArgs& a) {
  const ModelConfig cfg = ModelConfig::load(a.model_dir);
  const ResolvedDuo duo = resolve(a.duo, cfg, a.model_dir);
  const bool custom = !a.needle.empty() || !a.question.empty() || !a.answer.empty();
  check(!custom || (!a.needle.empty() && !a.question.empty() && !a.answer.empty()),
        "--needle, --question and --answer go together");
  check(a.task == "sentence" || a.task == "passkey" || a.task == "kv",
        "--task must be sentence, passkey or kv, got '", a.task, "'");
  check(!a.kv_pairs_set || a.task == "kv", "--kv-pairs applies to --task kv only");
  check(a.kv_pairs >= 1 && a.kv_pairs <= 256, "--kv-pairs must be in [1, 256], got ", a.kv_pairs);
  check(!a.lengths.empty() && !a.depths.empty(), "--lengths and --depths need at least one value");
  for (int64_t L : a.lengths)
    check(L > 0 && L <= kMaxContext, "--lengths must be in [1, ", kMaxContext, "], got ", L);
  for (double d : a.depths) check(d >= 0 && d <= 100, "--depths must be in [0, 100], got ", d);
  check(a.max_answer > 0 && a.max_answer <= kMaxContext, "--max-answer must be in [1, ",
        kMaxContext, "], got ", a.max_answer);
  auto tok = Tokenizer::load(a.model_dir);
  const int64_t longest = *std::max_element(a.lengths.begin(), a.lengths.end());
  const std::vector<int32_t> hay = haystack_tokens(*tok, a.haystack, longest);
  auto backend = make_backend(a.backend);
  Model model(a.model_dir, *backend, HeadLayout::from_partition(cfg, duo.partition));
  const bool tty = stderr_is_terminal();
  nlohmann::json rows = nlohmann::json::array();
  double sum_words = 0, sum_exact = 0, sum_nll = 0;
  int64_t count = 0;
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t total = static_cast<int64_t>(a.lengths.size() * a.depths.size());
  std::vector<std::vector<double>> table(a.depths.size(), std::vector<double>(a.lengths.size()));
  for (size_t li = 0; li < a.lengths.size(); ++li) {
    for (size_t di = 0; di < a.depths.size(); ++di) {
      const int64_t L = a.lengths[li];
      const double depth = a.depths[di];
      const uint64_t seed = a.seed + li * 1000 + di;
      Needle n = custom                ? Needle{a.needle, a.question, a.answer, {}}
                 : a.task == "passkey" ? passkey_needle(seed)
                 : a.task == "kv"      ? kv_needle(seed, a.kv_pairs)
                                       : classic_sentence_needle();
      NiahPrompt p = build_niah_prompt(*tok, hay, n, L, depth);
      auto cache = model.make_cache(L + a.max_answer, duo.sink, duo.recent, duo.prefill);
      StreamingDecoder dec(*tok, true);
      std::string text;
      GenerateOptions opt;
      opt.max_new_tokens = a.max_answer;
      opt.chunk = a.chunk;
      opt.stop_ids = cfg.eos_token_ids;
      GenerateCallbacks cb;
      cb.on_token = [&](int32_t id) { text += dec.push(id); };
      cb.stop = [&] { return text.find('\n', text.find_first_not_of(" \n")) != std::string::npos; };
      GenerateResult r = generate(model, *cache, p.ids, opt, cb);
      text += dec.flush();
      const NiahScore s = score_answer(text, n.answer);
      double nll = 0;
      if (a.answer_nll) {  // a second prefill, teacher-forcing " {answer}\n" (the trained format)
        const std::vector<int32_t> want = tok->encode(" " + n.answer + "\n", false);
        auto fresh = model.make_cache(L + static_cast<int64_t>(want.size()), duo.sink, duo.recent,
                                      duo.prefill);
        nll = continuation_nll(model, *fresh, p.ids, want, a.chunk);
        sum_nll += nll;
      }
      table[di][li] = s.words;
      sum_words += s.words;
      sum_exact += s.exact ? 1 : 0;
      ++count;
      rows.push_back({{"length", L},
                      {"depth", depth},
                      {"needle_position", p.needle_position},
                      {"answer", n.answer},
                      {"generated", text.substr(0, text.find('\n', text.find_first_not_of(" \n")))},
                      {"exact", s.exact},
                      {"score", s.words},
                      {"prefill_seconds", r.prefill_seconds}});
      if (a.answer_nll) rows.back()["answer_nll"] = nll;
      if (tty) {
        const double el =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(
            stderr, "\r\033[Kniah %lld/%lld  length %lld depth %.0f%%  score %.2f  ETA %.0f s",
            static_cast<long long>(count), static_cast<long long>(total), static_cast<long long>(L),
            depth, s.words, el / static_cast<double>(count) * static_cast<double>(total - count));
      }
    }
  }
  if (tty) std::fprintf(stderr, "\r\033[K");
  const double mean = sum_words / static_cast<double>(count),
               exact = sum_exact / static_cast<double>(count);
  std::printf("needle in a haystack: %s (%s), %s, model %s\n", duo.mode.c_str(),
              duo.mode == "full attention"
                  ? "all heads retrieval"
                  : ("S=" + std::to_string(duo.sink) + " R=" + std::to_string(duo.recent) +
                     (duo.rule.empty() ? "" : ", " + duo.rule))
                        .c_str(),
              custom ? "custom needle" : a.task.c_str(), a.model_dir.c_str());
  std::printf("score = share of answer words found (1.00 = all)\n%8s", "depth");
  for (int64_t L : a.lengths) std::printf(" %7lld", static_cast<long long>(L));
  std::printf("\n");
  for (size_t di = 0; di < a.depths.size(); ++di) {
    std::printf("%7.1f%%", a.depths[di]);
    for (size_t li = 0; li < a.lengths.size(); ++li) std::printf(" %7.2f", table[di][li]);
    std::printf("\n");
  }
  std::printf("mean score %.3f, exact match %.3f over %lld prompts\n", mean, exact,
              static_cast<long long>(count));
  const double mean_nll = sum_nll / static_cast<double>(count);
  if (a.answer_nll) std::printf("mean answer NLL %.4f nats/token (teacher-forced)\n", mean_nll);
  if (!a.json_file.empty()) {
    nlohmann::json j = {
        {"model", a.model_dir},
        {"task", custom ? "custom" : a.task},
        {"kv_pairs", a.task == "kv" && !custom ? a.kv_pairs : 0},
        {"haystack", a.haystack.empty() ? "filler" : a.haystack},
        {"lengths", a.lengths},
        {"depths", a.depths},
        {"backend", backend->name()},
        {"mean_score", mean},
        {"exact_match", exact},
        {"mean_answer_nll", a.answer_nll ? nlohmann::json(mean_nll) : nlohmann::json(nullptr)},
        {"results", rows}};
    j.update(duo.json());
    write_json_file(a.json_file, j);
  }
}

}  // namespace

void add_niah_command(CLI::App& app) {
  auto a = std::make_shared<NiahArgs>();
  CLI::App* cmd = app.add_subcommand("niah", "Needle-in-a-haystack accuracy over lengths x depths");
  cmd->add_option("-m,--model", a->model_dir, "Hugging Face model directory")->required();
  cmd->add_option("--haystack", a->haystack,
                  "Directory of .txt files (default: the classic repeated filler)");
  cmd->add_option("--task", a->task,
                  "sentence (the classic San Francisco needle), passkey, or kv (key-value "
                  "retrieval among --kv-pairs needles)");
  cmd->add_option_function<int64_t>(
      "--kv-pairs",
      [a](int64_t v) {
        a->kv_pairs = v;
        a->kv_pairs_set = true;
      },
      "Key-value needles per prompt for --task kv, one asked (default 8)");
  cmd->add_option("--needle", a->needle, "Custom needle text");
  cmd->add_option("--question", a->question, "Custom question");
  cmd->add_option("--answer", a->answer, "Custom expected answer");
  cmd->add_option("--lengths", a->lengths, "Prompt lengths in tokens")->delimiter(',');
  cmd->add_option("--depths", a->depths, "Needle depths in percent of the haystack")
      ->delimiter(',');
  cmd->add_option("--max-answer", a->max_answer, "Answer tokens to generate at most (default 32)");
  cmd->add_option("--chunk", a->chunk, "Prefill chunk size");
  cmd->add_option("--seed", a->seed, "Seed for passkeys and key-value pairs");
  cmd->add_option("--json", a->json_file, "Write all results to this JSON file");
  cmd->add_flag(
      "--answer-nll", a->answer_nll,
      "Also score each prompt by the teacher-forced NLL of the answer (a second prefill)");
  add_backend_option(cmd, a->backend);
  a->duo.add_to(cmd);
  cmd->callback([a] { run(*a); });
}

}  // namespace duo::cli
