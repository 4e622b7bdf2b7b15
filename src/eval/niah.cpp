#include "eval/niah.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <random>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/file_util.h"

namespace duo {

Needle classic_sentence_needle() {
  const std::string s =
      "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny "
      "day.";
  return {s, "What is the best thing to do in San Francisco?", s};
}

Needle passkey_needle(uint64_t seed) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 17);
  const std::string n = std::to_string(10000 + rng() % 90000);
  return {"The pass key is " + n + ". Remember it. " + n + " is the pass key.",
          "What is the pass key?", n};
}

std::vector<int32_t> haystack_tokens(const Tokenizer& tok, const std::filesystem::path& dir,
                                     int64_t min_tokens) {
  std::string text;
  if (dir.empty()) {
    text =
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
        "again. ";
  } else {
    std::error_code ec;
    check(std::filesystem::is_directory(dir, ec), dir.string(), ": haystack directory not found");
    std::vector<std::filesystem::path> files;
    for (const auto& e : std::filesystem::recursive_directory_iterator(dir))
      if (e.is_regular_file() && e.path().extension() == ".txt") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    check(!files.empty(), dir.string(), ": no .txt files to use as haystack");
    for (const auto& f : files) text += read_text_file(f) + "\n\n";
  }
  std::vector<int32_t> unit = tok.encode(text, false);
  check(!unit.empty(), "haystack text tokenizes to nothing");
  std::vector<int32_t> out;
  while (static_cast<int64_t>(out.size()) < min_tokens)
    out.insert(out.end(), unit.begin(), unit.end());
  return out;
}

NiahPrompt build_niah_prompt(const Tokenizer& tok, const std::vector<int32_t>& haystack,
                             const Needle& n, int64_t length, double depth_percent) {
  check(depth_percent >= 0 && depth_percent <= 100, "depth must be in [0, 100], got ",
        depth_percent);
  const std::vector<int32_t> bos = tok.encode("", true);
  const std::vector<int32_t> needle = tok.encode("\n" + n.needle + "\n", false);
  const std::vector<int32_t> question =
      tok.encode("\n\nQuestion: " + n.question + "\nAnswer:", false);
  const int64_t fixed = static_cast<int64_t>(bos.size() + needle.size() + question.size());
  const int64_t hay = length - fixed;
  check(hay >= 0, "length ", length, " is too short for the needle and question (", fixed,
        " tokens)");
  check(static_cast<int64_t>(haystack.size()) >= hay, "haystack holds ", haystack.size(),
        " tokens, need ", hay);
  const int64_t d =
      static_cast<int64_t>(std::llround(depth_percent / 100.0 * static_cast<double>(hay)));
  NiahPrompt p;
  p.ids = bos;
  p.ids.insert(p.ids.end(), haystack.begin(), haystack.begin() + d);
  p.needle_position = static_cast<int64_t>(p.ids.size());
  p.ids.insert(p.ids.end(), needle.begin(), needle.end());
  p.ids.insert(p.ids.end(), haystack.begin() + d, haystack.begin() + hay);
  p.ids.insert(p.ids.end(), question.begin(), question.end());
  return p;
}

namespace {

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::vector<std::string> words(const std::string& s) {
  std::vector<std::string> out;
  std::string w;
  for (char c : s + " ") {
    if (std::isalnum(static_cast<unsigned char>(c))) {
      w += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    } else if (!w.empty()) {
      out.push_back(w);
      w.clear();
    }
  }
  return out;
}

}  // namespace

NiahScore score_answer(const std::string& generated, const std::string& answer) {
  const std::string line = trim(generated.substr(0, generated.find('\n')));
  NiahScore s;
  s.exact = line == trim(answer);
  const auto want = words(answer);
  const auto got_list = words(line);
  const std::set<std::string> got(got_list.begin(), got_list.end());
  int64_t hit = 0;
  for (const auto& w : want) hit += got.count(w) ? 1 : 0;
  s.words = want.empty() ? 0.0 : static_cast<double>(hit) / static_cast<double>(want.size());
  return s;
}

}  // namespace duo
