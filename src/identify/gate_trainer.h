// The gate optimisation of duoattention.md section 4 end to end: AdamW on the L x H_kv gates with
// the release's clamp and schedule, the multi-passkey data, checkpoints, pattern output and the
// loss log. `duo identify --method gate` calls train_gates.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "identify/gate_engine.h"

namespace duo::gate {

// Learning-rate factor at step s (0-based) of N: min(1, max((s+1)/(N/5), 0.1), max((N-s)/(N/5),
// 0.1)) with N/5 as a real number (warm-up over N/5 steps from a floor of 0.1, plateau, decay to
// 0.1 over the last N/5 steps).
double lr_factor(int64_t s, int64_t N);

// AdamW (no weight decay) over the gates. The caller clamps the gates to [0,1] BEFORE each step's
// forward pass (clamp()); update() then moves them and may leave them slightly outside [0,1], as
// the published patterns are.
struct GateOptimizer {
  std::vector<double> gates;  // initialised to 1.0
  std::vector<double> m, v;   // Adam moments
  int64_t step = 0;           // completed updates
  double lr = 0.02, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int64_t total_steps = 2000;

  GateOptimizer(int64_t num_gates, double lr, int64_t total_steps);
  double current_lr() const { return lr * lr_factor(step, total_steps); }
  void clamp();
  void update(const std::vector<double>& grad);

  nlohmann::json to_json() const;
  void load_json(const nlohmann::json& j);  // throws duo::Error on a malformed checkpoint
};

struct GateTrainOptions {
  std::filesystem::path model_dir, corpus, out_dir;
  int64_t steps = 2000;
  double lr = 0.02;
  double reg = 0.05;
  int64_t ctx_min = 1000;
  int64_t ctx_max = 32000;
  int64_t sink = 128;
  int64_t recent = 256;
  int64_t passkeys = 10;
  uint64_t seed = 42;
  std::string data = "duo";    // duo | qa
  std::string mask = "exact";  // exact | block
  // Rows the loss averages over: qa = the question-and-answer block (section 4, the paper); all =
  // every row from sink + recent on (where a streaming head's keys first differ from full
  // attention), haystack included, so the gates also keep the model's text predictions.
  std::string labels = "qa";
  int64_t block = 128;  // block size of --mask block
  int64_t save_every = 50;
  bool resume = false;
  bool quiet = false;
};

// Validates the options (duo::Error with the flag's name), trains, and writes into out_dir:
//   full_attention_heads.tsv + config.json  the pattern (gates as trained) every save_every steps
//                                           and at the end,
//   train_log.json                          the loss curve,
//   gate_checkpoint.json                    gates, Adam moments, step and RNG state for --resume.
// `engine` runs the teacher and student passes (CPU or CUDA, identify/gate_engine.h); it must hold
// the model of o.model_dir. The overload without it trains on the CPU.
void train_gates(const GateTrainOptions& o, GateEngine& engine);
void train_gates(const GateTrainOptions& o);

}  // namespace duo::gate
