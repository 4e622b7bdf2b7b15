#include "cli/commands.h"
namespace duo::cli {
void add_info_command(CLI::App& app) { app.add_subcommand("info", "Describe a model directory"); }
}  // namespace duo::cli
