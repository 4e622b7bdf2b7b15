#include "cli/backend_choice.h"

#include "core/error.h"

#ifdef DUO_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace duo::cli {

void add_backend_option(CLI::App* cmd, std::string& choice) {
  cmd->add_option("--backend", choice,
                  "auto (CUDA when a GPU is present), cpu, cpu-reference or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cpu-reference", "cuda"}));
}

std::string resolve_backend(const std::string& choice) {
  if (choice != "auto") return choice;
#ifdef DUO_HAVE_CUDA
  if (cuda::device_count() > 0) return "cuda";
#endif
  return "cpu";
}

std::unique_ptr<Backend> make_backend(const std::string& choice) {
  const std::string b = resolve_backend(choice);
  if (b == "cpu-reference") return make_cpu_backend(CpuMode::kReference);
  if (b == "cpu") return make_cpu_backend(CpuMode::kFast);
  check(b == "cuda", "--backend: expected auto, cpu, cpu-reference or cuda, got '", choice, "'");
#ifdef DUO_HAVE_CUDA
  check(cuda::device_count() > 0, "--backend cuda: no CUDA device found on this machine");
  return make_cuda_backend(0);
#else
  fail("--backend cuda: this duo was built without CUDA (rebuild with nvcc available)");
#endif
}

std::string device_name(const std::string& resolved) {
#ifdef DUO_HAVE_CUDA
  if (resolved == "cuda") return cuda::device_name(0);
#endif
  (void)resolved;
  return "cpu";
}

int64_t driver_used_bytes(const std::string& resolved) {
#ifdef DUO_HAVE_CUDA
  if (resolved == "cuda") return cuda::device_memory_used(0);
#endif
  (void)resolved;
  return 0;
}

}  // namespace duo::cli
