#include "cli/backend_choice.h"

#include "core/error.h"

namespace duo::cli {

void add_backend_option(CLI::App* cmd, std::string& choice) {
  cmd->add_option("--backend", choice, "auto (CUDA when a GPU is present), cpu, cpu-reference or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cpu-reference", "cuda"}));
}

std::unique_ptr<Backend> make_backend(const std::string& choice) {
  if (choice == "cpu-reference") return make_cpu_backend(CpuMode::kReference);
  if (choice == "cuda") fail("--backend cuda: this build of duo has no CUDA backend yet");
  return make_cpu_backend(CpuMode::kFast);
}

}  // namespace duo::cli
