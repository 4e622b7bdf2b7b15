// --backend auto|cpu|cpu-reference|cuda, shared by the subcommands that run a model.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <string>

#include "engine/backend.h"

namespace duo::cli {

void add_backend_option(CLI::App* cmd, std::string& choice);
// auto = cuda when this build has it and a GPU is present, else cpu. Clear errors for cuda on a
// build without CUDA or a machine without a GPU.
std::unique_ptr<Backend> make_backend(const std::string& choice);
// What the choice resolves to: "cpu", "cpu-reference" or "cuda".
std::string resolve_backend(const std::string& choice);
// Card name for reports ("cpu" for the CPU backends).
std::string device_name(const std::string& resolved);
// Device memory in use according to the driver (0 on the CPU).
int64_t driver_used_bytes(const std::string& resolved);

}  // namespace duo::cli
