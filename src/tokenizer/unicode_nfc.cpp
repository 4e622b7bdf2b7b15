#include "tokenizer/unicode_nfc.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tokenizer/unicode_nfc_data.h"
#include "tokenizer/utf8.h"

namespace duo::utf8 {
namespace {

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

int ccc(uint32_t cp) {
  const auto* end = nfc_data::kCcc + nfc_data::kCccSize;
  const auto* it = std::lower_bound(
      nfc_data::kCcc, end, cp, [](const nfc_data::CccEntry& e, uint32_t c) { return e.cp < c; });
  return it != end && it->cp == cp ? it->ccc : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  const auto* end = nfc_data::kDecomp + nfc_data::kDecompSize;
  const auto* it =
      std::lower_bound(nfc_data::kDecomp, end, cp,
                       [](const nfc_data::DecompEntry& e, uint32_t c) { return e.cp < c; });
  if (it != end && it->cp == cp) {
    out.insert(out.end(), nfc_data::kDecompData + it->offset,
               nfc_data::kDecompData + it->offset + it->length);
  } else {
    out.push_back(cp);
  }
}

// Primary composite of (a, b), or 0.
uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto* end = nfc_data::kCompose + nfc_data::kComposeSize;
  const auto* it =
      std::lower_bound(nfc_data::kCompose, end, std::make_pair(a, b),
                       [](const nfc_data::ComposeEntry& e, std::pair<uint32_t, uint32_t> k) {
                         return e.first != k.first ? e.first < k.first : e.second < k.second;
                       });
  return it != end && it->first == a && it->second == b ? it->composite : 0;
}

// NFC of a run of valid code points.
void nfc_run(const std::vector<uint32_t>& cps, std::string& out) {
  std::vector<uint32_t> d;
  d.reserve(cps.size() + 4);
  for (uint32_t cp : cps) decompose(cp, d);
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  std::vector<int> cls(d.size());
  for (size_t i = 0; i < d.size(); ++i) cls[i] = ccc(d[i]);
  for (size_t i = 0; i < d.size();) {
    if (cls[i] == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && cls[j] != 0) ++j;
    for (size_t a = i + 1; a < j; ++a)  // insertion sort (runs are tiny), stable
      for (size_t b = a; b > i && cls[b - 1] > cls[b]; --b) {
        std::swap(cls[b - 1], cls[b]);
        std::swap(d[b - 1], d[b]);
      }
    i = j;
  }
  // Canonical composition (UAX #15 reference algorithm).
  std::vector<uint32_t> r;
  r.reserve(d.size());
  int starter = -1;
  int last_class = -1;
  for (size_t i = 0; i < d.size(); ++i) {
    uint32_t ch = d[i];
    int c = cls[i];
    if (starter >= 0 && (last_class < c || last_class == 0)) {
      uint32_t comp = compose(r[starter], ch);
      if (comp != 0) {
        r[starter] = comp;
        continue;
      }
    }
    if (c == 0) starter = static_cast<int>(r.size());
    last_class = c;
    r.push_back(ch);
  }
  for (uint32_t cp : r) append(out, cp);
}

}  // namespace

std::string nfc(std::string_view text) {
  if (std::all_of(text.begin(), text.end(), [](char c) { return (c & 0x80) == 0; }))
    return std::string(text);
  std::string out;
  out.reserve(text.size());
  std::vector<uint32_t> run;
  size_t i = 0;
  while (i < text.size()) {
    size_t valid = valid_prefix(text.substr(i));
    size_t end = i + valid;
    run.clear();
    while (i < end) run.push_back(next_code_point(text, i));
    nfc_run(run, out);
    if (i < text.size()) out += text[i++];  // invalid byte: pass through
  }
  return out;
}

}  // namespace duo::utf8
