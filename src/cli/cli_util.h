// Helpers shared by the subcommands: human-readable sizes, terminal detection.
#pragma once

#include <cstdint>
#include <string>

namespace duo::cli {

std::string human_bytes(int64_t bytes);  // "1.50 MiB"
std::string human_count(int64_t n);      // "1.23M"
bool stderr_is_terminal();
// The process command line (set once by main), for reports.
void set_command_line(int argc, char** argv);
const std::string& command_line();

}  // namespace duo::cli
