#include "identify/gate_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>

#include "core/error.h"
#include "duo/head_pattern.h"
#include "eval/multi_passkey.h"
#include "eval/niah.h"
#include "identify/gate_model.h"
#include "tokenizer/tokenizer.h"

namespace duo::gate {

double lr_factor(int64_t s, int64_t N) {
  const double fifth = static_cast<double>(N) / 5.0;
  const double up = std::max(static_cast<double>(s + 1) / fifth, 0.1);
  const double down = std::max(static_cast<double>(N - s) / fifth, 0.1);
  return std::min({1.0, up, down});
}

GateOptimizer::GateOptimizer(int64_t num_gates, double lr_, int64_t total_steps_)
    : gates(static_cast<size_t>(num_gates), 1.0),
      m(static_cast<size_t>(num_gates), 0.0),
      v(static_cast<size_t>(num_gates), 0.0),
      lr(lr_),
      total_steps(total_steps_) {}

void GateOptimizer::clamp() {
  for (double& g : gates) g = std::clamp(g, 0.0, 1.0);
}

void GateOptimizer::update(const std::vector<double>& grad) {
  check(grad.size() == gates.size(), "gate optimiser: ", grad.size(), " gradients for ",
        gates.size(), " gates");
  const double step_lr = current_lr();
  ++step;
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  for (size_t i = 0; i < gates.size(); ++i) {
    m[i] = beta1 * m[i] + (1.0 - beta1) * grad[i];
    v[i] = beta2 * v[i] + (1.0 - beta2) * grad[i] * grad[i];
    // torch.optim.AdamW: p -= lr * m_hat / (sqrt(v_hat) + eps) (weight decay 0).
    gates[i] -= step_lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
  }
}

nlohmann::json GateOptimizer::to_json() const {
  return {{"gates", gates}, {"exp_avg", m}, {"exp_avg_sq", v}, {"step", step}};
}

void GateOptimizer::load_json(const nlohmann::json& j) {
  try {
    auto g = j.at("gates").get<std::vector<double>>();
    auto mm = j.at("exp_avg").get<std::vector<double>>();
    auto vv = j.at("exp_avg_sq").get<std::vector<double>>();
    check(g.size() == gates.size() && mm.size() == gates.size() && vv.size() == gates.size(),
          "checkpoint holds ", g.size(), " gates, the model has ", gates.size());
    gates = g;
    m = mm;
    v = vv;
    step = j.at("step").get<int64_t>();
    check(step >= 0, "checkpoint step is negative");
  } catch (const nlohmann::json::exception& e) {
    fail("gate checkpoint: ", e.what());
  }
}

namespace {

constexpr int64_t kLengthIntervals = 50;

void write_text(const std::filesystem::path& p, const std::string& text) {
  const std::filesystem::path tmp = p.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    check(static_cast<bool>(out), "cannot write ", tmp.string());
    out << text;
    check(static_cast<bool>(out), "error writing ", tmp.string());
  }
  std::filesystem::rename(tmp, p);
}

std::string rng_to_string(const std::mt19937_64& rng) {
  std::ostringstream os;
  os << rng;
  return os.str();
}

// The sampling state: the RNG, plus the current permutation of the 50 lengths.
struct DataState {
  std::mt19937_64 rng;
  std::vector<int64_t> order;  // permutation of 0..49 for the current cycle
};

void validate(const GateTrainOptions& o) {
  check(o.steps >= 1, "--steps must be >= 1, got ", o.steps);
  check(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number, got ", o.lr);
  check(std::isfinite(o.reg) && o.reg >= 0, "--reg must be >= 0, got ", o.reg);
  check(o.ctx_max <= kMaxContext, "--ctx-max must be at most ", kMaxContext, ", got ", o.ctx_max);
  check(o.ctx_min > 0 && o.ctx_max >= o.ctx_min, "--ctx-min/--ctx-max: need 0 < min <= max, got ",
        o.ctx_min, " and ", o.ctx_max);
  check(o.sink >= 0 && o.recent >= 0, "--sink and --recent must be >= 0");
  check(o.sink + o.recent > 0, "--sink + --recent must be > 0 (a streaming head must see a key)");
  check(o.passkeys >= 1, "--passkeys must be >= 1");
  check(o.data == "duo" || o.data == "qa", "--data: expected duo or qa, got '", o.data, "'");
  check(o.labels == "qa" || o.labels == "all", "--labels: expected qa or all, got '", o.labels,
        "'");
  check(o.mask == "exact" || o.mask == "block", "--mask: expected exact or block, got '", o.mask,
        "'");
  if (o.mask == "block") {
    check(o.block >= 1, "--block must be >= 1");
    check(o.sink % o.block == 0 && o.recent % o.block == 0 && o.recent >= o.block,
          "--mask block: --sink (", o.sink, ") and --recent (", o.recent,
          ") must be multiples of the block size ", o.block,
          " with at least one recent block (the release: --sink 128 --recent 256)");
  }
  check(o.save_every >= 1, "--save-every must be >= 1, got ", o.save_every);
  check(!o.corpus.empty(), "--corpus DIR is required (a directory of .txt files)");
  check(!o.out_dir.empty(), "-o PATTERN_DIR is required");
}

}  // namespace

void train_gates(const GateTrainOptions& o) {
  validate(o);
  const std::unique_ptr<GateEngine> engine = make_cpu_gate_engine(o.model_dir);
  train_gates(o, *engine);
}

void train_gates(const GateTrainOptions& o, GateEngine& model) {
  validate(o);
  const ModelConfig& cfg = model.config();
  auto tok = Tokenizer::load(o.model_dir);
  const std::vector<int32_t> hay = haystack_tokens(*tok, o.corpus, o.ctx_max + 1);
  const int64_t passkeys = o.data == "qa" ? std::min<int64_t>(o.passkeys, 4) : o.passkeys;
  AttnWindow window;
  window.kind = o.mask == "block" ? WindowKind::kBlock : WindowKind::kExact;
  window.sink = o.sink;
  window.recent = o.recent;
  window.block = o.block;

  std::filesystem::create_directories(o.out_dir);
  const std::filesystem::path ckpt_path = o.out_dir / "gate_checkpoint.json";
  const std::filesystem::path log_path = o.out_dir / "train_log.json";
  GateOptimizer opt(model.num_gates(), o.lr, o.steps);
  DataState data{std::mt19937_64(o.seed), {}};
  nlohmann::json run_config = {
      {"method", "gate"},
      {"model_name", o.model_dir.string()},
      {"dataset_name", o.corpus.string()},
      {"dataset_format", o.data == "qa" ? "multiple_passkey_qa" : "multiple_passkey"},
      {"num_passkeys", passkeys},
      {"context_length_min", o.ctx_min},
      {"context_length_max", o.ctx_max},
      {"context_lengths_num_intervals", kLengthIntervals},
      {"sink_size", o.sink},
      {"recent_size", o.recent},
      {"streaming_attn_mask", o.mask},
      {"labels", o.labels == "qa" ? "question-and-answer block"
                                  : "every row from sink_size + recent_size on"},
      {"block_size", o.block},
      {"num_steps", o.steps},
      {"lr", o.lr},
      {"reg_weight", o.reg},
      {"optimizer",
       "AdamW betas (0.9, 0.999) eps 1e-8 weight_decay 0, clamp [0,1] before each "
       "step"},
      {"batch_size", 1},
      {"seed", o.seed},
      {"loss",
       "mean over labelled tokens of mean over channels of (h_student - h_teacher)^2 on "
       "the final normed hidden states + reg * mean|gate|"},
  };
  nlohmann::json log = nlohmann::json::array();
  double seconds_before = 0;
  if (o.resume) {
    check(std::filesystem::exists(ckpt_path), "--resume: no checkpoint ", ckpt_path.string());
    nlohmann::json ck;
    try {
      std::ifstream in(ckpt_path);
      ck = nlohmann::json::parse(in);
      opt.load_json(ck.at("optimizer"));
      std::istringstream rs(ck.at("rng").get<std::string>());
      rs >> data.rng;
      check(!rs.fail(), "bad RNG state");
      data.order = ck.at("length_order").get<std::vector<int64_t>>();
      seconds_before = ck.value("seconds", 0.0);
      // Everything but the step count must match the run being resumed.
      nlohmann::json was = ck.at("config");
      // Checkpoints from before --labels existed trained on the question-and-answer block.
      if (!was.contains("labels")) was["labels"] = "question-and-answer block";
      for (const auto& [key, value] : run_config.items())
        if (key != "num_steps" && was.contains(key))
          check(was.at(key) == value, "--resume: the checkpoint was trained with ", key, " = ",
                was.at(key).dump(), ", this run has ", value.dump());
      if (std::filesystem::exists(log_path)) {
        std::ifstream lin(log_path);
        log = nlohmann::json::parse(lin).at("steps");
      }
    } catch (const nlohmann::json::exception& e) {
      fail("--resume: ", ckpt_path.string(), ": ", e.what());
    }
    check(opt.step <= o.steps, "--resume: the checkpoint is at step ", opt.step, ", past --steps ",
          o.steps);
    // The schedule follows the current --steps.
    opt.total_steps = o.steps;
    opt.lr = o.lr;
    // Drop log entries past the checkpoint (written after the last save).
    nlohmann::json kept = nlohmann::json::array();
    for (const auto& e : log)
      if (e.at("step").get<int64_t>() < opt.step) kept.push_back(e);
    log = kept;
  }

  auto save = [&](double seconds) {
    HeadPattern pat;
    pat.num_layers = cfg.num_layers;
    pat.num_kv_heads = cfg.num_kv_heads;
    pat.gates = opt.gates;
    pat.sink_size = o.sink;
    pat.recent_size = o.recent;
    pat.config = run_config;
    pat.config["steps_done"] = opt.step;
    pat.config["device"] = model.device();
    write_head_pattern(pat, o.out_dir);
    write_text(log_path, nlohmann::json{{"steps", log}}.dump(1) + "\n");
    nlohmann::json ck = {{"optimizer", opt.to_json()},
                         {"rng", rng_to_string(data.rng)},
                         {"length_order", data.order},
                         {"seconds", seconds},
                         {"config", run_config}};
    write_text(ckpt_path, ck.dump(1) + "\n");
  };

  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return seconds_before +
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const int64_t first = opt.step;
  while (opt.step < o.steps) {
    const int64_t s = opt.step;
    // Haystack lengths: 50 evenly spaced values in [ctx_min, ctx_max], visited in a fresh seeded
    // permutation every 50 steps.
    if (data.order.empty() || s % kLengthIntervals == 0) {
      data.order.resize(kLengthIntervals);
      std::iota(data.order.begin(), data.order.end(), 0);
      std::shuffle(data.order.begin(), data.order.end(), data.rng);
    }
    const int64_t idx = data.order[static_cast<size_t>(s % kLengthIntervals)];
    PasskeyOptions po;
    po.style = o.data == "qa" ? PasskeyStyle::kQa : PasskeyStyle::kDuo;
    po.num_passkeys = passkeys;
    po.haystack_tokens = o.ctx_min + (o.ctx_max - o.ctx_min) * idx / (kLengthIntervals - 1);
    const PasskeySample sample = make_multi_passkey_sample(*tok, hay, po, data.rng);

    opt.clamp();
    const int64_t label_begin =
        o.labels == "qa" ? sample.label_begin : std::min(o.sink + o.recent, sample.label_begin);
    model.teacher(sample.ids);
    const StudentResult r = model.student(sample.ids, opt.gates, label_begin, window, true);
    std::vector<double> grad;
    const double loss = gate_objective(r, opt.gates, o.reg, &grad);
    check(std::isfinite(loss), "step ", s, ": the loss is not finite (", loss, ")");
    const double lr_now = opt.current_lr();
    opt.update(grad);
    const double secs = elapsed();
    log.push_back({{"step", s},
                   {"loss", loss},
                   {"distill_loss", r.distill},
                   {"reg_loss", loss - r.distill},
                   {"lr", lr_now},
                   {"tokens", sample.ids.size()},
                   {"labelled_tokens", static_cast<int64_t>(sample.ids.size()) - label_begin},
                   {"seconds", secs}});
    if (!o.quiet) {
      const double per = (secs - seconds_before) / static_cast<double>(opt.step - first);
      std::fprintf(stderr,
                   "identify (gate): step %lld/%lld  loss %.6e (distill %.6e)  lr %.3e  %lld "
                   "tokens  %.2f s/step  ETA %.0f s\n",
                   static_cast<long long>(opt.step), static_cast<long long>(o.steps), loss,
                   r.distill, lr_now, static_cast<long long>(sample.ids.size()), per,
                   per * static_cast<double>(o.steps - opt.step));
    }
    if (opt.step % o.save_every == 0 || opt.step == o.steps) save(secs);
  }
  if (first == o.steps) save(elapsed());  // resumed at the end: rewrite the outputs
}

}  // namespace duo::gate
