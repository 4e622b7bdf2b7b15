#include "core/file_util.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/error.h"

namespace duo {

std::string read_text_file(const std::filesystem::path& path) {
  std::error_code ec;
  check(std::filesystem::exists(path, ec), path.string(), ": file not found");
  check(!std::filesystem::is_directory(path, ec), path.string(),
        ": expected a file, found a directory");
  // A device or FIFO (/dev/zero, a pipe) would be read without end.
  check(std::filesystem::is_regular_file(path, ec), path.string(), ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  check(in.good(), path.string(), ": cannot open for reading");
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

std::string read_text_corpus(const std::filesystem::path& path) {
  std::error_code ec;
  check(std::filesystem::exists(path, ec), path.string(), ": not found");
  if (!std::filesystem::is_directory(path, ec)) return read_text_file(path);
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::recursive_directory_iterator(path))
    if (e.is_regular_file() && e.path().extension() == ".txt") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  check(!files.empty(), path.string(), ": no .txt files");
  std::string text;
  for (const auto& f : files) text += read_text_file(f) + "\n\n";
  return text;
}

nlohmann::json read_json_file(const std::filesystem::path& path) {
  std::string text = read_text_file(path);
  // Deeper documents are rejected while parsing: copying or printing one recurses per level and
  // would overflow the stack (no real config or tokenizer nests more than a few levels).
  constexpr int kMaxDepth = 256;
  const auto depth_limit = [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    check(depth <= kMaxDepth, path.string(), ": JSON nested deeper than ", kMaxDepth, " levels");
    return true;
  };
  try {
    return nlohmann::json::parse(text, depth_limit);
  } catch (const nlohmann::json::parse_error& e) {
    fail(path.string(), ": invalid JSON (", e.what(), ")");
  }
}

void write_json_file(const std::filesystem::path& path, const nlohmann::json& j, int indent) {
  std::ofstream out(path);
  check(out.good(), path.string(), ": cannot write");
  out << j.dump(indent) << "\n";
  check(out.good(), path.string(), ": error while writing");
}

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  check(fd >= 0, path.string(), ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path.string(), ": not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(path.string(), ": mmap failed (", std::strerror(errno), ")");
    }
    data_ = static_cast<const unsigned char*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), size_);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)), data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), size_);
    path_ = std::move(other.path_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

}  // namespace duo
