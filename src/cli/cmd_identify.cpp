// `duo identify`: find retrieval heads and write a pattern in the published format.
//   --method gate (default): the paper's optimisation (duoattention.md section 4),
//   identify/gate_trainer.h, on the CPU (identify/gate_model.h) or the GPU (cuda/gate_cuda.h);
//   --backend auto takes the GPU when there is one. With --profile-contexts it times training
//   steps instead (on the GPU; --random-weights --config FILE needs no checkpoint) and projects
//   the wall time of a full run.
//   --method heuristic: one full-attention forward pass per synthetic multi-passkey sample. For
//   each query of the question-and-answer block and each KV head (its query heads averaged), either
//   `deviation`: |o_full - o_window|^2 / |o_full|^2, how far the head's output moves when it only
//   sees sink + recent (a one-pass proxy of the gate objective), or `needle-mass`: the attention
//   on the passkeys outside the window. Scores are normalised to [0, 1] by the largest.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/backend_choice.h"
#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/int_list.h"
#include "core/error.h"
#include "core/file_util.h"
#include "duo/head_pattern.h"
#include "engine/model.h"
#include "eval/multi_passkey.h"
#include "eval/niah.h"
#include "identify/gate_trainer.h"

#ifdef DUO_HAVE_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/gate_cuda.h"
#endif

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
  std::string backend = "cpu";  // heuristic default; gate: auto unless --backend is given
  bool backend_given = false;
  std::string score = "needle-mass";
  std::string data = "duo";
  // --method gate
  int64_t steps = 2000;
  double lr = 0.02;
  double reg = 0.05;
  std::string mask = "exact";
  std::string labels = "qa";
  int64_t block = 128;
  int64_t save_every = 50;
  bool resume = false;
  // --profile-contexts: time training steps instead of training
  bool random_weights = false;
  std::string config_file;
  std::string profile_contexts;
  int64_t profile_steps = 3;
  std::string json_file;
};

// The backend the gate method runs on: "cpu" or "cuda" (auto = cuda when a GPU is present).
std::string gate_backend(const IdentifyArgs& a) {
  const std::string b = resolve_backend(a.backend_given ? a.backend : "auto");
  check(b != "cpu-reference",
        "--backend cpu-reference: the gate method has no reference CPU engine (its CPU path is "
        "checked by finite differences in tests); use --backend cpu or cuda");
  return b;
}

std::unique_ptr<gate::GateEngine> make_gate_engine(const std::string& backend,
                                                   const std::string& model_dir) {
  if (backend == "cpu") return gate::make_cpu_gate_engine(model_dir);
#ifdef DUO_HAVE_CUDA
  check(cuda::device_count() > 0, "--backend cuda: no CUDA device found on this machine");
  return std::make_unique<cuda::CudaGateModel>(model_dir, cuda::GateCudaOptions::from_env());
#else
  fail("--backend cuda: this duo was built without CUDA (rebuild with nvcc available)");
#endif
}

// Least-squares fit of t(n) = c0 + c1 n + c2 n^2 (n in thousands of tokens for conditioning).
std::array<double, 3> fit_quadratic(const std::vector<double>& n, const std::vector<double>& t) {
  double A[3][4] = {};
  for (size_t i = 0; i < n.size(); ++i) {
    const double x = n[i] / 1000.0, p[3] = {1.0, x, x * x};
    for (int r = 0; r < 3; ++r) {
      for (int k = 0; k < 3; ++k) A[r][k] += p[r] * p[k];
      A[r][3] += p[r] * t[i];
    }
  }
  for (int col = 0; col < 3; ++col) {  // Gauss-Jordan with partial pivoting
    int piv = col;
    for (int r = col + 1; r < 3; ++r)
      if (std::fabs(A[r][col]) > std::fabs(A[piv][col])) piv = r;
    std::swap(A[col], A[piv]);
    check(std::fabs(A[col][col]) > 1e-12, "--profile-contexts: the fit needs 3 distinct lengths");
    for (int r = 0; r < 3; ++r) {
      if (r == col) continue;
      const double f = A[r][col] / A[col][col];
      for (int k = col; k < 4; ++k) A[r][k] -= f * A[col][k];
    }
  }
  return {A[0][3] / A[0][0], A[1][3] / A[1][1] / 1000.0, A[2][3] / A[2][2] / 1e6};
}

#ifdef DUO_HAVE_CUDA
// Times full training steps (teacher + student forward + backward) per context on the GPU and
// projects a --steps run with haystacks drawn like the trainer does.
void identify_profile(const IdentifyArgs& a) {
  check(gate_backend(a) == "cuda",
        "--profile-contexts times the CUDA gate trainer: use --backend cuda (or auto on a GPU)");
  check(a.model_dir.empty() != !a.random_weights,
        "--profile-contexts: give either -m DIR or --random-weights --config FILE");
  check(!a.random_weights || !a.config_file.empty(), "--random-weights needs --config FILE");
  check(a.profile_steps >= 1, "--profile-steps must be >= 1");
  check(a.ctx_max <= kMaxContext, "--ctx-max must be at most ", kMaxContext, ", got ", a.ctx_max);
  check(a.ctx_min > 0 && a.ctx_max >= a.ctx_min, "--ctx-min/--ctx-max: need 0 < min <= max");
  const std::vector<int64_t> contexts =
      parse_positive_int_list("--profile-contexts", a.profile_contexts);
  const std::set<int64_t> distinct(contexts.begin(), contexts.end());
  check(distinct.size() >= 3 || a.ctx_min == a.ctx_max,
        "--profile-contexts: give at least 3 different lengths for the time(n) fit");
  using clock = std::chrono::steady_clock;
  const std::string src = a.random_weights ? a.config_file : a.model_dir;
  std::unique_ptr<cuda::CudaGateModel> model =
      a.random_weights
          ? std::make_unique<cuda::CudaGateModel>(
                ModelConfig::from_json(read_json_file(a.config_file), a.config_file), a.seed,
                cuda::GateCudaOptions::from_env())
          : std::make_unique<cuda::CudaGateModel>(a.model_dir, cuda::GateCudaOptions::from_env());
  const ModelConfig& cfg = model->config();
  const int64_t weights_bytes = model->device_bytes_in_use();
  model->set_op_timing(true);  // CUDA events at op-class changes: the per-op breakdown
  gate::AttnWindow w;
  w.kind = gate::WindowKind::kExact;
  w.sink = a.sink;
  w.recent = a.recent;
  std::mt19937_64 rng(a.seed);
  std::uniform_real_distribution<double> gate_dist(0.0, 1.0);
  std::vector<double> gates(static_cast<size_t>(model->num_gates()));
  for (double& g : gates) g = gate_dist(rng);
  std::fprintf(stderr, "identify profile: %s on %s, weights %s, %lld timed steps per context\n",
               src.c_str(), model->device().c_str(), human_bytes(weights_bytes).c_str(),
               static_cast<long long>(a.profile_steps));
  nlohmann::json rows = nlohmann::json::array();
  std::vector<double> xs, ts;
  std::printf("%9s %12s %12s %12s %12s %12s\n", "context", "step_s", "teacher_s", "student_s",
              "peak_GiB", "driver_GiB");
  for (int64_t n : contexts) {
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(cfg.vocab_size - 1));
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int32_t& t : ids) t = tok(rng);
    const int64_t label_begin = n - std::min<int64_t>(n, 64);
    model->reset_peak();
    std::vector<double> step_s, teacher_s, student_s;
    double loss = 0;
    for (int64_t s = 0; s <= a.profile_steps; ++s) {  // step 0 warms up (allocation, plans)
      const auto t0 = clock::now();
      model->teacher(ids);
      const auto t1 = clock::now();
      const gate::StudentResult r = model->student(ids, gates, label_begin, w, true);
      const auto t2 = clock::now();
      check(std::isfinite(r.distill), "profile: the loss is not finite at ", n, " tokens");
      loss = r.distill;
      if (s == 0) {
        model->reset_op_times();
        continue;
      }
      teacher_s.push_back(std::chrono::duration<double>(t1 - t0).count());
      student_s.push_back(std::chrono::duration<double>(t2 - t1).count());
      step_s.push_back(std::chrono::duration<double>(t2 - t0).count());
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    const double step = median(step_s);
    const int64_t peak = model->peak_device_bytes();
    const int64_t driver = driver_used_bytes("cuda");
    std::printf(
        "%9lld %12.3f %12.3f %12.3f %12.2f %12.2f  (window attention on %s; %lld of %lld layers "
        "kept in a %.2f GiB pool, the others recomputed)\n",
        static_cast<long long>(n), step, median(teacher_s), median(student_s),
        static_cast<double>(peak) / (1 << 30), static_cast<double>(driver) / (1 << 30),
        model->last_used_tensor_cores() ? "tensor cores" : "fp32 kernels",
        static_cast<long long>(model->last_kept_layers()),
        static_cast<long long>(cfg.num_layers - 1),
        static_cast<double>(model->kept_pool_bytes()) / (1 << 30));
    std::fflush(stdout);
    // Per-op device time, mean over the timed steps, split by pass.
    const double steps_d = static_cast<double>(a.profile_steps);
    nlohmann::json breakdown = nlohmann::json::array();
    double events_total = 0;
    for (const auto& o : model->op_times())
      for (double v : o.seconds) events_total += v / steps_d;
    std::printf("    %-34s %9s %9s %9s %9s %9s %6s\n", "per step (CUDA events), s", "teacher",
                "student", "recompute", "backward", "total", "share");
    for (const auto& o : model->op_times()) {
      double total = 0;
      nlohmann::json per_pass;
      for (int p = 0; p < 4; ++p) {
        total += o.seconds[p] / steps_d;
        per_pass[cuda::CudaGateModel::kPassNames[p]] = o.seconds[p] / steps_d;
      }
      std::printf("    %-34s %9.4f %9.4f %9.4f %9.4f %9.4f %5.1f%%\n", o.op.c_str(),
                  o.seconds[0] / steps_d, o.seconds[1] / steps_d, o.seconds[2] / steps_d,
                  o.seconds[3] / steps_d, total, 100.0 * total / std::max(events_total, 1e-30));
      breakdown.push_back({{"op", o.op}, {"seconds", total}, {"by_pass", per_pass}});
    }
    std::printf("    %-34s %49.4f (wall step %.4f)\n", "sum over ops", events_total, step);
    std::fflush(stdout);
    xs.push_back(static_cast<double>(n));
    ts.push_back(step);
    rows.push_back({{"context", n},
                    {"op_breakdown_seconds_per_step", breakdown},
                    {"op_breakdown_sum_seconds", events_total},
                    {"step_seconds_median", step},
                    {"step_seconds", step_s},
                    {"teacher_seconds_median", median(teacher_s)},
                    {"student_seconds_median", median(student_s)},
                    {"peak_device_bytes", peak},
                    {"driver_used_bytes", driver},
                    {"distill_loss", loss},
                    {"tensor_core_window_attention", model->last_used_tensor_cores()},
                    {"kept_layers", model->last_kept_layers()},
                    {"recomputed_layers", cfg.num_layers - 1 - model->last_kept_layers()},
                    {"kept_pool_bytes", model->kept_pool_bytes()}});
  }
  nlohmann::json j = {{"command", command_line()},
                      {"model", src},
                      {"card", model->device()},
                      {"precision", "bf16 weights and GEMM inputs, fp32 activations"},
                      {"op_breakdown",
                       "device time per op class and pass from CUDA events recorded at every "
                       "change of op class (the gap to the next event counts for the op); mean "
                       "over the timed steps"},
                      {"sink", a.sink},
                      {"recent", a.recent},
                      {"weights_bytes", weights_bytes},
                      {"results", rows}};
  if (xs.size() >= 3) {
    const auto c = fit_quadratic(xs, ts);
    const double lo = static_cast<double>(a.ctx_min), hi = static_cast<double>(a.ctx_max);
    auto t_of = [&](double n) { return c[0] + c[1] * n + c[2] * n * n; };
    // The trainer draws haystack lengths from 50 evenly spaced values in [ctx-min, ctx-max]
    // (each once per 50 steps); the continuous uniform mean is the integral of the fit.
    double grid = 0;
    for (int k = 0; k < 50; ++k) grid += t_of(lo + (hi - lo) * k / 49.0) / 50.0;
    const double mean_sq = hi > lo ? (hi * hi * hi - lo * lo * lo) / (3 * (hi - lo)) : lo * lo;
    const double integral = c[0] + c[1] * (lo + hi) / 2 + c[2] * mean_sq;
    const double total = grid * static_cast<double>(a.steps);
    std::printf(
        "fit: step_s(n) = %.4g + %.4g n + %.4g n^2 (least squares over the %zu contexts)\n"
        "projection: %lld steps with contexts uniform in [%lld, %lld]: mean step %.3f s "
        "(integral of the fit; %.3f s over the trainer's 50 evenly spaced lengths) -> %.0f s = "
        "%.2f h on %s\n",
        c[0], c[1], c[2], xs.size(), static_cast<long long>(a.steps),
        static_cast<long long>(a.ctx_min), static_cast<long long>(a.ctx_max), integral, grid, total,
        total / 3600.0, model->device().c_str());
    j["fit"] = {{"a", c[0]}, {"b", c[1]}, {"c", c[2]}, {"form", "step_s = a + b n + c n^2"}};
    j["projection"] = {{"steps", a.steps},
                       {"ctx_min", a.ctx_min},
                       {"ctx_max", a.ctx_max},
                       {"mean_step_seconds_integral", integral},
                       {"mean_step_seconds_grid50", grid},
                       {"total_seconds", total},
                       {"method",
                        "least-squares quadratic fit of the median step time, averaged over "
                        "the trainer's 50 evenly spaced haystack lengths"}};
  }
  if (!a.json_file.empty()) write_json_file(a.json_file, j, 2);
}
#endif

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
  o.labels = a.labels;
  o.block = a.block;
  o.save_every = a.save_every;
  o.resume = a.resume;
  check(!a.model_dir.empty(), "-m DIR is required to train");
  const std::string backend = gate_backend(a);
  const std::unique_ptr<gate::GateEngine> engine = make_gate_engine(backend, a.model_dir);
  std::fprintf(stderr, "identify (gate): training on %s\n", engine->device().c_str());
  gate::train_gates(o, *engine);
  std::printf("wrote %s/full_attention_heads.tsv (gate optimisation, %lld steps on %s)\n",
              a.out_dir.c_str(), static_cast<long long>(a.steps), engine->device().c_str());
}

void identify_heuristic(const IdentifyArgs& a) {
  const ModelConfig cfg = ModelConfig::load(a.model_dir);
  check(a.samples >= 1, "--samples must be >= 1");
  check(a.ctx_max <= kMaxContext, "--ctx-max must be at most ", kMaxContext, ", got ", a.ctx_max);
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
  cmd->add_option("-m,--model", a->model_dir, "Hugging Face model directory");
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
  cmd->add_option("--labels", a->labels,
                  "Gate: rows the distillation loss averages over: qa (the question-and-answer "
                  "block, the paper; default) or all (every row past sink + recent, the haystack "
                  "too)")
      ->check(CLI::IsMember({"qa", "all"}));
  cmd->add_option("--block", a->block, "Gate: block size of --mask block (default 128)");
  cmd->add_option("--save-every", a->save_every,
                  "Gate: write the pattern, log and checkpoint every N steps (default 50)");
  cmd->add_flag("--resume", a->resume,
                "Gate: continue from the checkpoint in the output directory");
  add_backend_option(cmd, a->backend);
  cmd->add_flag("--random-weights", a->random_weights,
                "Gate profile: random weights from --config (no checkpoint)");
  cmd->add_option("--config", a->config_file, "Gate profile: config.json for --random-weights");
  cmd->add_option("--profile-contexts", a->profile_contexts,
                  "Gate: time training steps at these token counts (comma list, >= 3) on the GPU "
                  "and project a --steps run over [--ctx-min, --ctx-max]; trains nothing");
  cmd->add_option("--profile-steps", a->profile_steps,
                  "Gate profile: timed steps per context after one warm-up (default 3)");
  cmd->add_option("--json", a->json_file, "Gate profile: write the results as JSON to FILE");
  cmd->callback([a, cmd] {
    a->backend_given = cmd->get_option("--backend")->count() > 0;
    if (a->method == "gate") {
      if (!a->profile_contexts.empty()) {
#ifdef DUO_HAVE_CUDA
        identify_profile(*a);
#else
        fail("--profile-contexts: this duo was built without CUDA");
#endif
        return;
      }
      for (const char* flag : {"--random-weights", "--config", "--profile-steps", "--json"})
        check(cmd->get_option(flag)->count() == 0, flag, " only goes with --profile-contexts");
      identify_gate(*a);
    } else {
      check(!a->model_dir.empty(), "-m DIR is required");
      for (const char* flag : {"--profile-contexts", "--profile-steps", "--random-weights",
                               "--config", "--json", "--steps", "--lr", "--reg", "--mask",
                               "--labels", "--block", "--save-every", "--resume"})
        check(cmd->get_option(flag)->count() == 0, flag,
              " only goes with --method gate (this is --method heuristic)");
      identify_heuristic(*a);
    }
  });
}

}  // namespace duo::cli
