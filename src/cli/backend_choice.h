// --backend auto|cpu|cpu-reference|cuda, shared by the subcommands that run a model.
#pragma once

#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "engine/backend.h"

namespace duo::cli {

void add_backend_option(CLI::App* cmd, std::string& choice);
// auto = cuda when this build has it and a GPU is present, else cpu.
std::unique_ptr<Backend> make_backend(const std::string& choice);

}  // namespace duo::cli
