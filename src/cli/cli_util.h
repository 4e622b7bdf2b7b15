// Helpers shared by the subcommands: human-readable sizes, terminal detection.
#pragma once

#include <cstdint>
#include <string>

namespace duo::cli {

std::string human_bytes(int64_t bytes);  // "1.50 MiB"
std::string human_count(int64_t n);      // "1.23M"
bool stderr_is_terminal();

}  // namespace duo::cli
