// Small file helpers shared by the loaders; errors name the path.
#pragma once

#include <cstddef>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace duo {

// Whole file as a string; throws Error naming the path if it is missing or unreadable.
std::string read_text_file(const std::filesystem::path& path);

// The text of a .txt file, or of every .txt file under a directory (recursively, in path order),
// joined by blank lines; throws Error naming the path if it is missing or holds no .txt file.
std::string read_text_corpus(const std::filesystem::path& path);

// Writes j (dump(indent)) and a newline to path; throws Error naming the path if it cannot.
void write_json_file(const std::filesystem::path& path, const nlohmann::json& j, int indent = 1);

// Parses a JSON file; throws Error naming the path and the parse position on bad JSON.
nlohmann::json read_json_file(const std::filesystem::path& path);

// Read-only memory map of a whole file. Movable, not copyable.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return data_; }
  size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  const unsigned char* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace duo
