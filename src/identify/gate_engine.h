// What the gate trainer needs from a model, whatever runs it: a teacher pass (full attention,
// kept inside the engine until the next teacher call) and a student pass with its loss and gate
// gradient (identify/gate_model.h gives the semantics). The CPU engine wraps GateModel<float>; the
// CUDA engine (cuda/gate_cuda.h) runs the same maths on the GPU. One trainer drives both.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "identify/gate_model.h"
#include "model/config.h"

namespace duo::gate {

class GateEngine {
 public:
  virtual ~GateEngine() = default;
  virtual const ModelConfig& config() const = 0;
  int64_t num_gates() const { return config().num_layers * config().num_kv_heads; }
  // "cpu" or the CUDA card's name (for logs and reports).
  virtual std::string device() const = 0;
  // Runs the teacher over ids and keeps what the student needs (O_full per layer, final hidden).
  virtual void teacher(std::span<const int32_t> ids) = 0;
  // The student against the last teacher pass (same ids); loss and, when `backward`, d loss / d a.
  virtual StudentResult student(std::span<const int32_t> ids, const std::vector<double>& gates,
                                int64_t label_begin, const AttnWindow& w, bool backward) = 0;
  // Peak device bytes the engine allocated since the last reset (0 on the CPU).
  virtual int64_t peak_device_bytes() const { return 0; }
  virtual void reset_peak() {}
};

// GateModel<float> on the host.
std::unique_ptr<GateEngine> make_cpu_gate_engine(const std::filesystem::path& model_dir);

}  // namespace duo::gate
