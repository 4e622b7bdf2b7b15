#include "eval/niah.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <iterator>
#include <random>
#include <set>
#include <sstream>
#include <utility>

#include "core/error.h"
#include "core/file_util.h"
#include "engine/generate.h"

namespace duo {

Needle classic_sentence_needle() {
  const std::string s =
      "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny "
      "day.";
  return {s, "What is the best thing to do in San Francisco?", s, {}};
}

Needle passkey_needle(uint64_t seed) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 17);
  const std::string n = std::to_string(10000 + rng() % 90000);
  return {"The pass key is " + n + ". Remember it. " + n + " is the pass key.",
          "What is the pass key?",
          n,
          {}};
}

Needle kv_needle(uint64_t seed, int64_t pairs) {
  check(pairs >= 1 && pairs <= 256, "key-value pairs must be in [1, 256], got ", pairs);
  // The demo models' training vocabulary for keys (tools/make_needle_data.py KV_ADJ, KV_NOUN).
  static const char* const kAdj[] = {
      "red",    "blue",   "green",   "silver", "golden", "quiet",    "rapid",    "ancient",
      "frozen", "hidden", "bright",  "dark",   "little", "northern", "southern", "wild",
      "gentle", "iron",   "crystal", "hollow", "lucky",  "purple",   "sleepy",   "brave",
      "copper", "misty",  "royal",   "sunny",  "stormy", "velvet"};
  static const char* const kNoun[] = {
      "falcon", "river",     "lantern", "castle",  "meadow",   "harbor", "comet",   "forest",
      "engine", "garden",    "tower",   "island",  "mountain", "violin", "compass", "anchor",
      "bridge", "cathedral", "desert",  "glacier", "kettle",   "mirror", "orchard", "pyramid",
      "rocket", "saddle",    "temple",  "tunnel",  "valley",   "window"};
  std::mt19937_64 rng(seed * 0xD1B54A32D192ED03ull + 29);
  std::set<std::string> used;
  Needle n;
  while (static_cast<int64_t>(used.size()) < pairs) {
    const std::string key =
        std::string(kAdj[rng() % std::size(kAdj)]) + "-" + kNoun[rng() % std::size(kNoun)];
    if (!used.insert(key).second) continue;
    const std::string value = std::to_string(100000 + rng() % 900000);
    const std::string text = "The special magic number for " + key + " is: " + value + ".";
    if (n.needle.empty()) {
      n = {text, "What is the special magic number for " + key + "?", value, {}};
    } else {
      n.distractors.push_back(text);
    }
  }
  return n;
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
    text = read_text_corpus(dir);
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
  const std::vector<int32_t> question =
      tok.encode("\n\nQuestion: " + n.question + "\nAnswer:", false);
  // The asked needle first, then the distractors with their depths.
  std::vector<std::vector<int32_t>> needles{tok.encode("\n" + n.needle + "\n", false)};
  std::vector<double> depths{depth_percent};
  const double k = static_cast<double>(n.distractors.size());
  for (size_t i = 0; i < n.distractors.size(); ++i) {
    needles.push_back(tok.encode("\n" + n.distractors[i] + "\n", false));
    depths.push_back(
        std::fmod(depth_percent + static_cast<double>(i + 1) * 100.0 / (k + 1), 100.0));
  }
  int64_t fixed = static_cast<int64_t>(bos.size() + question.size());
  for (const auto& t : needles) fixed += static_cast<int64_t>(t.size());
  const int64_t hay = length - fixed;
  check(hay >= 0, "length ", length, " is too short for the needle", needles.size() > 1 ? "s" : "",
        " and question (", fixed, " tokens)");
  check(static_cast<int64_t>(haystack.size()) >= hay, "haystack holds ", haystack.size(),
        " tokens, need ", hay);
  // Insertion points in haystack tokens; needles at the same point keep their order above.
  std::vector<std::pair<int64_t, size_t>> at;
  for (size_t i = 0; i < needles.size(); ++i)
    at.emplace_back(
        static_cast<int64_t>(std::llround(depths[i] / 100.0 * static_cast<double>(hay))), i);
  std::stable_sort(at.begin(), at.end(),
                   [](const auto& x, const auto& y) { return x.first < y.first; });
  NiahPrompt p;
  p.ids = bos;
  int64_t h = 0;
  for (const auto& [d, i] : at) {
    p.ids.insert(p.ids.end(), haystack.begin() + h, haystack.begin() + d);
    h = d;
    if (i == 0) p.needle_position = static_cast<int64_t>(p.ids.size());
    p.ids.insert(p.ids.end(), needles[i].begin(), needles[i].end());
  }
  p.ids.insert(p.ids.end(), haystack.begin() + h, haystack.begin() + hay);
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

double token_nll(const float* logits, int64_t vocab, int32_t target) {
  check(target >= 0 && target < vocab, "token_nll: target ", target, " outside the vocabulary");
  double mx = logits[0];
  for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  return mx + std::log(sum) - static_cast<double>(logits[target]);
}

double continuation_nll(Model& model, KVCache& cache, const std::vector<int32_t>& prompt,
                        const std::vector<int32_t>& continuation, int64_t chunk) {
  check(!prompt.empty() && !continuation.empty(), "continuation_nll: empty prompt or continuation");
  check(chunk > 0, "continuation_nll: chunk must be positive");
  check(cache.length() == 0, "continuation_nll: the cache must be empty");
  const int64_t vocab = model.config().vocab_size;
  const std::vector<float> last =  // predicts continuation[0]
      model.forward(prefill_to_last_chunk(model, cache, prompt, chunk), cache, 1);
  double sum = token_nll(last.data(), vocab, continuation[0]);
  const int64_t k = static_cast<int64_t>(continuation.size());
  if (k > 1) {  // continuation[0 .. k-2] predicts continuation[1 .. k-1]
    const std::span<const int32_t> rest(continuation.data(), static_cast<size_t>(k - 1));
    const std::vector<float> logits = model.forward(rest, cache, k - 1);
    for (int64_t i = 1; i < k; ++i)
      sum += token_nll(&logits[(i - 1) * vocab], vocab, continuation[i]);
  }
  check(std::isfinite(sum),
        "answer NLL: non-finite logits (the weights or config.json produce NaN "
        "/ Inf)");
  return sum / static_cast<double>(k);
}

}  // namespace duo
