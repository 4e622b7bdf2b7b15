// UTF-8 helpers for the tokenizer: code-point iteration, lossy decoding (U+FFFD for invalid
// bytes, "maximal subpart" policy like Rust's String::from_utf8_lossy) and the GPT-2 byte <->
// unicode table used by byte-level BPE.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace duo::utf8 {

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length in bytes of the code point starting at s[i] (1 for invalid lead bytes).
size_t char_len(std::string_view s, size_t i);

// Appends code point cp as UTF-8.
void append(std::string& out, uint32_t cp);

// Length of the longest prefix of `s` that is valid, complete UTF-8.
size_t valid_prefix(std::string_view s);

// If bytes[i..] is a valid but incomplete multi-byte sequence running to the end of `bytes`,
// returns how many bytes it has (1..3); otherwise 0.
size_t incomplete_tail(std::string_view bytes);

// Lossy conversion: invalid maximal subparts become one U+FFFD each.
std::string lossy(std::string_view bytes);

// Whether `s` is entirely valid UTF-8.
bool is_valid(std::string_view s);

// GPT-2 bytes_to_unicode: byte -> UTF-8 string of its printable stand-in.
const std::array<std::string, 256>& byte_to_unicode();
// Inverse: code point -> byte, or -1 when the code point is not in the table.
int unicode_to_byte(uint32_t cp);

// Decodes one code point at s[i] (assumes valid UTF-8); advances i.
uint32_t next_code_point(std::string_view s, size_t& i);

}  // namespace duo::utf8
