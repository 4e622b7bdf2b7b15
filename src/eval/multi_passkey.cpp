#include "eval/multi_passkey.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace duo {

namespace {

const char* kNato[] = {"alpha",  "bravo",   "charlie", "delta",  "echo",   "foxtrot", "golf",
                       "hotel",  "india",   "juliet",  "kilo",   "lima",   "mike",    "november",
                       "oscar",  "papa",    "quebec",  "romeo",  "sierra", "tango",   "uniform",
                       "victor", "whiskey", "xray",    "yankee", "zulu"};
const char* kOrdinals[] = {"first", "second",  "third",  "fourth", "fifth",
                           "sixth", "seventh", "eighth", "ninth",  "tenth"};

// The demo models' four numeric wordings and their first questions (tools/make_needle_data.py).
const char* kQaNeedles[] = {
    "The pass key is {n}. Remember it. {n} is the pass key.", "The secret passkey is {n}.",
    "Remember this number: the access code is {n}.", "The magic number is {n}. Keep it in mind."};
const char* kQaQuestions[] = {"What is the pass key?", "What is the secret passkey?",
                              "What is the access code?", "What is the magic number?"};

std::string fill(std::string tmpl, const std::string& n) {
  for (size_t at; (at = tmpl.find("{n}")) != std::string::npos;) tmpl.replace(at, 3, n);
  return tmpl;
}

}  // namespace

PasskeySample make_multi_passkey_sample(const Tokenizer& tok, const std::vector<int32_t>& haystack,
                                        const PasskeyOptions& opt, std::mt19937_64& rng) {
  const bool qa = opt.style == PasskeyStyle::kQa;
  check(opt.num_passkeys >= 1 && opt.num_passkeys <= (qa ? 4 : 10), "passkeys: 1..", qa ? 4 : 10,
        " per sample in this style, got ", opt.num_passkeys);
  check(opt.haystack_tokens > 0, "passkeys: haystack length must be positive");
  check(static_cast<int64_t>(haystack.size()) >= opt.haystack_tokens, "passkeys: haystack holds ",
        haystack.size(), " tokens, need ", opt.haystack_tokens);
  const int64_t start = static_cast<int64_t>(
      rng() % static_cast<uint64_t>(haystack.size() - opt.haystack_tokens + 1));
  const int64_t n = opt.haystack_tokens;
  // The passkeys go at distinct token depths drawn from [min_depth, max_depth) x n: ask for room
  // for twice as many, so that drawing them ends quickly.
  check(opt.min_depth >= 0 && opt.max_depth <= 1 && opt.min_depth < opt.max_depth,
        "passkeys: depths need 0 <= min < max <= 1, got ", opt.min_depth, " and ", opt.max_depth);
  const double span = (opt.max_depth - opt.min_depth) * static_cast<double>(n);
  check(span >= 2.0 * static_cast<double>(opt.num_passkeys), "passkeys: a haystack of ", n,
        " tokens is too short for ", opt.num_passkeys, " passkeys at depths ", opt.min_depth, "..",
        opt.max_depth, " (need at least ",
        static_cast<int64_t>(std::ceil(2.0 * static_cast<double>(opt.num_passkeys) /
                                       (opt.max_depth - opt.min_depth))),
        " tokens; raise --ctx-min)");
  PasskeySample s;
  std::vector<int64_t> depths;
  std::uniform_real_distribution<double> u(opt.min_depth, opt.max_depth);
  while (static_cast<int64_t>(depths.size()) < opt.num_passkeys) {
    int64_t d = static_cast<int64_t>(u(rng) * static_cast<double>(n));
    if (std::find(depths.begin(), depths.end(), d) == depths.end()) depths.push_back(d);
  }
  std::sort(depths.begin(), depths.end());
  s.ids = tok.encode("", true);  // BOS when the tokenizer adds one
  int64_t cursor = 0;
  for (int64_t k = 0; k < opt.num_passkeys; ++k) {
    std::string key;
    if (qa) {
      key = std::to_string(10000 + rng() % 90000);
    } else {
      for (int64_t w = 0; w < opt.words_per_passkey; ++w) {
        if (w > 0) key += ' ';
        key += kNato[rng() % 26];
      }
    }
    s.passkeys.push_back(key);
    s.ids.insert(s.ids.end(), haystack.begin() + start + cursor,
                 haystack.begin() + start + depths[k]);
    cursor = depths[k];
    s.needle_positions.push_back(static_cast<int64_t>(s.ids.size()));
    std::string text;
    if (qa) {
      text.append("\n").append(fill(kQaNeedles[k], key)).append("\n");
    } else {
      text.append("\n\nRemember this sequence of words, it's the ").append(kOrdinals[k]);
      text.append(" passkey to the vault: ").append(key).append("\n\n");
    }
    auto needle = tok.encode(text, false);
    s.needle_lengths.push_back(static_cast<int64_t>(needle.size()));
    s.ids.insert(s.ids.end(), needle.begin(), needle.end());
  }
  s.ids.insert(s.ids.end(), haystack.begin() + start + cursor, haystack.begin() + start + n);
  if (!qa) {
    auto close = tok.encode("\n\nThe book ends here.\n\n", false);
    s.ids.insert(s.ids.end(), close.begin(), close.end());
  }
  s.label_begin = static_cast<int64_t>(s.ids.size());
  for (int64_t k = 0; k < opt.num_passkeys; ++k) {
    std::string text;
    if (qa) {
      text.append(k == 0 ? "\n\nQuestion: " : "\nQuestion: ").append(kQaQuestions[k]);
      text.append("\nAnswer: ").append(s.passkeys[k]).append("\n");
    } else {
      text.append("Based on the content of the book, what is the ").append(kOrdinals[k]);
      text.append(" passkey to the vault?\nPasskey: ").append(s.passkeys[k]).append("\n\n");
    }
    auto block = tok.encode(text, false);
    s.ids.insert(s.ids.end(), block.begin(), block.end());
  }
  return s;
}

}  // namespace duo
