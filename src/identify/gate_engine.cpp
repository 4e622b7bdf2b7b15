#include "identify/gate_engine.h"

#include "core/error.h"

namespace duo::gate {

namespace {

class CpuGateEngine final : public GateEngine {
 public:
  explicit CpuGateEngine(const std::filesystem::path& dir) : model_(dir) {}
  const ModelConfig& config() const override { return model_.config(); }
  std::string device() const override { return "cpu"; }
  void teacher(std::span<const int32_t> ids) override { teacher_ = model_.teacher(ids); }
  StudentResult student(std::span<const int32_t> ids, const std::vector<double>& gates,
                        int64_t label_begin, const AttnWindow& w, bool backward) override {
    check(teacher_.n > 0, "gate engine: student pass before any teacher pass");
    return model_.student(ids, teacher_, gates, label_begin, w, backward);
  }

 private:
  GateModel<float> model_;
  TeacherPass<float> teacher_;
};

}  // namespace

std::unique_ptr<GateEngine> make_cpu_gate_engine(const std::filesystem::path& model_dir) {
  return std::make_unique<CpuGateEngine>(model_dir);
}

}  // namespace duo::gate
