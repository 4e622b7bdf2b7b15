#include "cli/commands.h"
namespace duo::cli {
void add_run_command(CLI::App& app) { app.add_subcommand("run", "Generate text"); }
}  // namespace duo::cli
