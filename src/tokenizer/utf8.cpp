#include "tokenizer/utf8.h"

#include <unordered_map>

namespace duo::utf8 {
namespace {

// Length of a valid sequence starting at s[i], or 0 if invalid/incomplete; `need` gets the expected
// length for a valid lead byte and `got` how many bytes matched.
size_t check_seq(std::string_view s, size_t i, size_t* need, size_t* got) {
  auto b = static_cast<unsigned char>(s[i]);
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b < 0x80) {
    *need = *got = 1;
    return 1;
  } else if (b >= 0xC2 && b <= 0xDF) {
    n = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    n = 3;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;
  } else if (b >= 0xF0 && b <= 0xF4) {
    n = 4;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;
  } else {
    *need = 1;
    *got = 0;
    return 0;
  }
  *need = n;
  size_t k = 1;
  for (; k < n && i + k < s.size(); ++k) {
    auto c = static_cast<unsigned char>(s[i + k]);
    unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (c < l || c > h) break;
  }
  *got = k;
  return k == n ? n : 0;
}

}  // namespace

size_t char_len(std::string_view s, size_t i) {
  size_t need, got;
  size_t n = check_seq(s, i, &need, &got);
  return n == 0 ? 1 : n;
}

void append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

size_t valid_prefix(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t need, got;
    size_t n = check_seq(s, i, &need, &got);
    if (n == 0) break;
    i += n;
  }
  return i;
}

size_t incomplete_tail(std::string_view s) {
  size_t start = s.size() >= 3 ? s.size() - 3 : 0;
  for (size_t i = start; i < s.size(); ++i) {
    auto b = static_cast<unsigned char>(s[i]);
    if ((b & 0xC0) == 0x80) continue;
    size_t need, got;
    size_t n = check_seq(s, i, &need, &got);
    if (n > 0) {
      i += n - 1;
      continue;
    }
    if (got > 0 && i + got == s.size() && need > got) return s.size() - i;
    i += (got > 0 ? got : 1) - 1;  // invalid: lossy() replaces it; keep scanning after it
  }
  return 0;
}

std::string lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    size_t need, got;
    size_t n = check_seq(s, i, &need, &got);
    if (n > 0) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out.append(kReplacement);
      i += got == 0 ? 1 : got;
    }
  }
  return out;
}

bool is_valid(std::string_view s) {
  return valid_prefix(s) == s.size();
}

const std::array<std::string, 256>& byte_to_unicode() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      append(t[b], cp);
    }
    return t;
  }();
  return table;
}

int unicode_to_byte(uint32_t cp) {
  static const std::unordered_map<uint32_t, int> inverse = [] {
    std::unordered_map<uint32_t, int> m;
    const auto& t = byte_to_unicode();
    for (int b = 0; b < 256; ++b) {
      size_t i = 0;
      m[next_code_point(t[b], i)] = b;
    }
    return m;
  }();
  auto it = inverse.find(cp);
  return it == inverse.end() ? -1 : it->second;
}

uint32_t next_code_point(std::string_view s, size_t& i) {
  auto b = static_cast<unsigned char>(s[i]);
  size_t n = char_len(s, i);
  uint32_t cp;
  if (n == 1) {
    cp = b;
  } else if (n == 2) {
    cp = b & 0x1F;
  } else if (n == 3) {
    cp = b & 0x0F;
  } else {
    cp = b & 0x07;
  }
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

}  // namespace duo::utf8
