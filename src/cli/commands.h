// Each `duo` subcommand registers itself on the top-level CLI11 app. Callbacks throw duo::Error on
// bad input; main() turns that into one "duo: error: ..." line and exit code 1.
#pragma once

#include <CLI/CLI.hpp>

namespace duo::cli {

void add_info_command(CLI::App& app);
void add_run_command(CLI::App& app);
void add_niah_command(CLI::App& app);
void add_identify_command(CLI::App& app);
void add_pattern_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_perplexity_command(CLI::App& app);

}  // namespace duo::cli
