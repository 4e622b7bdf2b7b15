// Shared helpers for the tests: fixture paths, temp dirs, running the duo binary.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace duo::testing {

inline std::filesystem::path source_dir() {
  return DUO_SOURCE_DIR;
}
inline std::filesystem::path fixture(const std::string& rel) {
  return source_dir() / "tests/fixtures" / rel;
}

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    path_ =
        std::filesystem::temp_directory_path() /
        ("duo_test_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter()++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& s) const { return path_ / s; }

 private:
  static int& counter() {
    static int c = 0;
    return c;
  }
  std::filesystem::path path_;
};

inline void write_file(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

#ifdef DUO_BINARY
// Runs `duo <args>` through the shell, capturing stdout and stderr.
inline CommandResult run_duo(const std::string& args) {
  static int n = 0;
  auto base = std::filesystem::temp_directory_path() /
              ("duo_cmd_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
  std::string cmd = std::string(DUO_BINARY) + " " + args + " >" + base.string() + ".out 2>" +
                    base.string() + ".err </dev/null";
  int rc = std::system(cmd.c_str());
  CommandResult r;
  r.exit_code = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  r.out = read_file(base.string() + ".out");
  r.err = read_file(base.string() + ".err");
  std::filesystem::remove(base.string() + ".out");
  std::filesystem::remove(base.string() + ".err");
  return r;
}
#endif

}  // namespace duo::testing
