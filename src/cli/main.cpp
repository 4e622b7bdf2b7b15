#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"duo: long-context LLM inference with DuoAttention (retrieval + streaming heads)"};
  app.set_version_flag("--version", "duo 0.1.0");
  app.require_subcommand(1);
  duo::cli::add_info_command(app);
  duo::cli::add_run_command(app);
  duo::cli::add_niah_command(app);
  duo::cli::add_identify_command(app);
  duo::cli::add_pattern_command(app);
  duo::cli::add_bench_command(app);
  duo::cli::add_perplexity_command(app);
  duo::cli::set_command_line(argc, argv);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const duo::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "duo: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    std::fprintf(stderr, "duo: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "duo: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
