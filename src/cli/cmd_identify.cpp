// `duo identify`: find retrieval heads and write a pattern in the published format.
//   --method gate (default): the paper's optimisation (duoattention.md section 4) on the CPU,
//   identify/gate_trainer.h.
//   --method heuristic: one full-attention forward pass per synthetic multi-passkey sample. For
//   each query of the question-and-answer block and each KV head (its query heads averaged), either
//   `deviation`: |o_full - o_window|^2 / |o_full|^2, how far the head's output moves when it only
//   sees sink + recent (a one-pass proxy of the gate objective), or `needle-mass`: the attention
//   on the passkeys outside the window. Scores are normalised to [0, 1] by the largest.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/backend_choice.h"
#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/error.h"
#include "duo/head_pattern.h"
#include "engine/model.h"
#include "eval/multi_passkey.h"
#include "eval/niah.h"
#include "identify/gate_trainer.h"

namespace duo::cli {

namespace {

struct IdentifyArgs {
  std::string model_dir;
  std::string corpus;
  std::string out_dir;
  std::string method = "gate";
  int64_t samples = 8;
  int64_t ctx_min = 1000;
  int64_t ctx_max = 32000;
  int64_t sink = 128;
  int64_t recent = 256;
  int64_t passkeys = 10;
  uint64_t seed = 42;
  int64_t chunk = 4096;
  std::string backend = "cpu";
  std::string score = "needle-mass";
  std::string data = "duo";
  // --method gate
  int64_t steps = 2000;
  double lr = 0.02;
  double reg = 0.05;
  std::string mask = "exact";
  int64_t block = 128;
  int64_t save_every = 50;
  bool resume = false;
};

void identify_gate(const IdentifyArgs& a) {
  gate::GateTrainOptions o;
  o.model_dir = a.model_dir;
  o.corpus = a.corpus;
  o.out_dir = a.out_dir;
  o.steps = a.steps;
  o.lr = a.lr;
  o.reg = a.reg;
  o.ctx_min = a.ctx_min;
  o.ctx_max = a.ctx_max;
  o.sink = a.sink;
  o.recent = a.recent;
  o.passkeys = a.passkeys;
  o.seed = a.seed;
  o.data = a.data;
  o.mask = a.mask;
  o.block = a.block;
  o.save_every = a.save_every;
  o.resume = a.resume;
  gate::train_gates(o);
  std::printf("wrote %s/full_attention_heads.tsv (gate optimisation, %lld steps)\n",
              a.out_dir.c_str(), static_cast<long long>(a.steps));
}

void identify_heuristic(const IdentifyArgs& a) {
  const ModelConfig cfg = ModelConfig::load(a.model_dir);
  check(a.samples >= 1, "--samples must be >= 1");
  check(a.ctx_min > 0 && a.ctx_max >= a.ctx_min, "--ctx-min/--ctx-max: need 0 < min <= max, got ",
        a.ctx_min, " and ", a.ctx_max);
  check(a.sink >= 0 && a.recent >= 0, "--sink and --recent must be >= 0");
  check(a.chunk > 0, "--chunk must be positive");
  check(!a.corpus.empty(), "--corpus DIR is required (a directory of .txt files)");
  check(!a.out_dir.empty(), "-o PATTERN_DIR is required");
  auto tok = Tokenizer::load(a.model_dir);
  const std::vector<int32_t> hay = haystack_tokens(*tok, a.corpus, a.ctx_max + 1);
  auto backend = make_backend(a.backend);
  const HeadLayout layout = HeadLayout::all_retrieval(cfg);  // identity order: physical == original
  Model model(a.model_dir, *backend, layout);
  const int64_t heads = cfg.num_layers * cfg.num_kv_heads;
  LongRangeProbe probe;
  probe.sink = a.sink;
  probe.recent = a.recent;
  probe.mass.assign(static_cast<size_t>(heads), 0.0);
  probe.weight.assign(static_cast<size_t>(heads), 0.0);
  probe.deviation.assign(static_cast<size_t>(heads), 0.0);
  std::vector<double> score(static_cast<size_t>(heads), 0.0);
  std::mt19937_64 rng(a.seed);
  const int64_t passkeys =
      a.data == "qa" ? std::min<int64_t>(a.passkeys, 4) : a.passkeys;  // qa: 4 wordings
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < a.samples; ++s) {
    PasskeyOptions po;
    po.style = a.data == "qa" ? PasskeyStyle::kQa : PasskeyStyle::kDuo;
    po.num_passkeys = passkeys;
    po.haystack_tokens =
        a.samples == 1 ? a.ctx_max : a.ctx_min + (a.ctx_max - a.ctx_min) * s / (a.samples - 1);
    PasskeySample sample = make_multi_passkey_sample(*tok, hay, po, rng);
    const int64_t n = static_cast<int64_t>(sample.ids.size());
    auto cache = model.make_cache(n, 0, 0, StreamingPrefill::kExact);
    std::fill(probe.mass.begin(), probe.mass.end(), 0.0);
    std::fill(probe.weight.begin(), probe.weight.end(), 0.0);
    std::fill(probe.deviation.begin(), probe.deviation.end(), 0.0);
    probe.query_begin = sample.label_begin;
    probe.key_ranges.clear();
    for (size_t k = 0; a.score == "needle-mass" && k < sample.needle_positions.size(); ++k)
      probe.key_ranges.emplace_back(sample.needle_positions[k],
                                    sample.needle_positions[k] + sample.needle_lengths[k]);
    backend->set_long_range_probe(&probe);
    for (int64_t p = 0; p < n; p += a.chunk) {
      const int64_t len = std::min(a.chunk, n - p);
      model.forward(std::span<const int32_t>(sample.ids.data() + p, static_cast<size_t>(len)),
                    *cache, 0);
    }
    backend->set_long_range_probe(nullptr);
    const std::vector<double>& stat = a.score == "deviation" ? probe.deviation : probe.mass;
    for (int64_t h = 0; h < heads; ++h)
      score[h] +=
          probe.weight[h] > 0 ? stat[h] / probe.weight[h] / static_cast<double>(a.samples) : 0.0;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "identify (heuristic): sample %lld/%lld, %lld tokens, %.1f s elapsed\n",
                 static_cast<long long>(s + 1), static_cast<long long>(a.samples),
                 static_cast<long long>(n), el);
  }
  const double top = *std::max_element(score.begin(), score.end());
  HeadPattern pat;
  pat.num_layers = cfg.num_layers;
  pat.num_kv_heads = cfg.num_kv_heads;
  pat.gates.resize(static_cast<size_t>(heads));
  for (int64_t h = 0; h < heads; ++h) pat.gates[h] = top > 0 ? score[h] / top : 0.0;
  pat.sink_size = a.sink;
  pat.recent_size = a.recent;
  pat.config = {
      {"method", "heuristic"},
      {"model_name", a.model_dir},
      {"dataset_name", a.corpus},
      {"dataset_format", a.data == "qa" ? "multiple_passkey_qa" : "multiple_passkey"},
      {"num_passkeys", passkeys},
      {"samples", a.samples},
      {"context_length_min", a.ctx_min},
      {"context_length_max", a.ctx_max},
      {"sink_size", a.sink},
      {"recent_size", a.recent},
      {"seed", a.seed},
      {"score",
       a.score == "deviation"
           ? "mean |o_full - o_window|^2 / |o_full|^2 over the QA block, / max"
           : "mean attention mass from the QA block on the needles outside sink + recent, / max"}};
  write_head_pattern(pat, a.out_dir);
  std::printf("wrote %s/full_attention_heads.tsv (%lld layers x %lld KV heads, heuristic scores)\n",
              a.out_dir.c_str(), static_cast<long long>(cfg.num_layers),
              static_cast<long long>(cfg.num_kv_heads));
}

}  // namespace

void add_identify_command(CLI::App& app) {
  auto a = std::make_shared<IdentifyArgs>();
  CLI::App* cmd = app.add_subcommand("identify", "Find retrieval heads; write a head pattern");
  cmd->add_option("-m,--model", a->model_dir, "Hugging Face model directory")->required();
  cmd->add_option("--corpus", a->corpus, "Directory of .txt files for the synthetic passkey data");
  cmd->add_option("-o,--output", a->out_dir, "Pattern directory to write");
  cmd->add_option("--method", a->method,
                  "gate (the paper's optimisation) or heuristic (one pass, no training)")
      ->check(CLI::IsMember({"gate", "heuristic"}));
  cmd->add_option("--samples", a->samples, "Heuristic: number of passkey samples (default 8)");
  cmd->add_option("--ctx-min", a->ctx_min, "Shortest haystack in tokens (default 1000)");
  cmd->add_option("--ctx-max", a->ctx_max, "Longest haystack in tokens (default 32000)");
  cmd->add_option("--sink", a->sink, "Sink tokens S of the streaming window (default 128)");
  cmd->add_option("--recent", a->recent, "Recent tokens R of the streaming window (default 256)");
  cmd->add_option("--passkeys", a->passkeys, "Passkeys per sample (default 10)");
  cmd->add_option("--seed", a->seed, "Random seed (default 42)");
  cmd->add_option("--chunk", a->chunk, "Prefill chunk size");
  cmd->add_option(
         "--score", a->score,
         "Heuristic statistic: needle-mass (attention on the passkeys outside the window; default) "
         "or deviation (how far a head's output moves when it only sees sink + recent)")
      ->check(CLI::IsMember({"deviation", "needle-mass"}));
  cmd->add_option(
         "--data", a->data,
         "Synthetic data: duo (section 4: NATO-word passkeys, default) or qa (numeric passkeys in "
         "the demo models' Question/Answer format, at most 4 per sample)")
      ->check(CLI::IsMember({"duo", "qa"}));
  cmd->add_option("--steps", a->steps, "Gate: optimisation steps (default 2000)");
  cmd->add_option("--lr", a->lr, "Gate: AdamW learning rate (default 0.02)");
  cmd->add_option("--reg", a->reg, "Gate: weight of the mean |gate| regulariser (default 0.05)");
  cmd->add_option("--mask", a->mask,
                  "Gate: streaming mask while training: exact (token-exact sink + recent, "
                  "default) or block (the release: blocks of --block tokens)")
      ->check(CLI::IsMember({"exact", "block"}));
  cmd->add_option("--block", a->block, "Gate: block size of --mask block (default 128)");
  cmd->add_option("--save-every", a->save_every,
                  "Gate: write the pattern, log and checkpoint every N steps (default 50)");
  cmd->add_flag("--resume", a->resume,
                "Gate: continue from the checkpoint in the output directory");
  add_backend_option(cmd, a->backend);
  cmd->callback([a] {
    if (a->method == "gate") {
      check(a->backend != "cuda", "--method gate runs on the CPU only (got --backend ", a->backend,
            ")");
      identify_gate(*a);
    } else {
      identify_heuristic(*a);
    }
  });
}

}  // namespace duo::cli
